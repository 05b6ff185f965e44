"""WireGuard configuration for the VPN leg between the edge and its workers
(issue 20): `edge-proxy vpn init` and `edge-proxy vpn add-worker`.

Pure configuration generation: wg-quick files for the edge (`edge.conf`, one
[Peer] per worker with its /32) and for each worker (`worker-K.conf`, the edge
as its only peer, with Endpoint and PersistentKeepalive so a worker behind NAT
keeps the path open). Keys are X25519 from `cryptography`, encoded in base64
exactly as `wg genkey` / `wg pubkey` print them. The edge takes the first host
address of the subnet, worker K the (K+1)-th.

`DIR/vpn.json` keeps what `add-worker` needs (subnet, endpoint, listen port,
public keys and addresses): never a private key. The edge's private key lives
only in `edge.conf`, each worker's only in its own `worker-K.conf`. Every file
is written 0600 in a 0700 directory; nothing existing is overwritten.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_WORKER_PORT = 8000
KEEPALIVE_SECONDS = 25  # below the usual 30 s UDP idle timeout of NAT tables
STATE_FILE = "vpn.json"
EDGE_FILE = "edge.conf"
STATE_VERSION = 1


class VpnError(Exception):
    """Bad input or a directory that cannot be used; the message says what to do."""


# --- keys -------------------------------------------------------------------------------------------------------

def generate_private_key() -> str:
    """A new private key, base64 of the 32 raw bytes (what `wg genkey` prints)."""
    raw = X25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def public_key(private_b64: str) -> str:
    """The public key of a base64 private key (what `wg pubkey` prints)."""
    try:
        raw = base64.b64decode(private_b64, validate=True)
    except ValueError:
        raise VpnError("a WireGuard key must be base64") from None
    if len(raw) != 32:
        raise VpnError(f"a WireGuard key has 32 bytes, this one has {len(raw)}")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


# --- addressing -------------------------------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_subnet(text: str) -> Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise VpnError(f"--subnet {text!r} is not a network in CIDR form (e.g. {DEFAULT_SUBNET}): {exc}") from None
    return net


def host_address(net: Network, index: int) -> str:
    """The index-th host address of net (0 = the edge, K = worker K)."""
    addr = next(itertools.islice(net.hosts(), index, None), None)
    if addr is None:
        usable = sum(1 for _ in itertools.islice(net.hosts(), index))
        raise VpnError(f"subnet {net} is exhausted: it has {usable} host addresses, the edge and "
                       f"{max(usable - 1, 0)} workers; start again with a larger --subnet (e.g. a /24 holds 253 "
                       "workers)")
    return str(addr)


def parse_endpoint(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT, as the workers reach the edge."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise VpnError(f"--endpoint {text!r} must be PUBLIC_HOST:PORT (e.g. edge.example.com:51820)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise VpnError(f"--endpoint {text!r}: write an IPv6 address in brackets, [2001:db8::1]:51820")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise VpnError(f"--endpoint {text!r}: the port must be a number from 1 to 65535")
    return host, number


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- state ------------------------------------------------------------------------------------------------------

@dataclass
class Peer:
    name: str
    address: str
    public_key: str


@dataclass
class VpnState:
    subnet: str
    endpoint: str
    listen_port: int
    edge: Peer
    workers: list[Peer] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, directory: Path) -> VpnState:
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(subnet=data["subnet"], endpoint=data["endpoint"], listen_port=int(data["listen_port"]),
                       edge=Peer(**data["edge"]), workers=[Peer(**w) for w in data["workers"]],
                       version=int(data.get("version", STATE_VERSION)))
        except FileNotFoundError:
            raise VpnError(f"{path} not found: create the directory with `edge-proxy vpn init --out {directory}`") \
                from None
        except (ValueError, KeyError, TypeError) as exc:
            raise VpnError(f"{path} is not a state file written by `edge-proxy vpn init` ({exc!r})") from None


# --- config text ------------------------------------------------------------------------------------------------

def edge_interface(state: VpnState, private_key: str) -> str:
    net = parse_subnet(state.subnet)
    return (f"# The edge's WireGuard interface, written by `edge-proxy vpn init`.\n"
            f"# Bring it up with `wg-quick up ./edge.conf` (or see docs/vpn.md for wireguard-go).\n"
            f"[Interface]\n"
            f"Address = {state.edge.address}/{net.prefixlen}\n"
            f"ListenPort = {state.listen_port}\n"
            f"PrivateKey = {private_key}\n")


def edge_peer(state: VpnState, worker: Peer) -> str:
    net = parse_subnet(state.subnet)
    return (f"\n# {worker.name}\n"
            f"[Peer]\n"
            f"PublicKey = {worker.public_key}\n"
            f"AllowedIPs = {worker.address}/{net.max_prefixlen}\n")


def worker_conf(state: VpnState, worker: Peer, private_key: str) -> str:
    net = parse_subnet(state.subnet)
    return (f"# {worker.name}'s WireGuard interface, written by `edge-proxy vpn`. It dials the edge and\n"
            f"# accepts traffic from the edge's address only. Copy it to the worker as /etc/wireguard/wg0.conf.\n"
            f"[Interface]\n"
            f"Address = {worker.address}/{net.max_prefixlen}\n"
            f"PrivateKey = {private_key}\n"
            f"\n"
            f"[Peer]\n"
            f"# the edge\n"
            f"PublicKey = {state.edge.public_key}\n"
            f"Endpoint = {state.endpoint}\n"
            f"AllowedIPs = {state.edge.address}/{net.max_prefixlen}\n"
            f"PersistentKeepalive = {KEEPALIVE_SECONDS}\n")


def direct_line(worker: Peer, pool: str, port: int) -> str:
    host = f"[{worker.address}]" if ":" in worker.address else worker.address
    return f"--direct {pool}=http://{host}:{port},id={worker.name}"


# --- files ------------------------------------------------------------------------------------------------------

def _write_new(path: Path, text: str) -> None:
    """Create path 0600; refuse to overwrite (a lost private key cannot be recovered)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise VpnError(f"{path} already exists; not overwriting it (move it away first)") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # the umask may have taken bits away, never added; make it exact


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def worker_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.conf"


def init(directory: Path, endpoint: str, workers: int, subnet: str = DEFAULT_SUBNET) -> VpnState:
    """Write edge.conf, worker-1.conf ... worker-N.conf and vpn.json into a new or empty directory
    (made 0700); nothing is written if any input is wrong."""
    if workers < 0:
        raise VpnError("--workers must be 0 or more")
    net = parse_subnet(subnet)
    host, port = parse_endpoint(endpoint)
    edge_private = generate_private_key()
    state = VpnState(subnet=str(net), endpoint=_endpoint_text(host, port), listen_port=port,
                     edge=Peer("edge", host_address(net, 0), public_key(edge_private)))
    host_address(net, workers)  # fail on exhaustion before writing anything
    if (directory / STATE_FILE).exists() or (directory / EDGE_FILE).exists():
        raise VpnError(f"{directory} already holds a VPN; add workers with `edge-proxy vpn add-worker {directory}`")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        # never chmod 0700 a directory that holds other things (--out /etc by mistake)
        raise VpnError(f"{directory} exists and is not an empty directory; give --out a new directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    privates = {}
    for k in range(1, workers + 1):
        private = generate_private_key()
        state.workers.append(Peer(f"worker-{k}", host_address(net, k), public_key(private)))
        privates[f"worker-{k}"] = private
    _write_new(directory / EDGE_FILE,
               edge_interface(state, edge_private) + "".join(edge_peer(state, w) for w in state.workers))
    for w in state.workers:
        _write_new(worker_file(directory, w.name), worker_conf(state, w, privates[w.name]))
    _write_new(directory / STATE_FILE, state.to_json())
    return state


def add_worker(directory: Path) -> tuple[VpnState, Peer]:
    """Add worker-(N+1): its config, a [Peer] appended to edge.conf, and the state file updated."""
    state = VpnState.load(directory)
    net = parse_subnet(state.subnet)
    index = 1 + max((int(w.name.rpartition("-")[2]) for w in state.workers
                     if w.name.rpartition("-")[2].isdigit()), default=0)
    taken = {w.address for w in state.workers} | {state.edge.address}
    address = host_address(net, index)
    while address in taken:  # only if someone edited vpn.json by hand
        index += 1
        address = host_address(net, index)
    edge_path = directory / EDGE_FILE
    if not edge_path.is_file():
        raise VpnError(f"{edge_path} not found; {directory} is incomplete (the edge's private key lives there)")
    private = generate_private_key()
    peer = Peer(f"worker-{index}", address, public_key(private))
    state.workers.append(peer)
    _write_new(worker_file(directory, peer.name), worker_conf(state, peer, private))
    with open(edge_path, "a") as f:
        f.write(edge_peer(state, peer))
    _replace(directory / STATE_FILE, state.to_json())
    return state, peer
