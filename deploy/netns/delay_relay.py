"""A userspace relay that delays everything it carries by a fixed plus a random
amount, in both directions: a stand-in for a WAN link where `tc netem` is not
available (containers without the sch_netem module).

TCP (default): every chunk read from one side is written to the other after
the delay, in order (a link does not reorder a byte stream).

UDP (--udp): every datagram is forwarded after the delay. One mapping per
client source address: the relay opens one socket towards the target for each
client (as a NAT does), so the target's answers go back to that client alone.
WireGuard uses one UDP flow per peer, so one mapping carries a whole tunnel.
Mappings idle for --idle-s are forgotten (a NAT's UDP timeout).

Order: by default a datagram is never delivered before the one sent before it
in the same direction (the delay of each is max(its own draw, the previous
one's due time)), the same law as the TCP mode so that a TCP leg and a UDP leg
see the same delays. --reorder draws each datagram's delay independently, so
jitter larger than the gap between datagrams reorders them (WireGuard accepts
reordered packets within its replay window).

Loss (--loss PCT): UDP drops that share of datagrams at random, each
direction on its own. For TCP a relay cannot drop bytes (the stream would be
corrupt); there, each chunk counts as ceil(bytes / 1448) segments, each
"lost" with the same probability, and a chunk with a lost segment arrives
--rto-ms later together with everything after it on that connection
(head-of-line blocking; 200 ms is Linux's minimum retransmission timeout, the
worst case: a real TCP often recovers a segment lost mid-burst in about one
round trip by fast retransmit). That is a model, not TCP's own recovery: say
so next to any figure.

usage: python delay_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT --delay-ms 20 --jitter-ms 5 [--udp] [--loss PCT]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# asyncio's timers fire up to ~1 ms late (epoll granularity); wake this much
# early and spin the rest of the way.
EARLY = 0.001
MAX_DATAGRAM = 65535
SEGMENT = 1448  # bytes of TCP payload in one 1500-byte packet (with timestamps): the unit of TCP --loss


@dataclass
class Law:
    """When a packet or chunk sent at `now` arrives: pure, the random source is given."""

    delay: float  # seconds
    jitter: float  # seconds, uniform in [-jitter, +jitter]
    loss: float = 0.0  # fraction 0..1
    reorder: bool = False
    rto: float = 0.2  # TCP only: what a "lost" chunk costs

    def due(self, now: float, last_due: float, rng: random.Random) -> float | None:
        """The delivery time, or None to drop (UDP). `last_due`: the previous one's due time in
        this direction (ignored with reorder)."""
        if self.loss and rng.random() < self.loss:
            return None
        due = now + max(0.0, self.delay + rng.uniform(-self.jitter, self.jitter))
        return due if self.reorder else max(due, last_due)

    def due_stream(self, now: float, last_due: float, rng: random.Random, size: int = SEGMENT) -> float:
        """TCP: never dropped, never reordered. A chunk of `size` bytes stands for ceil(size / SEGMENT)
        segments, each lost with the loss probability (the same per-packet rate as the UDP mode); a
        chunk with a lost segment costs one retransmission timeout."""
        segments = max(1, -(-size // SEGMENT))
        extra = self.rto if self.loss and rng.random() < 1 - (1 - self.loss) ** segments else 0.0
        return max(last_due, now + max(0.0, self.delay + rng.uniform(-self.jitter, self.jitter)) + extra)


async def wait_until(due: float) -> None:
    wait = due - time.monotonic()
    if wait > EARLY:
        await asyncio.sleep(wait - EARLY)
    while time.monotonic() < due:  # noqa: ASYNC110 - spin the last ms for an exact delay
        await asyncio.sleep(0)


# --- TCP ------------------------------------------------------------------------------------------------------

async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, law: Law, rng: random.Random) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                writer.close()
                return
            await wait_until(due)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    last_due = 0.0
    try:
        while True:
            data = await reader.read(65536)
            last_due = law.due_stream(time.monotonic(), last_due, rng, len(data))
            await queue.put((last_due, data))
            if not data:
                break
        await sender
    except (ConnectionError, asyncio.CancelledError):
        sender.cancel()
        writer.close()


async def tcp_server(listen: tuple[str, int], target: tuple[str, int], law: Law,
                     rng: random.Random) -> asyncio.Server:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, uw, law, rng), pump(ur, cw, law, rng))

    return await asyncio.start_server(handle, *listen)


# --- UDP ------------------------------------------------------------------------------------------------------

class Direction:
    """Datagrams of one direction of one mapping, delivered at their due times."""

    def __init__(self, send: Callable[[bytes], object], law: Law, rng: random.Random) -> None:
        self.send = send
        self.law = law
        self.rng = rng
        self.last_due = 0.0
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._deliver())
        self.sent = self.dropped = 0

    def push(self, data: bytes) -> None:
        due = self.law.due(time.monotonic(), self.last_due, self.rng)
        if due is None:
            self.dropped += 1
            return
        self.last_due = due
        if self.law.reorder:
            asyncio.get_running_loop().call_at(self._loop_time(due), self._send, data)
        else:
            self.queue.append((due, data))
            self.wake.set()

    @staticmethod
    def _loop_time(due: float) -> float:
        return asyncio.get_running_loop().time() + (due - time.monotonic())

    def _send(self, data: bytes) -> None:
        try:
            self.send(data)
            self.sent += 1
        except (BlockingIOError, OSError):
            self.dropped += 1  # a full buffer or an unreachable peer loses the datagram, as on a link

    async def _deliver(self) -> None:
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            due, data = self.queue.popleft()
            await wait_until(due)
            self._send(data)

    def close(self) -> None:
        self.task.cancel()


class Mapping:
    """One client source address: its own socket towards the target."""

    def __init__(self, relay: UdpRelay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client
        family = socket.AF_INET6 if ":" in relay.target[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(relay.target)
        self.last_seen = time.monotonic()
        self.out = Direction(self.sock.send, relay.law, relay.rng)
        self.back = Direction(lambda data: relay.sock.sendto(data, client), relay.law, relay.rng)
        asyncio.get_running_loop().add_reader(self.sock, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable from the target: a lost datagram
                return
            self.last_seen = time.monotonic()
            self.back.push(data)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock)
        self.out.close()
        self.back.close()
        self.sock.close()


class UdpRelay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], law: Law, rng: random.Random,
                 idle: float) -> None:
        self.target = target
        self.law = law
        self.rng = rng
        self.idle = idle
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.setblocking(False)
        self.mappings: dict[tuple[str, int], Mapping] = {}

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            mapping = self.mappings.get(addr)
            if mapping is None:
                mapping = self.mappings[addr] = Mapping(self, addr)
            mapping.last_seen = time.monotonic()
            mapping.out.push(data)

    async def serve(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock, self._readable)
        while True:
            await asyncio.sleep(min(self.idle, 10.0))
            now = time.monotonic()
            for addr, m in list(self.mappings.items()):
                if now - m.last_seen > self.idle:
                    m.close()
                    del self.mappings[addr]


# --- command line ---------------------------------------------------------------------------------------------

def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def percent(text: str) -> float:
    value = float(text)
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError("--loss is a percentage from 0 to below 100")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("listen", type=host_port, help="HOST:PORT to listen on")
    ap.add_argument("target", type=host_port, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="fixed one-way delay (default: 20)")
    ap.add_argument("--jitter-ms", type=float, default=5.0,
                    help="plus a uniform random amount in [-J, +J] per chunk/datagram (default: 5)")
    ap.add_argument("--udp", action="store_true", help="relay UDP datagrams instead of TCP connections")
    ap.add_argument("--loss", type=percent, default=0.0, metavar="PCT",
                    help="UDP: drop this share of datagrams, each direction (default: 0). TCP: each 1448-byte segment "
                         "is 'lost' with this probability and its chunk arrives --rto-ms late with everything after "
                         "it (a retransmission), nothing dropped")
    ap.add_argument("--rto-ms", type=float, default=200.0,
                    help="TCP --loss only: the retransmission timeout a lost chunk costs (default: 200)")
    ap.add_argument("--reorder", action="store_true",
                    help="UDP: draw each datagram's delay independently, so jitter may reorder them (default: keep "
                         "order, as the TCP mode does)")
    ap.add_argument("--idle-s", type=float, default=180.0,
                    help="UDP: forget a client's mapping after this many silent seconds (default: 180)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random delays and losses")
    return ap


def law_from(a: argparse.Namespace) -> Law:
    if a.delay_ms < 0 or a.jitter_ms < 0:
        raise SystemExit("delay_relay: --delay-ms and --jitter-ms must be 0 or more")
    return Law(a.delay_ms / 1000, a.jitter_ms / 1000, a.loss / 100, a.reorder, a.rto_ms / 1000)


async def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    law = law_from(a)
    rng = random.Random(a.seed)
    kind = "udp" if a.udp else "tcp"
    lossy = f", loss {a.loss}%" if a.loss else ""
    ready = (f"delay relay ({kind}) {a.listen[0]}:{a.listen[1]} -> {a.target[0]}:{a.target[1]}: "
             f"{a.delay_ms} +/- {a.jitter_ms} ms{lossy}")
    if a.udp:
        relay = UdpRelay(a.listen, a.target, law, rng, a.idle_s)
        print(ready, flush=True)  # after the bind: a caller may wait for this line
        await relay.serve()
    else:
        server = await tcp_server(a.listen, a.target, law, rng)
        print(ready, flush=True)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
