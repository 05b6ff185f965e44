"""Userspace WireGuard (wireguard-go) inside a network namespace, brought up
from a wg-quick file the way docs/vpn.md tells users to by hand: the process,
Address, MTU, the link up, one route per AllowedIPs where the Address is a
/32, then `wg setconf` with the `wg-quick strip`ped file (last, so a
PersistentKeepalive goes out at once and a worker behind NAT is reachable
without waiting 25 s).

Used by tests/netns/test_vpn_nat.py and bench/wss_vs_vpn.py. Needs root,
iproute2, wireguard-tools, wireguard-go and /dev/net/tun; `missing()` names
what is absent. Several instances on one host need distinct interface names:
their control sockets share /var/run/wireguard.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SOCKETS = Path("/var/run/wireguard")
MTU = 1420


def missing() -> str | None:
    """One line naming what this machine lacks for userspace WireGuard in namespaces, or None."""
    if os.geteuid() != 0:
        return "WireGuard in network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("wg", "wireguard-tools"),
                          ("wg-quick", "wireguard-tools"), ("wireguard-go", "wireguard-go")):
        if not shutil.which(tool):
            return f"needs {tool} (`apt-get install --no-install-recommends {package}`)"
    if not os.path.exists("/dev/net/tun"):
        return "needs the TUN device /dev/net/tun for wireguard-go"
    return None


def conf_value(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep and k.strip() == key:
            return v.strip()
    raise KeyError(f"{key} not in {path}")


def run(ns: str, *args: str, timeout: float = 30) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"in {ns}: {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


class WireGuard:
    """One wireguard-go interface in namespace `ns`, configured from a wg-quick file."""

    def __init__(self, ns: str, iface: str, conf: Path, workdir: Path) -> None:
        if len(iface) > 15:
            raise ValueError(f"interface name {iface!r} is longer than 15 characters")
        self.ns, self.iface, self.conf, self.workdir = ns, iface, conf, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"wireguard-go-{iface}.log"

    def up(self, timeout: float = 20) -> None:
        stripped = self.workdir / f"{self.iface}.stripped"
        out = subprocess.run(["wg-quick", "strip", str(self.conf)], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"wg-quick strip {self.conf}: {out.stderr.strip()}")
        fd = os.open(stripped, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(out.stdout)
        with open(self.log_path, "ab") as log:  # -f: stay in the foreground, so this process is ours to stop
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "wireguard-go", "-f", self.iface],
                                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LOG_LEVEL": "error"},
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (SOCKETS / f"{self.iface}.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go {self.iface} did not start: {self.log()}")
            time.sleep(0.05)
        address = conf_value(self.conf, "Address")
        run(self.ns, "ip", "address", "add", address, "dev", self.iface)
        run(self.ns, "ip", "link", "set", self.iface, "mtu", str(MTU), "up")
        if address.endswith("/32") or address.endswith("/128"):
            for allowed in conf_value(self.conf, "AllowedIPs").split(","):
                run(self.ns, "ip", "route", "add", allowed.strip(), "dev", self.iface)
        run(self.ns, "wg", "setconf", self.iface, str(stripped))

    def down(self, timeout: float = 10) -> None:
        """Stop the process: its interface, address and routes go with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        deadline = time.monotonic() + timeout
        while (SOCKETS / f"{self.iface}.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def latest_handshake(self) -> int:
        """Seconds since the epoch of the newest handshake with any peer (0: none yet)."""
        out = run(self.ns, "wg", "show", self.iface, "latest-handshakes")
        return max((int(line.split()[1]) for line in out.splitlines() if line.strip()), default=0)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""
