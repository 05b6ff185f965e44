"""WSS tunnel against WireGuard, side by side on the same work (issue 20 §4).

Builds, in network namespaces (root), the firewalled topology of
deploy/netns/topology.sh, and reaches the SAME worker processes two ways in
the same run:

  clients -> edge ==WSS (agents dial out)===> relay TCP  ==> worker: agent -> servers
                  ==WireGuard (dialled out)=> relay UDP  ==> worker: wg0 -> servers

The WAN of the edge<->worker leg is deploy/netns/delay_relay.py in the router
namespace, TCP mode for the agents' tunnels and UDP mode for WireGuard, with
the same delay law (default 20 +/- 5 ms each way, order kept) and optional
--loss (UDP: datagrams dropped; TCP: the relay's retransmission model, a
chunk with a lost 1448-byte segment --rto-ms late; see its --help). The worker's servers: the real inference
server (POST /photo), the relay tests' upstream (GET /, known delay
--echo-delay-ms) and the WebSocket test server (/delay?ms=D, frames answered
D ms after arrival), each in a `wss-*` pool (three agents) and a `vpn-*` pool
(direct workers at the worker's WireGuard address).

For each path, `loadtest` measures requests (added latency, RFC 3550 jitter,
throughput; open loop at --rate on the echo, closed loop on the inference
server) and `loadtest stream` live streams at each --fps (frames within the
deadline); each path's run alternates with the other's, so machine drift hits
both alike. CPU per request of the edge and of the link (the agent, or both
wireguard-go processes) is read from /proc. One `loadtest compare` report of
every result goes to --out; a Markdown table to standard output. A benchmark:
asserts nothing. Long because the lab is one sequence (namespaces, WireGuard,
relays, servers, edge, agents) that reads best in one place.

    sudo python bench/wss_vs_vpn.py                           # ~3 min
    sudo python bench/wss_vs_vpn.py --seconds 5 --fps 15      # quick
    sudo python bench/wss_vs_vpn.py --loss 1 --out /tmp/lossy
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.netns import vpnlab  # noqa: E402
from edge_proxy import auth, certs, vpn  # noqa: E402

PY = sys.executable
TOPOLOGY = ROOT / "deploy" / "netns" / "topology.sh"
RELAY = ROOT / "deploy" / "netns" / "delay_relay.py"
EDGE_CLIENT_SIDE, EDGE_ROUTER_SIDE, ROUTER = "10.231.1.1", "10.231.2.1", "10.231.2.2"
EDGE_PORT, WG_PORT, RELAY_TCP, RELAY_UDP = 8443, 51820, 9443, 51821
INFER_PORT, ECHO_PORT, WS_PORT = 8000, 8100, 8200
PATHS = ("wss", "vpn")
NAMES = {"wss": "WSS tunnel", "vpn": "WireGuard"}


# --- arguments ---------------------------------------------------------------------------------------------------

def _fps_list(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame rates like 15,30, got {value!r}") from None
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive frame rates like 15,30, got {value!r}")
    return out


def _non_negative(value: str) -> float:
    v = float(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value!r}")
    return v


def _positive(value: str) -> float:
    v = float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected more than 0, got {value!r}")
    return v


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=_non_negative, default=20.0, help="one-way WAN delay (default: 20)")
    ap.add_argument("--jitter-ms", type=_non_negative, default=5.0, help="+/- uniform jitter (default: 5)")
    ap.add_argument("--loss", type=_non_negative, default=0.0, metavar="PCT",
                    help="WAN loss in %% each way (UDP drops; TCP: the relay's retransmission model) (default: 0)")
    ap.add_argument("--rto-ms", type=_positive, default=200.0,
                    help="TCP relay's cost of a lost segment (its loss model; default: 200, Linux's minimum RTO)")
    ap.add_argument("--seconds", type=_positive, default=10.0, help="measured seconds per run (default: 10)")
    ap.add_argument("--rate", type=_positive, default=20.0, help="requests/s on the echo, open loop (default: 20)")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight on the inference server "
                                                               "(default: 1)")
    ap.add_argument("--fps", type=_fps_list, default=[15.0, 30.0], help="stream frame rates (default: 15,30)")
    ap.add_argument("--frame-bytes", type=int, default=50_000, help="bytes per stream frame (default: 50000)")
    ap.add_argument("--deadline-ms", type=_positive, default=100.0,
                    help="a stream frame's deadline from its scheduled send (default: 100)")
    ap.add_argument("--echo-delay-ms", type=_non_negative, default=5.0,
                    help="the echo servers' known delay, requests and frames (default: 5)")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference server (echo and streams only)")
    ap.add_argument("--no-idle-restart", action="store_true",
                    help="net.ipv4.tcp_slow_start_after_idle=0 in the edge's and worker's namespaces: TCP keeps its "
                         "window between frames (the agents' tunnels, split by the TCP relay, hardly need it)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the relays' delays and losses")
    ap.add_argument("--out", type=Path, default=None, help="directory for the JSON results and compare.html")
    ap.add_argument("--report", type=Path, metavar="DIR",
                    help="build no lab: print the table again from the results an earlier run left in DIR")
    a = ap.parse_args(argv)
    if a.loss >= 100:
        ap.error("--loss must be below 100")
    if a.concurrency < 1:
        ap.error("--concurrency must be 1 or more")
    return a


# --- the runs ------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One measurement: which path, what, the loadtest command's arguments, and what it gives."""

    path: str
    test: str  # "echo", "infer", "stream@15"
    args: list[str]
    result: dict[str, Any] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per role during the run

    @property
    def label(self) -> str:
        return f"{self.path} {self.test}"

    @property
    def file(self) -> str:
        return f"{self.path}-{self.test.replace('@', '-')}.json"


def plan(a: argparse.Namespace, edge: str) -> list[Run]:
    """Every run, each path's run next to the other's, the order alternating from test to test."""
    tests: list[tuple[str, Any]] = [("echo", None)]
    if not a.no_inference:
        tests.append(("infer", None))
    tests += [(f"stream@{f:g}", f) for f in a.fps]
    runs = []
    for i, (test, fps) in enumerate(tests):
        for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
            common = ["--quiet", "--label", f"{path} {test}"]
            if test == "echo":
                args = ["ping", "--url", f"{edge}/", "--pool", f"{path}-echo", "--rate", f"{a.rate:g}",
                        "--duration", f"{a.seconds:g}", "--warmup", "1"]
            elif test == "infer":
                args = ["classify", "--url", f"{edge}/photo", "--pool", f"{path}-infer", "--concurrency",
                        str(a.concurrency), "--duration", f"{a.seconds:g}", "--warmup", "1"]
            else:
                url = edge.replace("https://", "wss://") + f"/delay?ms={a.echo_delay_ms:g}"
                args = ["stream", "--url", url, "--pool", f"{path}-ws", "--fps", f"{fps:g}", "--duration",
                        f"{a.seconds:g}", "--frame-bytes", str(a.frame_bytes), "--deadline-ms", f"{a.deadline_ms:g}"]
            runs.append(Run(path, test, args + common))
    return runs


# --- the report (pure) ---------------------------------------------------------------------------------------------

def leg_ms(result: dict[str, Any]) -> float | None:
    """The edge<->worker leg, p50, as the load tester derives it: `net_edge_worker` (tunnel - agent)
    through an agent, `net_edge_direct` (the edge's upstream - app) to a direct worker; else the
    edge's whole round trip (`tunnel`, or `upstream` without a tunnel), server time included."""
    hops = result.get("hops_ms") or {}
    hop = (hops.get("net_edge_worker") or hops.get("net_edge_direct")
           or hops.get("tunnel") or (hops.get("upstream") if "agent" not in hops else None))
    p50 = hop.get("p50") if isinstance(hop, dict) else None
    return float(p50) if isinstance(p50, int | float) else None


def per_request_ms(run: Run, role: str) -> float | None:
    count = run.result.get("requests") or run.result.get("frames_answered")
    if not count or role not in run.cpu_s:
        return None
    return 1000 * run.cpu_s[role] / float(count)


def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(runs: Sequence[Run]) -> list[list[str]]:
    """Rows of the report: a figure, then its value for each path (the order of PATHS)."""
    by = {(r.path, r.test): r for r in runs}
    tests = list(dict.fromkeys(r.test for r in runs))
    rows: list[list[str]] = []

    def add(name: str, get: Any, test: str) -> None:
        rows.append([name] + [get(by[(p, test)]) if (p, test) in by else "-" for p in PATHS])

    for test in tests:
        if test.startswith("stream@"):
            fps = test.partition("@")[2]
            add(f"stream {fps} fps: frames within deadline %",
                lambda r: _f(None if r.result.get("miss_ratio") is None else 100 * (1 - r.result["miss_ratio"]), 2),
                test)
            add(f"stream {fps} fps: latency p50 / p99 ms", lambda r: f"{_f(r.result['latency_ms'].get('p50'))} / "
                f"{_f(r.result['latency_ms'].get('p99'))}" if r.result.get("latency_ms") else "-", test)
            add(f"stream {fps} fps: RFC 3550 jitter ms",
                lambda r: _f((r.result.get("jitter_ms") or {}).get("rfc3550"), 2), test)
            add(f"stream {fps} fps: CPU ms/frame edge / link",
                lambda r: f"{_f(per_request_ms(r, 'edge'), 2)} / {_f(per_request_ms(r, 'link'), 2)}", test)
            continue
        what = {"echo": "echo", "infer": "inference"}.get(test, test)
        add(f"{what}: latency p50 / p99 ms", lambda r: f"{_f(r.result['latency_ms'].get('p50'))} / "
            f"{_f(r.result['latency_ms'].get('p99'))}" if r.result.get("latency_ms") else "-", test)
        add(f"{what}: edge<->worker leg p50 ms", lambda r: _f(leg_ms(r.result)), test)
        add(f"{what}: RFC 3550 jitter ms", lambda r: _f((r.result.get("jitter_ms") or {}).get("rfc3550"), 2), test)
        add(f"{what}: throughput req/s, errors",
            lambda r: f"{_f(r.result.get('throughput_rps'))}, {r.result.get('errors', '-')}", test)
        add(f"{what}: CPU ms/request edge / link",
            lambda r: f"{_f(per_request_ms(r, 'edge'), 2)} / {_f(per_request_ms(r, 'link'), 2)}", test)
    return rows


def markdown(rows: Sequence[Sequence[str]]) -> str:
    head = ["", *(NAMES[p] for p in PATHS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --- the lab (root, namespaces) ------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Lab:
    def __init__(self, workdir: Path, a: argparse.Namespace) -> None:
        self.p = "b" + secrets.token_hex(3)
        self.workdir = workdir
        self.a = a
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.wgs: list[vpnlab.WireGuard] = []

    def ns(self, name: str) -> str:
        return f"{self.p}-{name}"

    def start(self, name: str, ns: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(ns), *args], stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def run(self, ns: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(ns), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def wait(self, what: str, ns: str, url: str, timeout: float, key: str | None = None, ca: str | None = None,
             check: str = "r.status == 200") -> None:
        code = ("import json, ssl, sys, urllib.request\n"
                f"ctx = ssl.create_default_context(cafile={ca!r}) if {ca!r} else None\n"
                f"req = urllib.request.Request({url!r}, headers={{'Authorization': 'Bearer {key}'}} if {key!r} else {{}})\n"
                "r = urllib.request.urlopen(req, timeout=3, context=ctx)\n"
                "body = r.read()\n"
                f"sys.exit(0 if ({check}) else 1)\n")
        deadline = time.monotonic() + timeout
        while self.run(ns, [PY, "-c", code], timeout=30).returncode != 0:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SystemExit(f"wss_vs_vpn: {name} exited; see {self.workdir / (name + '.log')}")
            if time.monotonic() > deadline:
                raise SystemExit(f"wss_vs_vpn: {what} not ready after {timeout:g} s; logs in {self.workdir}")
            time.sleep(0.5)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for wg in self.wgs:
            wg.down()
        subprocess.run([str(TOPOLOGY), "down", self.p], capture_output=True, timeout=60)


@contextmanager
def lab(a: argparse.Namespace, workdir: Path) -> Iterator[tuple[Lab, str, str, str]]:
    """The topology, WireGuard through the UDP relay, agents through the TCP relay, servers and an edge.
    Yields (lab, edge URL, client key, CA file)."""
    t = Lab(workdir, a)
    up = subprocess.run([str(TOPOLOGY), "up", t.p], capture_output=True, text=True, timeout=60)
    if up.returncode != 0:
        raise SystemExit(f"wss_vs_vpn: topology.sh up failed: {up.stderr.strip()}")
    try:
        pki = workdir / "pki"
        files = certs.make_all(pki, ["localhost", EDGE_CLIENT_SIDE, EDGE_ROUTER_SIDE, ROUTER])
        key = auth.create(pki / "keys.json", "bench", auth.CLIENT_KEY_PREFIX, admin=True)
        token = auth.create(pki / "tokens.json", "workers", auth.WORKER_TOKEN_PREFIX)
        # WireGuard's Endpoint is the router's UDP relay: the same WAN as the agents' TCP relay.
        state = vpn.init(workdir / "vpn", f"{ROUTER}:{RELAY_UDP}", 1)
        vpn_dir = workdir / "vpn"
        edge_conf = workdir / "edge-wg.conf"  # the edge listens on WG_PORT, behind the relay
        edge_conf.write_text((vpn_dir / "edge.conf").read_text().replace(f"ListenPort = {RELAY_UDP}",
                                                                            f"ListenPort = {WG_PORT}"))
        edge_conf.chmod(0o600)
        law = ["--delay-ms", f"{a.delay_ms:g}", "--jitter-ms", f"{a.jitter_ms:g}", "--loss", f"{a.loss:g}",
               "--seed", str(a.seed)]
        t.start("relay-tcp", "router", [PY, str(RELAY), f"{ROUTER}:{RELAY_TCP}", f"{EDGE_ROUTER_SIDE}:{EDGE_PORT}",
                                        *law, "--rto-ms", f"{a.rto_ms:g}"])
        t.start("relay-udp", "router", [PY, str(RELAY), f"{ROUTER}:{RELAY_UDP}", f"{EDGE_ROUTER_SIDE}:{WG_PORT}",
                                        "--udp", *law])
        wg_iface = f"{t.p}w"
        if a.no_idle_restart:
            for ns in ("edge", "workers"):
                vpnlab.run(t.ns(ns), "sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0")
        for port in (INFER_PORT, ECHO_PORT, WS_PORT):
            vpnlab.run(t.ns("workers"), "nft", "add", "rule", "inet", "firewall", "input", "iifname", wg_iface,
                       "tcp", "dport", str(port), "accept")
        for ns, iface, conf in (("edge", f"{t.p}e", edge_conf), ("workers", wg_iface, vpn_dir / "worker-1.conf")):
            wg = vpnlab.WireGuard(t.ns(ns), iface, conf, workdir)
            t.wgs.append(wg)
            wg.up()
        # The worker's servers, on every address: the firewall admits the tunnel only.
        t.start("echo", "workers", [PY, str(ROOT / "tests" / "relay" / "upstream.py"), str(ECHO_PORT), "0.0.0.0"])
        t.start("ws", "workers", [PY, str(ROOT / "tests" / "loadtest" / "wsserver.py"), str(WS_PORT)],
                {"WSSERVER_HOST": "0.0.0.0"})
        if not a.no_inference:
            t.start("inference", "workers", [PY, "-m", "inference", "serve", "--host", "0.0.0.0", "--port",
                                             str(INFER_PORT)])
        t.wait("echo server", "workers", f"http://127.0.0.1:{ECHO_PORT}/healthz", 30)
        t.wait("echo delay", "workers", f"http://127.0.0.1:{ECHO_PORT}/set-delay/{a.echo_delay_ms:g}", 10)
        t.wait("WebSocket server", "workers", f"http://127.0.0.1:{WS_PORT}/healthz", 30)
        servers = {"echo": ECHO_PORT, "ws": WS_PORT} | ({} if a.no_inference else {"infer": INFER_PORT})
        directs = [arg for kind, port in servers.items()
                   for arg in ("--direct", f"vpn-{kind}=http://{state.workers[0].address}:{port},id=vpn-{kind},"
                                           "capacity=64")]
        t.start("edge", "edge", [PY, "-m", "edge_proxy", "serve", "--listen", f"0.0.0.0:{EDGE_PORT}", "--cert",
                                 str(files["cert"]), "--key", str(files["key"]), "--client-keys",
                                 str(pki / "keys.json"), "--worker-tokens", str(pki / "tokens.json"),
                                 "--rate-limit", "0", "--log-level", "warning", *directs])
        for kind, port in servers.items():
            t.start(f"agent-{kind}", "workers", [PY, "-m", "worker_agent", "--edge",
                                                 f"wss://{ROUTER}:{RELAY_TCP}/_edge/tunnel", "--token", token, "--ca",
                                                 str(files["ca"]), "--upstream", f"http://127.0.0.1:{port}",
                                                 "--pool", f"wss-{kind}", "--id", f"wss-{kind}", "--capacity", "64",
                                                 "--log-level", "warning"])
        if not a.no_inference:
            t.wait("inference server", "workers", f"http://127.0.0.1:{INFER_PORT}/healthz", 600)
        edge = f"https://{EDGE_CLIENT_SIDE}:{EDGE_PORT}"
        ids = [f"{p}-{k}" for p in PATHS for k in servers]
        t.wait("every worker at the edge", "clients", f"{edge}/_edge/workers", 120, key, str(files["ca"]),
               check=f"all(w['available'] for w in json.loads(body)['workers'] if w['id'] in {ids!r}) and "
                     f"len([w for w in json.loads(body)['workers'] if w['id'] in {ids!r}]) == {len(ids)}")
        yield t, edge, key, str(files["ca"])
    finally:
        t.close()


def measure(t: Lab, run: Run, key: str, ca: str, out: Path) -> None:
    pids = {"edge": [t.procs["edge"].pid],
            "link": ([t.procs[f"agent-{run.test.split('@')[0].replace('stream', 'ws')}"].pid] if run.path == "wss"
                     else [wg.proc.pid for wg in t.wgs if wg.proc is not None])}
    before = {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}
    r = t.run("clients", [PY, "-m", "loadtest", *run.args, "--api-key", key, "--ca", ca, "--json",
                          str(out / run.file)], timeout=run_timeout(t.a))
    run.cpu_s = {role: sum(cpu_seconds(p) for p in ps) - before[role] for role, ps in pids.items()}
    if not (out / run.file).exists():
        raise SystemExit(f"wss_vs_vpn: {run.label} wrote no result ({r.returncode}):\n{r.stderr[-2000:]}")
    run.result = json.loads((out / run.file).read_text())
    print(f"  {run.label}: done ({r.returncode})", file=sys.stderr, flush=True)


def run_timeout(a: argparse.Namespace) -> float:
    return 120.0 + 3 * float(a.seconds)


def load_runs(directory: Path) -> list[Run]:
    """The runs an earlier bench left in `directory` (runs.json and each result)."""
    runs = []
    for entry in json.loads((directory / "runs.json").read_text()):
        path, _, test = entry["label"].partition(" ")
        run = Run(path, test, [], json.loads((directory / entry["file"]).read_text()), entry["cpu_s"])
        runs.append(run)
    return runs


def report_again(directory: Path) -> int:
    try:
        runs = load_runs(directory)
    except (OSError, ValueError, KeyError) as exc:
        print(f"wss_vs_vpn: {directory} holds no bench results ({exc})", file=sys.stderr)
        return 2
    print(markdown(table(runs)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report is not None:
        return report_again(a.report)
    if (why := vpnlab.missing()) is not None:
        print(f"wss_vs_vpn: {why}", file=sys.stderr)
        return 2
    out = a.out or Path(tempfile.mkdtemp(prefix="wss-vs-vpn-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wss-vs-vpn-lab-") as tmp:
        workdir = Path(tmp)
        print(f"building the namespaces (logs: {workdir})...", file=sys.stderr, flush=True)
        with lab(a, workdir) as (t, edge, key, ca):
            runs = plan(a, edge)
            for run in runs:
                measure(t, run, key, ca, out)
    # Each test's WSS result then its WireGuard one: `compare` gives every difference against the first.
    order = {t: i for i, t in enumerate(dict.fromkeys(r.test for r in runs))}
    files = [str(out / r.file) for r in sorted(runs, key=lambda r: (order[r.test], PATHS.index(r.path)))]
    compare = subprocess.run([PY, "-m", "loadtest", "compare", *files, "--html", str(out / "compare.html")],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
    (out / "compare.txt").write_text(compare.stdout)
    (out / "runs.json").write_text(json.dumps([{"label": r.label, "cpu_s": r.cpu_s, "file": r.file} for r in runs],
                                              indent=2))
    loss = f", loss {a.loss:g}% each way (TCP: a lost segment costs {a.rto_ms:g} ms)" if a.loss else ""
    loss += ", tcp_slow_start_after_idle=0" if a.no_idle_restart else ""
    print(f"WAN on the edge<->worker leg: {a.delay_ms:g} +/- {a.jitter_ms:g} ms each way{loss}; "
          f"{a.seconds:g} s per run; echo delay {a.echo_delay_ms:g} ms; stream frames {a.frame_bytes} B, deadline "
          f"{a.deadline_ms:g} ms")
    print(markdown(table(runs)))
    print(f"\nresults, compare.txt and compare.html in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
