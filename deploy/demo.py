"""`make demo`: the whole system on this machine, measured.

Creates a state dir (.demo/) with a CA, the edge certificate, a client key and
a worker token; starts two inference servers (opencv-dnn and tensorflow, the
offline default model), a worker agent beside each in its own pool, and the
edge; waits until all are ready; runs `loadtest ping` and `loadtest classify`
through the edge and directly against one inference server; prints the
hop-by-hop comparison and where the HTML reports are; stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m" if sys.stdout.isatty() else f"==> {msg}", flush=True)


class Stack:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.state / f"{name}.log", "wb")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append((name, p))
        return p

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = (self.state / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise SystemExit(f"{name} exited with {p.returncode}; its log ({self.state / (name + '.log')}) ends:\n"
                                 + "\n".join(tail))

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_http(stack: Stack, url: str, timeout: float, what: str, ctx: ssl.SSLContext | None = None,
              headers: dict[str, str] | None = None, ok=lambda status, body: status == 200) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                if ok(r.status, r.read()):
                    return
        except urllib.error.HTTPError as e:
            if ok(e.code, e.read()):
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def have(module: str) -> bool:
    """Whether a package's command line exists yet (the demo grows with the code)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def quick_measure(url: str, key: str | None, ca: str, n: int, pool: str | None = None) -> None:
    """Fallback while `loadtest` is not there: n sequential GETs, per-hop p50/p99."""
    import asyncio
    import statistics

    import aiohttp

    async def go() -> dict[str, list[float]]:
        hops: dict[str, list[float]] = {"client total": []}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if pool:
            headers["X-Pool"] = pool
        ctx = ssl.create_default_context(cafile=ca)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            for _ in range(n):
                t = time.perf_counter()
                async with http.get(url, headers=headers) as r:
                    await r.read()
                hops["client total"].append((time.perf_counter() - t) * 1000)
                for part in r.headers.get("Server-Timing", "").split(","):
                    name, _, dur = part.strip().partition(";dur=")
                    if dur:
                        hops.setdefault(name, []).append(float(dur))
        return hops

    hops = asyncio.run(go())
    print(f"    {'hop':<14} {'p50 ms':>8} {'p99 ms':>8}")
    for name, values in hops.items():
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"    {name:<14} {statistics.median(values):8.3f} {p99:8.3f}")


def run(cmd: list[str]) -> None:
    print("    $ " + " ".join(c if " " not in c else repr(c) for c in cmd[1:] if not c.startswith("eik_")), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", default=str(ROOT / ".demo"), help="directory for certificates, logs and reports")
    ap.add_argument("--requests", type=int, default=200, help="requests per load-test run")
    ap.add_argument("--backends", default="opencv-dnn,tensorflow", help="comma-separated inference backends")
    ap.add_argument("--keep-running", action="store_true", help="leave the stack up until Ctrl-C")
    args = ap.parse_args()
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    reports = state / "reports"
    reports.mkdir(exist_ok=True)

    say("certificates, a client key and a worker token in " + str(state))
    from edge_proxy import auth, certs

    files = certs.make_all(state / "pki", ["localhost", "127.0.0.1"])
    keys, tokens = state / "client-keys.json", state / "worker-tokens.json"
    for f in (keys, tokens):
        f.unlink(missing_ok=True)
    client_key = auth.create(keys, "demo", auth.CLIENT_KEY_PREFIX, admin=True)
    worker_token = auth.create(tokens, "demo-workers", auth.WORKER_TOKEN_PREFIX)
    (state / "worker-token").write_text(worker_token)
    os.chmod(state / "worker-token", 0o600)
    ctx = ssl.create_default_context(cafile=str(files["ca"]))

    stack = Stack(state)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        edge_port = free_port()
        edge = f"https://127.0.0.1:{edge_port}"
        say(f"edge on {edge}")
        stack.start("edge", [PY, "-m", "edge_proxy", "serve", "--listen", f"127.0.0.1:{edge_port}",
                             "--cert", str(files["cert"]), "--key", str(files["key"]), "--client-keys", str(keys),
                             "--worker-tokens", str(tokens), "--rate-limit", "0"])
        wait_http(stack, edge + "/_edge/health", 30, "the edge", ctx)

        backends = [b for b in args.backends.split(",") if b]
        servers: dict[str, str] = {}
        if not have("inference.cli"):
            # Relay-only until the inference servers exist: a trivial upstream.
            say("no inference package yet: relay-only demo with a trivial upstream")
            backends = ["relay"]
        for backend in backends:
            if backend == "relay":
                port = free_port()
                servers[backend] = f"http://127.0.0.1:{port}"
                stack.start("upstream", [PY, str(ROOT / "tests" / "relay" / "upstream.py"), str(port)])
                stack.start("agent-relay", [PY, "-m", "worker_agent", "--edge",
                                            f"wss://127.0.0.1:{edge_port}/_edge/tunnel", "--token-file",
                                            str(state / "worker-token"), "--ca", str(files["ca"]), "--upstream",
                                            servers[backend], "--pool", "relay", "--capacity", "8", "--id",
                                            "worker-relay"])
                continue
            port = free_port()
            servers[backend] = f"http://127.0.0.1:{port}"
            say(f"inference server {backend} on port {port} (efficientnet-lite0; first start converts the weights)")
            stack.start(f"infer-{backend}", [PY, "-m", "inference", "serve", "--host", "127.0.0.1", "--port", str(port),
                                             "--backend", backend, "--model", "efficientnet-lite0",
                                             "--cache-dir", str(state / "model-cache")])
            stack.start(f"agent-{backend}", [PY, "-m", "worker_agent", "--edge",
                                             f"wss://127.0.0.1:{edge_port}/_edge/tunnel", "--token-file",
                                             str(state / "worker-token"), "--ca", str(files["ca"]), "--upstream",
                                             servers[backend], "--pool", backend, "--capacity", "8", "--id",
                                             f"worker-{backend}"])
        for backend, url in servers.items():
            wait_http(stack, url + "/healthz", 600, f"the {backend} model to load and warm up")
            say(f"{backend} ready")

        def pool_ready(status: int, body: bytes) -> bool:
            if status != 200:
                return False
            return all(json.loads(body)["healthy_workers"].get(b, 0) >= 1 for b in backends)

        wait_http(stack, edge + "/_edge/ready", 60, "every pool at the edge", ctx, ok=pool_ready)
        say("all ready: edge, " + ", ".join(f"pool {b}" for b in backends))

        if not have("loadtest.cli"):
            say("no loadtest package yet: a quick sequential measurement instead")
            first = backends[0]
            print("  direct:")
            quick_measure(servers[first] + "/", None, str(files["ca"]), args.requests)
            print("  through the edge:")
            quick_measure(edge + "/", client_key, str(files["ca"]), args.requests, pool=first)
            return 0
        lt = [PY, "-m", "loadtest"]
        common = ["--api-key", client_key, "--ca", str(files["ca"])]
        n = str(args.requests)
        first = backends[0]
        runs: list[tuple[str, list[str]]] = [
            ("ping-direct", lt + ["ping", "--url", servers[first] + "/", "--concurrency", "4", "--requests", n]),
            ("ping-edge", lt + ["ping", "--url", edge + "/", "--pool", first, "--concurrency", "4", "--requests", n]
             + common),
            ("classify-direct", lt + ["classify", "--url", servers[first] + "/photo", "--concurrency", "4",
                                      "--requests", n]),
        ]
        for backend in backends:
            runs.append((f"classify-edge-{backend}", lt + ["classify", "--url", edge + "/photo", "--pool", backend,
                                                            "--concurrency", "4", "--requests", n] + common))
        outputs = []
        for name, cmd in runs:
            say(f"loadtest: {name}")
            out_json = reports / f"{name}.json"
            run(cmd + ["--json", str(out_json), "--html", str(reports / f"{name}.html")])
            outputs.append(str(out_json))
        say("hop-by-hop comparison")
        run(lt + ["compare", *outputs])
        say("HTML reports (open in a browser, no network needed):")
        for name, _ in runs:
            print(f"    {reports / (name + '.html')}")
        if args.keep_running:
            say(f"stack is up: edge {edge}, client key in this output above; Ctrl-C to stop")
            print(f"    client key: {client_key}")
            while True:
                time.sleep(1)
                stack.check_alive()
    except KeyboardInterrupt:
        say("interrupted")
    except subprocess.CalledProcessError as exc:
        print(f"error: a load-test step failed (exit {exc.returncode}); logs are in {state}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"error: {exc.code}", file=sys.stderr)
            return 1
        raise
    finally:
        say("stopping everything")
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
