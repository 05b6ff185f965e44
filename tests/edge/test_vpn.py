"""`edge-proxy vpn`: addressing, key encoding, file modes, and the CLI's output."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_proxy import vpn
from edge_proxy.direct_spec import parse_direct, parse_lines
from tests.harness import ROOT


def parse(path: Path) -> list[tuple[str, dict[str, str]]]:
    sections: list[tuple[str, dict[str, str]]] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            sections.append((line.strip("[]"), {}))
        elif line:
            k, _, v = line.partition("=")
            sections[-1][1][k.strip()] = v.strip()
    return sections


def test_public_key_matches_cryptography_x25519_and_encodes_like_wg():
    private = vpn.generate_private_key()
    raw = base64.b64decode(private, validate=True)
    assert len(raw) == 32 and len(private) == 44 and private.endswith("=")
    expected = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64decode(vpn.public_key(private)) == expected
    # A known vector (RFC 7748 section 6.1, Alice's key pair)
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    alice_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert vpn.public_key(base64.b64encode(alice).decode()) == base64.b64encode(alice_pub).decode()
    assert vpn.generate_private_key() != private


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"short").decode()])
def test_bad_key_is_a_clear_error(bad: str):
    with pytest.raises(vpn.VpnError, match="base64|32 bytes"):
        vpn.public_key(bad)


def test_edge_takes_the_first_host_and_workers_the_next():
    net = vpn.parse_subnet("10.77.0.0/24")
    assert [vpn.host_address(net, i) for i in (0, 1, 2, 252)] == ["10.77.0.1", "10.77.0.2", "10.77.0.3",
                                                                   "10.77.0.253"]
    six = vpn.parse_subnet("fd00:77::/120")
    assert vpn.host_address(six, 0) == "fd00:77::1"


def test_subnet_exhaustion_is_a_clear_error_and_writes_nothing(tmp_path: Path):
    net = vpn.parse_subnet("10.77.0.0/30")  # two host addresses: the edge and one worker
    assert vpn.host_address(net, 1) == "10.77.0.2"
    with pytest.raises(vpn.VpnError, match=r"exhausted: it has 2 host addresses, the edge and 1 workers"):
        vpn.host_address(net, 2)
    with pytest.raises(vpn.VpnError, match="exhausted"):
        vpn.init(tmp_path / "v", "edge.example:51820", 2, "10.77.0.0/30")
    assert not (tmp_path / "v").exists()
    vpn.init(tmp_path / "w", "edge.example:51820", 1, "10.77.0.0/30")
    with pytest.raises(vpn.VpnError, match="exhausted"):
        vpn.add_worker(tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["edge.conf", "vpn.json", "worker-1.conf"]
    assert len(parse(tmp_path / "w" / "edge.conf")) == 2


@pytest.mark.parametrize("subnet", ["10.77.0.1/24", "banana", "10.77.0.0/33"])
def test_bad_subnet_is_a_clear_error(subnet: str):
    with pytest.raises(vpn.VpnError, match="CIDR"):
        vpn.parse_subnet(subnet)


@pytest.mark.parametrize("endpoint,expected", [("edge.example.com:51820", ("edge.example.com", 51820)),
                                               ("[2001:db8::1]:443", ("2001:db8::1", 443))])
def test_endpoint(endpoint: str, expected: tuple[str, int]):
    assert vpn.parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["edge.example.com", ":51820", "edge:0", "edge:70000", "edge:x",
                                      "2001:db8::1:51820"])
def test_bad_endpoint_is_a_clear_error(endpoint: str):
    with pytest.raises(vpn.VpnError, match="--endpoint"):
        vpn.parse_endpoint(endpoint)


def test_init_writes_matching_configs_with_private_modes(tmp_path: Path):
    d = tmp_path / "vpn"
    state = vpn.init(d, "edge.example.com:51820", 2)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    (edge_if, edge_ifv), *peers = parse(d / "edge.conf")
    assert edge_if == "Interface" and edge_ifv["Address"] == "10.77.0.1/24" and edge_ifv["ListenPort"] == "51820"
    assert vpn.public_key(edge_ifv["PrivateKey"]) == state.edge.public_key
    assert [(s, v["AllowedIPs"]) for s, v in peers] == [("Peer", "10.77.0.2/32"), ("Peer", "10.77.0.3/32")]
    for k, (_, peer) in enumerate(peers, start=1):
        (_, wi), (ps, wp) = parse(d / f"worker-{k}.conf")
        assert wi["Address"] == f"10.77.0.{k + 1}/32"
        assert vpn.public_key(wi["PrivateKey"]) == peer["PublicKey"]  # the edge knows this worker's key
        assert ps == "Peer" and wp == {"PublicKey": state.edge.public_key, "Endpoint": "edge.example.com:51820",
                                       "AllowedIPs": "10.77.0.1/32", "PersistentKeepalive": "25"}
    # the state file holds no private key
    text = (d / "vpn.json").read_text()
    privates = [parse(d / n)[0][1]["PrivateKey"] for n in ("edge.conf", "worker-1.conf", "worker-2.conf")]
    assert not any(p in text for p in privates)
    assert json.loads(text)["workers"][1] == {"name": "worker-2", "address": "10.77.0.3",
                                              "public_key": peers[1][1]["PublicKey"]}


def test_init_never_overwrites_and_add_worker_appends_a_peer(tmp_path: Path):
    d = tmp_path / "vpn"
    vpn.init(d, "[2001:db8::1]:51820", 1, "10.9.0.0/29")
    edge_before = (d / "edge.conf").read_text()
    with pytest.raises(vpn.VpnError, match="already holds a VPN"):
        vpn.init(d, "edge:1", 1)
    assert (d / "edge.conf").read_text() == edge_before
    other = tmp_path / "etc"
    other.mkdir(mode=0o755)
    (other / "passwd").write_text("x")
    with pytest.raises(vpn.VpnError, match="not an empty directory"):
        vpn.init(other, "edge:1", 1)
    assert stat.S_IMODE(other.stat().st_mode) == 0o755 and [p.name for p in other.iterdir()] == ["passwd"]
    _, peer = vpn.add_worker(d)
    assert (peer.name, peer.address) == ("worker-2", "10.9.0.3")
    assert (d / "edge.conf").read_text().startswith(edge_before)
    assert parse(d / "edge.conf")[-1] == ("Peer", {"PublicKey": peer.public_key, "AllowedIPs": "10.9.0.3/32"})
    assert parse(d / "worker-2.conf")[1][1]["Endpoint"] == "[2001:db8::1]:51820"
    assert stat.S_IMODE((d / "worker-2.conf").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "vpn.json").stat().st_mode) == 0o600
    assert [w.name for w in vpn.VpnState.load(d).workers] == ["worker-1", "worker-2"]


def test_add_worker_to_a_directory_without_state_is_a_clear_error(tmp_path: Path):
    with pytest.raises(vpn.VpnError, match="vpn init"):
        vpn.add_worker(tmp_path)
    (tmp_path / "vpn.json").write_text("{}")
    with pytest.raises(vpn.VpnError, match="not a state file"):
        vpn.add_worker(tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_proxy", "vpn", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_prints_direct_lines_and_clear_errors(tmp_path: Path):
    d = tmp_path / "vpn"
    r = run_cli("init", "--out", str(d), "--endpoint", "edge.example.com:51820", "--workers", "2",
                "--pool", "gpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["--direct gpu=http://10.77.0.2:8000,id=worker-1",
                                     "--direct gpu=http://10.77.0.3:8000,id=worker-2"]
    assert "pass these to `edge-proxy serve`" in r.stderr and "Traceback" not in r.stderr
    # `serve --direct` takes them as printed, and so does a --directs file.
    specs = [parse_direct(line.removeprefix("--direct ")) for line in r.stdout.splitlines()]
    assert [(s.pool, s.url, s.id) for s in specs] == [("gpu", "http://10.77.0.2:8000", "worker-1"),
                                                      ("gpu", "http://10.77.0.3:8000", "worker-2")]
    assert parse_lines(r.stdout, "directs") == specs
    r = run_cli("add-worker", str(d))
    assert r.returncode == 0 and r.stdout == "--direct default=http://10.77.0.4:8000,id=worker-3\n"
    r = run_cli("init", "--out", str(tmp_path / "x"), "--endpoint", "edge", "--workers", "1")
    assert r.returncode != 0 and "PUBLIC_HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("add-worker", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "vpn init" in r.stderr and "Traceback" not in r.stderr
