"""The configs `edge-proxy vpn` writes are accepted by the real WireGuard tools
and carry traffic: `wg-quick strip` accepts every file, `wg setconf` accepts
the result on a userspace interface (`wireguard-go`) in a network namespace
of the test's own, `wg-quick up` brings a worker config up, and the edge and a
worker namespace reach HTTP servers in each other over the tunnel addresses
only (the worker behind the firewall docs/vpn.md gives).

All addresses live inside the test's namespaces (a veth pair between them);
nothing is sent outside. Userspace WireGuard on one host needs a distinct
interface name per instance: the control sockets share /var/run/wireguard."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_proxy import vpn
from tests.harness import ROOT, Proc

PY = sys.executable
UNDERLAY_EDGE, UNDERLAY_WORKER = "10.232.0.1", "10.232.0.2"  # the veth pair, inside the namespaces only
WG_PORT = 51820
SOCKETS = Path("/var/run/wireguard")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="WireGuard in network namespaces needs root"),
    pytest.mark.skipif(not shutil.which("ip"), reason="needs iproute2 (`apt-get install iproute2`)"),
    pytest.mark.skipif(not (shutil.which("wg") and shutil.which("wg-quick")),
                       reason="needs wireguard-tools (`apt-get install wireguard-tools`)"),
    pytest.mark.skipif(not shutil.which("wireguard-go"),
                       reason="needs wireguard-go (`apt-get install wireguard-go`)"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun for wireguard-go"),
]


def sh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}): {r.stderr}"
    return r


def conf_value(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep and k.strip() == key:
            return v.strip()
    raise AssertionError(f"{key} not in {path}")


class Namespaces:
    """Namespaces and userspace WireGuard interfaces this test owns, removed at the end."""

    def __init__(self, workdir: Path) -> None:
        self.prefix = "v" + secrets.token_hex(3)
        self.workdir = workdir
        self.names: list[str] = []
        self.procs: list[Proc] = []
        self.daemons: dict[str, Proc] = {}  # wireguard-go by role

    def add(self, role: str) -> str:
        ns = f"{self.prefix}-{role}"
        sh("ip", "netns", "add", ns)
        self.names.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def wireguard(self, ns: str, role: str) -> str:
        """A wireguard-go interface in ns, in the foreground so this test owns its process."""
        iface = f"{self.prefix}{role}"  # distinct per instance: the control sockets share a folder
        proc = Proc(f"wireguard-go-{role}", ["ip", "netns", "exec", ns, "wireguard-go", "-f", iface], self.workdir,
                    env={"LOG_LEVEL": "error"})
        self.procs.append(proc)
        self.daemons[role] = proc
        deadline = time.monotonic() + 20
        while not (SOCKETS / f"{iface}.sock").exists():
            assert proc.alive() and time.monotonic() < deadline, f"wireguard-go did not start:\n{proc.log()}"
            time.sleep(0.05)
        return iface

    def setconf(self, ns: str, iface: str, conf: Path) -> Path:
        """`wg-quick strip` then `wg setconf`, as docs/vpn.md does for wireguard-go."""
        stripped = self.workdir / f"{iface}.stripped"
        stripped.write_text(sh("wg-quick", "strip", str(conf)).stdout)
        sh("ip", "netns", "exec", ns, "wg", "setconf", iface, str(stripped))
        return stripped

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert self.prefix not in left, f"namespaces left behind: {left}"


@pytest.fixture
def spaces(tmp_path: Path) -> Iterator[Namespaces]:
    n = Namespaces(tmp_path)
    try:
        yield n
    finally:
        n.close()


def test_wg_quick_strip_and_wg_setconf_accept_every_generated_file(spaces: Namespaces, tmp_path: Path):
    d = tmp_path / "vpn"
    vpn.init(d, f"{UNDERLAY_EDGE}:{WG_PORT}", 2)
    vpn.add_worker(d)
    ns = spaces.add("cfg")  # no routes but loopback: a worker's keepalive goes nowhere
    state = vpn.VpnState.load(d)
    for name in ("edge", "worker-1", "worker-2", "worker-3"):
        conf = d / f"{name}.conf"
        iface = spaces.wireguard(ns, name[0] + name[-1])
        spaces.setconf(ns, iface, conf)
        dump = sh("ip", "netns", "exec", ns, "wg", "show", iface, "dump").stdout.splitlines()
        private, public, port, _ = dump[0].split("\t")
        assert private == conf_value(conf, "PrivateKey") and public == vpn.public_key(private)
        peers = [line.split("\t") for line in dump[1:]]
        if name == "edge":
            assert port == str(WG_PORT)
            assert sorted((p[0], p[3]) for p in peers) == sorted((w.public_key, f"{w.address}/32") for w in state.workers)
        else:
            ((key, _psk, endpoint, allowed, _hs, _rx, _tx, keepalive),) = peers
            assert (key, endpoint, allowed, keepalive) == (state.edge.public_key, f"{UNDERLAY_EDGE}:{WG_PORT}",
                                                           f"{state.edge.address}/32", "25")


def fetch_cmd(url: str, timeout: float) -> list[str]:
    return [PY, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout={timeout}).read().decode())"]


def test_edge_and_worker_reach_each_other_over_the_tunnel_only(spaces: Namespaces, tmp_path: Path):
    d = tmp_path / "vpn"
    state = vpn.init(d, f"{UNDERLAY_EDGE}:{WG_PORT}", 1)
    worker = state.workers[0]
    edge_ns, worker_ns = spaces.add("edge"), spaces.add("work")
    sh("ip", "-n", edge_ns, "link", "add", "ve0", "type", "veth", "peer", "name", "vw0", "netns", worker_ns)
    sh("ip", "-n", edge_ns, "address", "add", f"{UNDERLAY_EDGE}/24", "dev", "ve0")
    sh("ip", "-n", worker_ns, "address", "add", f"{UNDERLAY_WORKER}/24", "dev", "vw0")
    sh("ip", "-n", edge_ns, "link", "set", "ve0", "up")
    sh("ip", "-n", worker_ns, "link", "set", "vw0", "up")
    worker_iface = f"{spaces.prefix}w"
    if shutil.which("nft"):  # the worker's firewall of docs/vpn.md, loaded before WireGuard as at boot
        sh("ip", "netns", "exec", worker_ns, "nft", "-f", str(docs_firewall(tmp_path, worker_iface)))
    # The interfaces as wg-quick would set them up: keys and peers, Address, MTU, a route per AllowedIPs.
    for ns, role, conf in ((edge_ns, "e", d / "edge.conf"), (worker_ns, "w", d / "worker-1.conf")):
        iface = spaces.wireguard(ns, role)
        spaces.setconf(ns, iface, conf)
        sh("ip", "-n", ns, "address", "add", conf_value(conf, "Address"), "dev", iface)
        sh("ip", "-n", ns, "link", "set", iface, "mtu", "1420", "up")
        if ns == worker_ns:
            sh("ip", "-n", ns, "route", "add", conf_value(conf, "AllowedIPs"), "dev", iface)
    # A tiny HTTP server bound to the edge's tunnel address only.
    www = tmp_path / "www"
    www.mkdir()
    token = secrets.token_hex(8)
    (www / "token.txt").write_text(token)
    server = Proc("http", ["ip", "netns", "exec", edge_ns, PY, "-m", "http.server", "8000", "--bind",
                           state.edge.address, "--directory", str(www)], tmp_path)
    spaces.procs.append(server)
    url = f"http://{state.edge.address}:8000/token.txt"
    deadline = time.monotonic() + 30  # the handshake, then the server's start
    while True:
        r = subprocess.run(["ip", "netns", "exec", worker_ns, *fetch_cmd(url, 2)], capture_output=True, text=True,
                           timeout=30, cwd=ROOT)
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, (f"the worker never reached {url} over WireGuard: {r.stderr[-500:]}\n"
                                             + "\n".join(p.log() for p in spaces.procs))
        time.sleep(0.2)
    assert r.stdout.strip() == token
    handshakes = sh("ip", "netns", "exec", worker_ns, "wg", "show", worker_iface, "latest-handshakes").stdout
    assert int(handshakes.split()[1]) > 0, handshakes
    endpoints = sh("ip", "netns", "exec", edge_ns, "wg", "show", f"{spaces.prefix}e", "endpoints").stdout
    assert endpoints.split() == [worker.public_key, f"{UNDERLAY_WORKER}:{endpoints.split()[1].rsplit(':', 1)[1]}"]
    # The other way, as the edge will reach a worker's inference server: through the worker's firewall
    # (inbound only on the WireGuard interface), to a server listening on every address.
    spaces.procs.append(Proc("worker-http", ["ip", "netns", "exec", worker_ns, PY, "-m", "http.server", "8000",
                                             "--bind", "0.0.0.0", "--directory", str(www)], tmp_path))
    worker_url = f"http://{worker.address}:8000/token.txt"
    deadline = time.monotonic() + 30
    while True:
        r = subprocess.run(["ip", "netns", "exec", edge_ns, *fetch_cmd(worker_url, 2)], capture_output=True,
                           text=True, timeout=30, cwd=ROOT)
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, f"the edge never reached {worker_url}: {r.stderr[-500:]}"
        time.sleep(0.2)
    assert r.stdout.strip() == token
    if shutil.which("nft"):  # the worker's own address on the underlay is closed to the edge
        r = subprocess.run(["ip", "netns", "exec", edge_ns,
                            *fetch_cmd(f"http://{UNDERLAY_WORKER}:8000/token.txt", 1)],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode != 0 and "timed out" in r.stderr, r.stderr[-500:]
    # Without the worker's WireGuard neither request can arrive: the servers are reached over the tunnel only.
    spaces.daemons["w"].stop()  # the worker's wireguard-go: its interface and route go with it
    for ns, target in ((worker_ns, url), (edge_ns, worker_url)):
        r = subprocess.run(["ip", "netns", "exec", ns, *fetch_cmd(target, 2)], capture_output=True, text=True,
                           timeout=30, cwd=ROOT)
        assert r.returncode != 0 and token not in r.stdout


def docs_firewall(tmp_path: Path, iface: str) -> Path:
    """The nftables ruleset of docs/vpn.md, "The worker's firewall", for this test's interface name."""
    text = (ROOT / "docs" / "vpn.md").read_text()
    start = text.index("table inet worker {")
    rules = text[start:text.index("```", start)].replace('"wg0"', f'"{iface}"')
    assert f'iifname "{iface}"' in rules and "policy drop" in rules
    path = tmp_path / "worker.nft"
    path.write_text(rules)
    return path


def test_wg_quick_up_brings_a_worker_config_up_with_its_address_and_route(spaces: Namespaces, tmp_path: Path):
    """What docs/vpn.md tells users to run; without the kernel module wg-quick falls back to wireguard-go."""
    d = tmp_path / "vpn"
    state = vpn.init(d, f"{UNDERLAY_EDGE}:{WG_PORT}", 1)
    ns = spaces.add("quick")
    iface = f"{spaces.prefix}q"
    conf = tmp_path / f"{iface}.conf"  # wg-quick names the interface after the file
    conf.write_text((d / "worker-1.conf").read_text())
    conf.chmod(0o600)
    up = subprocess.run(["ip", "netns", "exec", ns, "wg-quick", "up", str(conf)], capture_output=True, text=True,
                        timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        addr = sh("ip", "-n", ns, "-o", "address", "show", "dev", iface).stdout
        assert f"inet {state.workers[0].address}/32" in addr
        route = sh("ip", "-n", ns, "route", "get", state.edge.address).stdout
        assert f"dev {iface}" in route
        assert "mtu 1420" in sh("ip", "-n", ns, "link", "show", iface).stdout
    finally:  # deleting the interface ends the userspace process wg-quick may have started
        down = subprocess.run(["ip", "netns", "exec", ns, "wg-quick", "down", str(conf)], capture_output=True,
                              text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert iface not in sh("ip", "-n", ns, "link").stdout
