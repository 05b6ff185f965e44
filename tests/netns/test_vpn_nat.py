"""Issue 20 §3: the WireGuard leg through a NAT, in network namespaces.

    clients --- edge --- router (NAT masquerade) --- worker
                 |  WireGuard 10.77.0.1 <====== dialled OUT by ====== 10.77.0.2

deploy/netns/topology.sh builds the four namespaces; the worker's input policy
drops everything but loopback and established/related traffic, and this test
adds the one rule docs/vpn.md gives: the WireGuard interface, to the
inference port. The worker brings WireGuard up (userspace wireguard-go, the
configs from `edge-proxy vpn init`) and dials out through the router's NAT to
the edge's public address; the edge has no route to the worker's network and
reaches the worker's server only through the tunnel."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.netns import vpnlab
from edge_proxy import auth, certs, vpn
from tests.harness import ROOT, Proc

SCRIPT = ROOT / "deploy" / "netns" / "topology.sh"
PY = sys.executable
EDGE_CLIENT_SIDE, EDGE_ROUTER_SIDE, ROUTER, WORKER = "10.231.1.1", "10.231.2.1", "10.231.2.2", "10.231.3.2"
WG_PORT = 51820
PORT = 8000

pytestmark = [pytest.mark.netns, pytest.mark.skipif(vpnlab.missing() is not None, reason=vpnlab.missing() or "")]


@dataclass
class Lab:
    prefix: str
    workdir: Path
    state: vpn.VpnState
    vpn_dir: Path
    edge_wg: vpnlab.WireGuard
    worker_wg: vpnlab.WireGuard
    procs: list[Proc]

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @property
    def worker_address(self) -> str:
        return self.state.workers[0].address

    def start(self, name: str, ns: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, ["ip", "netns", "exec", self.ns(ns), *args], self.workdir, env)
        self.procs.append(proc)
        return proc

    def run(self, ns: str, args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(ns), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def logs(self) -> str:
        return "\n".join([f"--- {p.name}\n{p.log()}" for p in self.procs]
                         + [f"--- {w.iface}\n{w.log()}" for w in (self.edge_wg, self.worker_wg)])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    prefix = "g" + secrets.token_hex(3)
    up = subprocess.run([str(SCRIPT), "up", prefix], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    procs: list[Proc] = []
    d = tmp_path / "vpn"
    state = vpn.init(d, f"{EDGE_ROUTER_SIDE}:{WG_PORT}", 1)
    edge_wg = vpnlab.WireGuard(f"{prefix}-edge", f"{prefix}e", d / "edge.conf", tmp_path)
    worker_wg = vpnlab.WireGuard(f"{prefix}-workers", f"{prefix}w", d / "worker-1.conf", tmp_path)
    lab = Lab(prefix, tmp_path, state, d, edge_wg, worker_wg, procs)
    try:
        # The one inbound rule of docs/vpn.md: the WireGuard interface, to the inference port only.
        vpnlab.run(lab.ns("workers"), "nft", "add", "rule", "inet", "firewall", "input", "iifname",
                   worker_wg.iface, "tcp", "dport", str(PORT), "accept")
        edge_wg.up()
        worker_wg.up()
        yield lab
    finally:
        for p in procs:
            p.kill()
        worker_wg.down()
        edge_wg.down()
        subprocess.run([str(SCRIPT), "down", prefix], capture_output=True, timeout=60)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"


def fetch_cmd(url: str, timeout: float) -> list[str]:
    return [PY, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout={timeout}).read().decode())"]


def connect_cmd(host: str, port: int, timeout: float) -> list[str]:
    return [PY, "-c", f"import socket; socket.create_connection(('{host}', {port}), timeout={timeout}); "
                      "print('CONNECTED')"]


def wait_fetch(lab: Lab, ns: str, url: str, timeout: float) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while True:
        r = lab.run(ns, fetch_cmd(url, 2))
        if r.returncode == 0:
            return r
        assert time.monotonic() < deadline, f"{ns} never fetched {url}: {r.stderr[-500:]}\n{lab.logs()}"
        time.sleep(0.2)


def start_upstream(lab: Lab) -> str:
    """The test upstream in the worker namespace, on EVERY address: only the firewall keeps it closed."""
    lab.start("upstream", "workers", [PY, str(ROOT / "tests" / "relay" / "upstream.py"), str(PORT), "0.0.0.0"])
    url = f"http://127.0.0.1:{PORT}/healthz"
    wait_fetch(lab, "workers", url, 20)
    return f"http://{lab.worker_address}:{PORT}"


def assert_firewall_holds(lab: Lab) -> None:
    """The worker's server is reachable on no public address: not from the edge (no route, and the
    router forwards nothing inward), not from the router itself (the worker's input policy drops it)."""
    for ns, host in (("edge", WORKER), ("edge", ROUTER), ("router", WORKER)):
        r = lab.run(ns, connect_cmd(host, PORT, 2))
        assert "CONNECTED" not in r.stdout, f"{ns} connected to {host}:{PORT}: the firewall does not hold"
        reason = r.stderr.lower()
        assert "unreachable" in reason or "timed out" in reason or "refused" in reason, r.stderr[-300:]


def test_edge_reaches_the_worker_only_through_wireguard_dialled_out_through_nat(lab: Lab) -> None:
    upstream = start_upstream(lab)
    r = wait_fetch(lab, "edge", upstream + "/", 30)  # the handshake the worker's keepalive started
    assert "hello from" in r.stdout
    assert lab.worker_wg.latest_handshake() > 0
    # The edge sees the worker at the router's public address (the NAT), never at its own.
    endpoints = vpnlab.run(lab.ns("edge"), "wg", "show", lab.edge_wg.iface, "endpoints").split()
    assert endpoints[0] == lab.state.workers[0].public_key and endpoints[1].startswith(f"{ROUTER}:"), endpoints
    assert_firewall_holds(lab)
    # Only WireGuard carries it: with the worker's interface gone, the edge cannot reach the server.
    lab.worker_wg.down()
    r = lab.run("edge", fetch_cmd(upstream + "/", 2))
    assert r.returncode != 0 and "hello from" not in r.stdout
    # And it comes back when the worker dials out again (a new NAT mapping, a new handshake).
    lab.worker_wg.up()
    wait_fetch(lab, "edge", upstream + "/", 30)



# --- the edge's direct worker over the tunnel -------------------------------------------------------------------

CHECK_INTERVAL, CHECK_TIMEOUT, UNHEALTHY_AFTER = 0.5, 1.0, 2
CONNECT_TIMEOUT = 2.0
# Marked down within: UNHEALTHY_AFTER checks, each up to an interval plus its timeout.
HEALTH_DEADLINE = UNHEALTHY_AFTER * (CHECK_INTERVAL + CHECK_TIMEOUT)


@dataclass
class Edge:
    key: str
    ca: Path
    url: str


def start_edge(lab: Lab, directs: list[str]) -> Edge:
    pki = lab.workdir / "pki"
    files = certs.make_all(pki, ["localhost", EDGE_CLIENT_SIDE])
    key = auth.create(pki / "keys.json", "client", auth.CLIENT_KEY_PREFIX, admin=True)  # reads /_edge/workers
    auth.create(pki / "tokens.json", "workers", auth.WORKER_TOKEN_PREFIX)
    flags = [arg for line in directs for arg in ("--direct", line.removeprefix("--direct "))]
    lab.start("edge", "edge", [PY, "-m", "edge_proxy", "serve", "--listen", "0.0.0.0:8443", "--cert",
                               str(files["cert"]), "--key", str(files["key"]), "--client-keys", str(pki / "keys.json"),
                               "--worker-tokens", str(pki / "tokens.json"), "--rate-limit", "0", "--check-interval",
                               str(CHECK_INTERVAL), "--check-timeout", str(CHECK_TIMEOUT), "--unhealthy-threshold",
                               str(UNHEALTHY_AFTER), "--direct-connect-timeout", str(CONNECT_TIMEOUT), *flags])
    return Edge(key, files["ca"], f"https://{EDGE_CLIENT_SIDE}:8443")


def client_requests(lab: Lab, edge: Edge, path: str, count: int) -> list[dict]:
    r = lab.run("clients", [PY, str(ROOT / "tests" / "netns" / "client.py"), edge.url + path, edge.key, str(edge.ca),
                            str(count)], timeout=120)
    assert r.returncode == 0, r.stderr + lab.logs()
    return [json.loads(line) for line in r.stdout.splitlines()]


def worker_available(lab: Lab, edge: Edge, name: str) -> bool | None:
    (res,) = client_requests(lab, edge, "/_edge/workers", 1)
    if res["status"] != 200:
        return None
    ws = {w["id"]: w for w in json.loads(res["body"])["workers"]}
    return bool(ws[name]["available"]) if name in ws else None


def wait_available(lab: Lab, edge: Edge, name: str, want: bool, timeout: float) -> float:
    start = time.monotonic()
    while worker_available(lab, edge, name) is not want:
        assert time.monotonic() - start < timeout, (f"{name} not {'up' if want else 'down'} after {timeout} s\n"
                                                    f"{lab.logs()}")
        time.sleep(0.2)
    return time.monotonic() - start


def vpn_init_direct_lines(lab: Lab) -> list[str]:
    """The `--direct` lines `edge-proxy vpn init` prints for this VPN, as an operator pastes them."""
    state = vpn.VpnState.load(lab.vpn_dir)
    return [vpn.direct_line(w, "default", PORT) for w in state.workers]


def test_client_reaches_the_worker_through_the_edge_and_wireguard_and_the_edge_follows_the_tunnel(lab: Lab) -> None:
    start_upstream(lab)
    edge = start_edge(lab, vpn_init_direct_lines(lab))
    wait_available(lab, edge, "worker-1", True, 30)
    answers = client_requests(lab, edge, "/", 20)
    assert [a["status"] for a in answers] == [200] * 20, answers[-1]
    assert "hello from" in answers[0]["body"]
    # The worker saw the edge at its tunnel address: the request came through WireGuard.
    assert f"peer {lab.state.edge.address}\n" in answers[0]["body"], answers[0]["body"]
    assert "upstream" in answers[0]["timing"] and "tunnel" not in answers[0]["timing"]
    assert_firewall_holds(lab)

    # The worker's WireGuard stops: requests are answered, never left hanging, and the edge
    # marks the worker down within its health deadline; then it answers 503 at once.
    lab.worker_wg.down()
    stopped = time.monotonic()
    during = client_requests(lab, edge, "/", 3)
    assert all(a["status"] in (502, 503, 504) for a in during), during
    assert all(a["elapsed_s"] < CONNECT_TIMEOUT + CHECK_TIMEOUT + 3.0 for a in during), during
    down_after = wait_available(lab, edge, "worker-1", False, HEALTH_DEADLINE + 10)
    print(f"worker marked down {time.monotonic() - stopped:.2f} s after its WireGuard stopped "
          f"(waited {down_after:.2f} s after the probes)")
    assert time.monotonic() - stopped < HEALTH_DEADLINE + 3 * CONNECT_TIMEOUT + 10  # the probes' own time included
    (fast,) = client_requests(lab, edge, "/", 1)
    assert fast["status"] == 503 and fast["elapsed_s"] < 1.0, fast

    # It dials out again: a new handshake through a new NAT mapping, then the next health check.
    lab.worker_wg.up()
    restarted = time.monotonic()
    wait_available(lab, edge, "worker-1", True, 5 + HEALTH_DEADLINE + 10)  # handshake retry 5 s, then a check
    print(f"worker back {time.monotonic() - restarted:.2f} s after its WireGuard restarted")
    assert [a["status"] for a in client_requests(lab, edge, "/", 5)] == [200] * 5


def test_real_inference_server_bound_to_its_tunnel_address_classifies_through_the_edge(lab: Lab) -> None:
    """The inference server of the project (its default backend and model), listening on the worker's
    WireGuard address only, as docs/vpn.md says; a client's /photo goes edge -> WireGuard -> server."""
    server = lab.start("inference", "workers", [PY, "-m", "inference", "serve", "--host", lab.worker_address,
                                                "--port", str(PORT)])
    edge = start_edge(lab, vpn_init_direct_lines(lab))
    deadline = time.monotonic() + 300  # a first start may convert the model's weights
    while worker_available(lab, edge, "worker-1") is not True:
        assert server.alive(), f"the inference server exited:\n{server.log()}"
        assert time.monotonic() < deadline, f"the inference server never became healthy\n{lab.logs()}"
        time.sleep(1.0)
    out = lab.workdir / "classify.json"
    r = lab.run("clients", [PY, "-m", "loadtest", "classify", "--url", edge.url + "/photo", "--api-key", edge.key,
                            "--ca", str(edge.ca), "--concurrency", "1", "--requests", "5", "--warmup", "0",
                            "--quiet", "--json", str(out)], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + lab.logs()
    report = json.loads(out.read_text())
    assert report["requests"] >= 5 and report["errors"] == 0, report
    assert "upstream" in report["hops_ms"] and "infer" in report["hops_ms"], sorted(report["hops_ms"])
    # Bound to the tunnel address: not even loopback inside the worker reaches it.
    r = lab.run("workers", connect_cmd("127.0.0.1", PORT, 2))
    assert "CONNECTED" not in r.stdout


def test_the_sidecar_entrypoint_brings_both_ends_up_with_the_worker_firewall(lab: Lab) -> None:
    """deploy/docker/wireguard-up.sh, the entrypoint of the `wireguard` image, run as the compose files
    and Kubernetes manifests run it: from the wg-quick files, the worker's input policy its own."""
    entry = str(ROOT / "deploy" / "docker" / "wireguard-up.sh")
    lab.worker_wg.down()
    lab.edge_wg.down()
    sides = {"edge": (lab.vpn_dir / "edge.conf", lab.edge_wg.iface, ""),
             "workers": (lab.vpn_dir / "worker-1.conf", lab.worker_wg.iface, str(PORT))}
    procs = {}
    for ns, (conf, iface, ports) in sides.items():
        env = {"WG_CONF": str(conf), "WG_INTERFACE": iface, **({"WG_FIREWALL_PORTS": ports} if ports else {})}
        procs[ns] = lab.start(f"wireguard-up-{ns}", ns, ["sh", entry], env)
        deadline = time.monotonic() + 20
        while lab.run(ns, ["env", *(f"{k}={v}" for k, v in env.items()), "sh", entry, "check"]).returncode != 0:
            assert procs[ns].alive() and time.monotonic() < deadline, lab.logs()
            time.sleep(0.1)
    rules = vpnlab.run(lab.ns("workers"), "nft", "list", "table", "inet", "worker")
    assert "policy drop" in rules and f'iifname "{lab.worker_wg.iface}" tcp dport {PORT} accept' in rules, rules
    upstream = start_upstream(lab)
    assert "hello from" in wait_fetch(lab, "edge", upstream + "/", 30).stdout
    assert_firewall_holds(lab)
    # SIGTERM (docker stop, a pod's end): the interface goes with the process.
    assert procs["workers"].stop() == 0, procs["workers"].log()
    assert lab.run("workers", ["ip", "link", "show", "dev", lab.worker_wg.iface]).returncode != 0
