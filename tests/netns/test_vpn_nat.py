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

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.netns import vpnlab
from edge_proxy import vpn
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

