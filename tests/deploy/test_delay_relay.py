"""deploy/netns/delay_relay.py: the WAN stand-in of the namespace tests and the
WSS-against-WireGuard bench. Its delay law is checked with a seeded random
source; the relay itself runs as a real process on loopback between real
sockets, and the delays and losses are measured (with bounds wide enough for
a loaded machine: a relay can be late, never early)."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.harness import ROOT, free_port

SCRIPT = ROOT / "deploy" / "netns" / "delay_relay.py"
_spec = importlib.util.spec_from_file_location("delay_relay", SCRIPT)
assert _spec is not None and _spec.loader is not None
relay_mod = importlib.util.module_from_spec(_spec)
sys.modules["delay_relay"] = relay_mod
_spec.loader.exec_module(relay_mod)


# --- the law, pure ----------------------------------------------------------------------------------------------

def test_law_keeps_order_unless_asked_to_reorder() -> None:
    law = relay_mod.Law(delay=0.020, jitter=0.005)
    rng = random.Random(1)
    last, dues = 0.0, []
    for i in range(1000):
        due = law.due(i * 0.0001, last, rng)  # datagrams 0.1 ms apart, jitter 10 ms wide
        assert due is not None and due >= i * 0.0001 + 0.015 - 1e-12
        dues.append(due)
        last = due
    assert dues == sorted(dues)
    reorder = relay_mod.Law(delay=0.020, jitter=0.005, reorder=True)
    free = [reorder.due(i * 0.0001, 0.0, rng) for i in range(1000)]
    assert free != sorted(free)  # type: ignore[type-var]
    assert all(d is not None and 0.015 - 1e-12 <= d - i * 0.0001 <= 0.025 + 1e-12 for i, d in enumerate(free))


def test_law_drops_the_given_share_and_tcp_pays_a_retransmission_instead() -> None:
    rng = random.Random(7)
    law = relay_mod.Law(delay=0.010, jitter=0.0, loss=0.25, rto=0.2)
    dropped = sum(law.due(0.0, 0.0, rng) is None for _ in range(10_000))
    assert 2200 < dropped < 2800
    late = [law.due_stream(0.0, 0.0, rng, 1000) for _ in range(10_000)]  # one segment per chunk
    assert set(round(x, 6) for x in late) == {0.010, 0.210}
    assert 2200 < sum(x > 0.1 for x in late) < 2800
    # A 10-segment chunk is hit when any of its segments is: 1 - 0.75 ** 10 = 94 %.
    big = [law.due_stream(0.0, 0.0, rng, 10 * relay_mod.SEGMENT) for _ in range(10_000)]
    assert 9200 < sum(x > 0.1 for x in big) < 9700
    # A late chunk holds back the one after it: order on a byte stream.
    assert law.due_stream(0.001, 0.210, rng) >= 0.210


# --- the relay, for real ----------------------------------------------------------------------------------------

def start_relay(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once it listens
    assert line.startswith("delay relay"), line + (proc.stdout.read() if proc.poll() is not None else "")
    return proc


@pytest.fixture
def relays() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.terminate()
        p.wait(10)


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Echo(asyncio.DatagramProtocol):
    """The target: answers each datagram with itself, counts what it got."""

    def __init__(self) -> None:
        self.received = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        assert self.transport is not None
        self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.arrivals: list[tuple[bytes, float]] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.arrivals.append((data, time.monotonic()))


async def exchange(relay_port: int, target: Echo, count: int, gap: float, settle: float,
                   clients: int = 1) -> list[tuple[dict[int, float], list[tuple[bytes, float]]]]:
    """Each client sends `count` numbered datagrams `gap` apart through the relay; returns per client
    (send times by number, arrivals). Waits until the answers stop coming (`settle` of silence)."""
    loop = asyncio.get_running_loop()
    ends = [await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", relay_port)) for _ in range(clients)]
    sent: list[dict[int, float]] = [{} for _ in ends]
    for i in range(count):
        for c, (transport, _proto) in enumerate(ends):
            sent[c][i] = time.monotonic()
            transport.sendto(f"{c}:{i}".encode())
        await asyncio.sleep(gap)
    total = lambda: sum(len(p.arrivals) for _t, p in ends)  # noqa: E731
    last, quiet_since = -1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if total() != last:
            last, quiet_since = total(), time.monotonic()
        elif time.monotonic() - quiet_since > settle:
            break
        await asyncio.sleep(0.02)
    for transport, _p in ends:
        transport.close()
    return [(s, p.arrivals) for s, (_t, p) in zip(sent, ends, strict=True)]


async def with_echo(fn):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    port = udp_port()
    transport, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", port))
    try:
        return await fn(port, echo)
    finally:
        transport.close()


def test_udp_delays_both_directions_within_bounds_and_keeps_order(relays: list[subprocess.Popen[str]]) -> None:
    async def run(target_port: int, echo: Echo) -> None:
        listen = udp_port()
        relays.append(start_relay(f"127.0.0.1:{listen}", f"127.0.0.1:{target_port}", "--udp", "--delay-ms", "20",
                                  "--jitter-ms", "5", "--seed", "3"))
        ((sent, arrivals),) = await exchange(listen, echo, 200, 0.002, 0.5)
        assert echo.received == 200 and len(arrivals) == 200  # no loss asked, none on loopback
        numbers = [int(data.decode().split(":")[1]) for data, _t in arrivals]
        assert numbers == list(range(200)), "jitter reordered datagrams without --reorder"
        rtts = [(t - sent[n]) * 1000 for n, (_d, t) in zip(numbers, arrivals, strict=True)]
        print(f"udp rtt ms: min {min(rtts):.2f} p50 {statistics.median(rtts):.2f} max {max(rtts):.2f}")
        assert min(rtts) >= 2 * (20 - 5) - 0.5, "a datagram arrived before its delay"
        assert 30 <= statistics.median(rtts) <= 60  # 2 x (20 +/- 5), late by the machine's load at most
        assert statistics.pstdev(rtts) > 0.5, "no jitter at all"

    asyncio.run(with_echo(run))


def test_udp_loss_drops_about_the_share_asked_in_each_direction(relays: list[subprocess.Popen[str]]) -> None:
    async def run(target_port: int, echo: Echo) -> None:
        listen = udp_port()
        relays.append(start_relay(f"127.0.0.1:{listen}", f"127.0.0.1:{target_port}", "--udp", "--delay-ms", "1",
                                  "--jitter-ms", "0", "--loss", "20"))
        ((_sent, arrivals),) = await exchange(listen, echo, 1000, 0.0005, 0.5)
        forward = echo.received / 1000
        both = len(arrivals) / 1000
        print(f"delivered: forward {forward:.3f}, round trip {both:.3f}")
        assert 0.72 <= forward <= 0.88  # 0.8 expected; binomial sd 0.013
        assert 0.54 <= both <= 0.74  # 0.8 x 0.8 both ways
        assert 0.72 <= both / forward <= 0.88  # the way back drops on its own

    asyncio.run(with_echo(run))


def test_udp_gives_each_client_its_own_mapping(relays: list[subprocess.Popen[str]]) -> None:
    async def run(target_port: int, echo: Echo) -> None:
        listen = udp_port()
        relays.append(start_relay(f"127.0.0.1:{listen}", f"127.0.0.1:{target_port}", "--udp", "--delay-ms", "2",
                                  "--jitter-ms", "1"))
        results = await exchange(listen, echo, 50, 0.001, 0.3, clients=3)
        for c, (_sent, arrivals) in enumerate(results):
            assert {data.decode().split(":")[0] for data, _t in arrivals} == {str(c)}
            assert len(arrivals) == 50

    asyncio.run(with_echo(run))


def test_tcp_mode_still_delays_each_way(relays: list[subprocess.Popen[str]]) -> None:
    async def run() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[1]
        listen = free_port()
        relays.append(start_relay(f"127.0.0.1:{listen}", f"127.0.0.1:{target}", "--delay-ms", "10",
                                  "--jitter-ms", "2"))
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        rtts = []
        for i in range(20):
            t0 = time.monotonic()
            writer.write(b"%d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 10) == b"%d\n" % i
            rtts.append((time.monotonic() - t0) * 1000)
        writer.close()
        server.close()
        assert min(rtts) >= 2 * (10 - 2) - 0.5 and statistics.median(rtts) <= 40

    asyncio.run(run())


def test_bad_arguments_are_one_line_errors() -> None:
    for args, message in ((["127.0.0.1:1", "nowhere", "--udp"], "is not HOST:PORT"),
                          (["127.0.0.1:1", "127.0.0.1:2", "--loss", "100"], "percentage")):
        out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert Path(SCRIPT).read_text().startswith('"""')
