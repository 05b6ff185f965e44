"""The firewalled topology in network namespaces: workers behind a NAT with
an input policy that drops everything but established traffic. Proves both
halves: nothing can connect in to a worker, yet clients reach it through the
edge and its outbound tunnel. A delay relay on the router path emulates a
20 +/- 5 ms WAN, and the added delay shows up in the edge<->worker hop."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_proxy import auth, certs
from tests.harness import ROOT, Proc

SCRIPT = ROOT / "deploy" / "netns" / "topology.sh"
PY = sys.executable
EDGE_CLIENT_SIDE, EDGE_ROUTER_SIDE, ROUTER, WORKER = "10.231.1.1", "10.231.2.1", "10.231.2.2", "10.231.3.2"
UPSTREAM_PORT = 8000

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (run `make test` as root)"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("nft")),
                       reason="needs iproute2 and nftables (`apt-get install iproute2 nftables`)"),
]


class Topology:
    def __init__(self, prefix: str, workdir: Path) -> None:
        self.p = prefix
        self.workdir = workdir
        self.procs: list[Proc] = []

    def ns(self, name: str) -> str:
        return f"{self.p}-{name}"

    def start(self, name: str, ns: str, args: list[str]) -> Proc:
        proc = Proc(name, ["ip", "netns", "exec", self.ns(ns), *args], self.workdir)
        self.procs.append(proc)
        return proc

    def run(self, ns: str, args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(ns), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in self.procs)


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    prefix = "t" + secrets.token_hex(3)
    t0 = time.monotonic()
    up = subprocess.run([str(SCRIPT), "up", prefix], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    print(f"namespaces up in {time.monotonic() - t0:.2f} s")
    t = Topology(prefix, tmp_path)
    try:
        yield t
    finally:
        for p in t.procs:
            p.kill()
        subprocess.run([str(SCRIPT), "down", prefix], capture_output=True, timeout=60)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"


def connect_cmd(host: str, port: int, timeout: float) -> list[str]:
    return [PY, "-c", f"import socket; socket.create_connection(('{host}', {port}), timeout={timeout}); print('CONNECTED')"]


def requests(t: Topology, url: str, key: str, ca: Path, count: int, pool: str = "") -> list[dict]:
    r = t.run("clients", [PY, str(ROOT / "tests" / "netns" / "client.py"), url, key, str(ca), str(count), pool],
              timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def wait_workers(t: Topology, key: str, ca: Path, names: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (res,) = requests(t, f"https://{EDGE_CLIENT_SIDE}:8443/_edge/workers", key, ca, 1)
        if res["status"] == 200:
            ws = {w["id"]: w for w in json.loads(res["body"])["workers"]}
            if all(n in ws and ws[n]["available"] for n in names):
                return
        time.sleep(0.3)
    raise AssertionError(f"workers {names} never became available\n{t.logs()}")


def start_edge_and_upstream(t: Topology, tmp_path: Path) -> tuple[str, str, Path]:
    pki = tmp_path / "pki"
    files = certs.make_all(pki, ["localhost", EDGE_CLIENT_SIDE, EDGE_ROUTER_SIDE, ROUTER])
    key = auth.create(pki / "keys.json", "client", auth.CLIENT_KEY_PREFIX, admin=True)  # reads /_edge/workers
    token = auth.create(pki / "tokens.json", "workers", auth.WORKER_TOKEN_PREFIX)
    t.start("upstream", "workers", [PY, str(ROOT / "tests" / "relay" / "upstream.py"), str(UPSTREAM_PORT), "0.0.0.0"])
    t.start("edge", "edge", [PY, "-m", "edge_proxy", "serve", "--listen", "0.0.0.0:8443", "--cert", str(files["cert"]),
                             "--key", str(files["key"]), "--client-keys", str(pki / "keys.json"),
                             "--worker-tokens", str(pki / "tokens.json"), "--rate-limit", "0"])
    return key, token, files["ca"]


def test_workers_accept_no_inbound_yet_serve_through_the_edge_with_wan_delay_attributed(topo: Topology,
                                                                                       tmp_path: Path):
    t = topo
    key, token, ca = start_edge_and_upstream(t, tmp_path)
    t.start("relay", "router", [PY, str(ROOT / "deploy" / "netns" / "delay_relay.py"), f"{ROUTER}:9443",
                                f"{EDGE_ROUTER_SIDE}:8443", "--delay-ms", "20", "--jitter-ms", "5"])
    for name, edge_addr, pool in (("direct", f"{EDGE_ROUTER_SIDE}:8443", "lan"), ("wan", f"{ROUTER}:9443", "wan")):
        t.start(f"agent-{name}", "workers", [PY, "-m", "worker_agent", "--edge", f"wss://{edge_addr}/_edge/tunnel",
                                             "--token", token, "--ca", str(ca), "--upstream",
                                             f"http://127.0.0.1:{UPSTREAM_PORT}", "--pool", pool, "--id", name,
                                             "--capacity", "4"])
    wait_workers(t, key, ca, ["direct", "wan"])

    # Half 1: nothing connects IN to a worker. The edge has no route at all...
    r = t.run("edge", connect_cmd(WORKER, UPSTREAM_PORT, 2))
    assert "CONNECTED" not in r.stdout and "unreachable" in r.stderr.lower(), r.stdout + r.stderr
    # ...and even a host with a route (the router) is dropped by the worker's firewall,
    r = t.run("router", connect_cmd(WORKER, UPSTREAM_PORT, 2))
    assert "CONNECTED" not in r.stdout and "timed out" in r.stderr.lower(), r.stdout + r.stderr
    # while the upstream is listening (seen from inside the workers' namespace).
    r = t.run("workers", connect_cmd(WORKER, UPSTREAM_PORT, 2))
    assert "CONNECTED" in r.stdout, r.stderr

    # Half 2: clients -> edge -> tunnel -> worker works, for both pools.
    lan = requests(t, f"https://{EDGE_CLIENT_SIDE}:8443/", key, ca, 30, "lan")
    wan = requests(t, f"https://{EDGE_CLIENT_SIDE}:8443/", key, ca, 30, "wan")
    assert all(x["status"] == 200 for x in lan + wan), t.logs()
    assert "hello from" in lan[0]["body"]

    # The 20 +/- 5 ms each way shows up in the edge<->worker hop (tunnel - agent),
    # not in the worker's own hops; measured by the load tester from the clients' side.
    reports = {}
    for pool in ("lan", "wan"):
        out = tmp_path / f"loadtest-{pool}.json"
        r = t.run("clients", [PY, "-m", "loadtest", "ping", "--url", f"https://{EDGE_CLIENT_SIDE}:8443/",
                              "--api-key", key, "--ca", str(ca), "--pool", pool, "--rate", "20",
                              "--requests", "60", "--warmup", "1", "--quiet", "--json", str(out)], timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr + t.logs()
        reports[pool] = json.loads(out.read_text())
        assert reports[pool]["errors"] == 0 and reports[pool]["requests"] >= 60

    def hop(pool: str, name: str) -> float:
        return float(reports[pool]["hops_ms"][name]["p50"])

    added = hop("wan", "net_edge_worker") - hop("lan", "net_edge_worker")
    print(f"edge<->worker p50: lan {hop('lan', 'net_edge_worker'):.2f} ms, wan {hop('wan', 'net_edge_worker'):.2f} ms,"
          f" added {added:.2f} ms")
    assert 30.0 <= added <= 70.0, f"expected ~40 ms (2 x 20 ms) added to the edge<->worker hop, got {added:.2f}"
    assert abs(hop("wan", "agent") - hop("lan", "agent")) < 10.0
    # The client<->edge hop did not see it: the delay is on the tunnel's path only.
    assert abs(hop("wan", "net_client_edge") - hop("lan", "net_client_edge")) < 10.0
    # The heartbeat RTT of the WAN tunnel shows the relay's two ways too.
    rtt = reports["wan"]["hops_ms"].get("tunnel_rtt")
    if rtt is not None:
        assert rtt["p50"] >= 30.0, rtt


def test_partition_between_edge_and_worker_is_detected_and_healed(topo: Topology, tmp_path: Path):
    t = topo
    key, token, ca = start_edge_and_upstream(t, tmp_path)
    t.start("agent", "workers", [PY, "-m", "worker_agent", "--edge", f"wss://{EDGE_ROUTER_SIDE}:8443/_edge/tunnel",
                                 "--token", token, "--ca", str(ca), "--upstream", f"http://127.0.0.1:{UPSTREAM_PORT}",
                                 "--id", "w1"])
    wait_workers(t, key, ca, ["w1"])
    link = ["ip", "-n", t.ns("router"), "link", "set", f"{t.p}re"]
    subprocess.run([*link, "down"], check=True)
    cut = time.monotonic()
    # The edge notices the silent tunnel (3 s) and stops routing: a fast 503, no hang.
    deadline = cut + 8
    while time.monotonic() < deadline:
        (res,) = requests(t, f"https://{EDGE_CLIENT_SIDE}:8443/", key, ca, 1)
        if res["status"] == 503:
            break
        time.sleep(0.2)
    assert res["status"] == 503, res
    assert time.monotonic() - cut < 3.0 + 3.0  # dead_after plus the probe's own start-up on a loaded machine
    subprocess.run([*link, "up"], check=True)
    healed = time.monotonic()
    wait_workers(t, key, ca, ["w1"], timeout=15)
    back = time.monotonic() - healed
    print(f"partition healed; worker back after {back:.2f} s")
    assert back < 5.0 + 1.0
    (res,) = requests(t, f"https://{EDGE_CLIENT_SIDE}:8443/", key, ca, 1)
    assert res["status"] == 200
