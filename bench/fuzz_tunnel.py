"""Fuzz the tunnel core with N random and mutated inputs (default 1,000,000):
only `ProtocolError` may escape, and nothing may hold more than its limits allow.

Each input goes to a fresh `Connection` (edge or agent) in random chunks, or to
a bare `FrameDecoder`. Kinds: mutated valid traffic (the helpers of
tests/tunnel/test_decoder_fuzz.py), random well-formed-looking frames, random
bytes. After every chunk: decoder buffer <= HEADER_SIZE + max_frame_size; open
streams <= max_streams; body delivered without acknowledgement <= the stream
and connection windows. Prints inputs/s, outcomes and peak RSS; exits 1 on
any other exception or a broken bound, printing the reproducer.

    python bench/fuzz_tunnel.py --inputs 1000000 --seed 1
    python bench/fuzz_tunnel.py --seed 1 --replay 123456   # one input, with traceback
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstats import status_mb  # noqa: E402
from tests.tunnel.test_decoder_fuzz import LIMITS, mutate, valid_traffic  # noqa: E402
from tunnel import (  # noqa: E402
    Connection,
    DataReceived,
    ErrorCode,
    FrameDecoder,
    FrameType,
    Hello,
    HelloReceived,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    State,
    Welcome,
    WorkerStatus,
)
from tunnel import connection as tunnel_connection  # noqa: E402
from tunnel.frames import (  # noqa: E402
    HEADER,
    HEADER_SIZE,
    encode_frame,
    encode_request_head,
    encode_response_head,
)
from tunnel.handshake import choose_version  # noqa: E402

MAX_BUFFERED = HEADER_SIZE + LIMITS.max_frame_size
# Mutated traffic comes from a corpus entry shared by this many inputs in a
# row: building valid traffic costs ~10x more than fuzzing one input.
CORPUS_REUSE = 16


class BoundBroken(Exception):
    """A limit the tunnel promises was exceeded (not an exception the tunnel raised)."""


@dataclass
class Case:
    """One input and everything needed to replay it."""

    kind: str
    data: bytes
    target: str  # "edge", "edge+accept", "agent", "agent+hello", "decoder"
    chunks: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- generators
def random_payload(ftype: int, rng: random.Random) -> bytes:
    r = rng.random()
    if ftype == FrameType.HEADERS and r < 0.6:
        if rng.random() < 0.5:
            return encode_request_head(RequestHead(rng.choice(["GET", "POST", "X"]), rng.choice(["/", "/a?b", "*"]),
                                                   (("x-a", "1"),) * rng.randint(0, 3)))
        return encode_response_head(ResponseHead(rng.choice([100, 200, 204, 500, 999]), (("x-b", "2"),)))
    if ftype == FrameType.WINDOW_UPDATE and r < 0.8:
        return struct.pack("!I", rng.choice([0, 1, 4096, 2**31 - 1, 2**31, 2**32 - 1, rng.getrandbits(32)]))
    if ftype == FrameType.RESET and r < 0.8:
        return struct.pack("!I", rng.choice([0, 1, 7, 8, 99, rng.getrandbits(32)])) + rng.randbytes(rng.randint(0, 20))
    if ftype == FrameType.PING and r < 0.8:
        return rng.randbytes(8)
    if ftype == FrameType.GOAWAY and r < 0.8:
        return struct.pack("!II", rng.choice([0, 1, 3, 2**31 - 1, rng.getrandbits(32)]), rng.choice([0, 1, 7, 13, 14, 99]))
    if ftype == FrameType.HELLO and r < 0.5:
        return Hello(rng.choice(["a", "", "x" * 300]), capacity=rng.choice([0, 1, 4]),
                     versions=rng.choice([(1,), (2,), (), (1, 2)]),
                     instance=rng.choice(["", "0123456789abcdef", "short", "x y" * 5, "z" * 65]),
                     health_path=rng.choice(["", "/healthz", "healthz", "/a b", "/" + "p" * 1100])).encode()
    if ftype == FrameType.WELCOME and r < 0.5:
        return Welcome(rng.choice([0, 1, 2]), "s", rng.choice([0.0, 1.0, -1.0]), LIMITS).encode()
    if ftype == FrameType.STATUS and r < 0.5:
        return WorkerStatus(rng.random() < 0.5, "x" * rng.randint(0, 50)).encode()
    if ftype == FrameType.DATA:
        return rng.randbytes(rng.choice([0, 1, 100, 3000, 4096, 4097]) if r < 0.5 else rng.randint(0, 4096))
    return rng.randbytes(rng.randint(0, 64))


def random_frames(rng: random.Random) -> bytes:
    """Frames whose headers mostly pass the decoder, so the connection's state
    machine (not just the header check) sees the garbage."""
    out = bytearray()
    for _ in range(rng.randint(1, 24)):
        ftype = rng.choice(list(FrameType)) if rng.random() < 0.95 else rng.choice([0, 10, 255])
        flags = rng.choice([0, 0, 1, 2, 3]) if rng.random() < 0.95 else rng.getrandbits(8)
        sid = rng.choice([0, 0, 1, 1, 3, 5, 2, 2**31 - 1, 2**31, rng.randint(1, 64)])
        payload = random_payload(ftype, rng)
        length = len(payload)
        if rng.random() < 0.05:  # a lying length
            length = rng.choice([0, length + 1, max(0, length - 1), LIMITS.max_frame_size, LIMITS.max_frame_size + 1,
                                 2**32 - 1])
        out += HEADER.pack(ftype, flags, sid, length) + payload
    return bytes(out)


def handshake_prefix(target: str) -> bytes:
    """The valid first frames a peer sends to `target`, so the fuzzed frames
    that follow reach the open-tunnel code."""
    if target.startswith("edge"):
        return encode_frame(FrameType.HELLO, 0, Hello("fuzz", capacity=4, settings=LIMITS).encode())
    return encode_frame(FrameType.WELCOME, 0, Welcome(1, "s", 1.0, LIMITS).encode())


class SeededUuid:
    """Stands in for the uuid module inside tunnel.connection while valid
    traffic is built."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)


class Generator:
    """Input i of seed s is a pure function of (s, i): any one can be replayed alone."""

    KINDS: tuple[tuple[str, float], ...] = (
        ("mutated agent->edge (edge accepts, opens streams)", 0.20),
        ("mutated agent->edge (no accept, as the test)", 0.10),
        ("mutated edge->agent", 0.25),
        ("random frames -> edge", 0.10),
        ("random frames -> agent", 0.10),
        ("random bytes -> edge or agent", 0.15),
        ("bare FrameDecoder, random or mutated", 0.10),
    )

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._corpus_key = -1
        self._corpus: tuple[bytes, bytes] = (b"", b"")
        self._cum: list[tuple[float, str]] = []
        total = 0.0
        for name, weight in self.KINDS:
            total += weight
            self._cum.append((total, name))

    def traffic(self, i: int) -> tuple[bytes, bytes]:
        key = i // CORPUS_REUSE
        if key != self._corpus_key:
            rng = random.Random((self.seed << 40) | (1 << 39) | key)
            # accept() puts a uuid4 session id in the WELCOME: draw it from
            # the same rng, or --replay would not rebuild the same bytes.
            real = tunnel_connection.uuid
            tunnel_connection.uuid = SeededUuid(rng)  # type: ignore[assignment]
            try:
                self._corpus = valid_traffic(rng)
            finally:
                tunnel_connection.uuid = real
            self._corpus_key = key
        return self._corpus

    def case(self, i: int) -> tuple[Case, random.Random]:
        rng = random.Random((self.seed << 40) | i)
        r = rng.random()
        kind = next(name for edge, name in self._cum if r < edge) if r < self._cum[-1][0] else self._cum[-1][1]
        if kind.startswith("mutated agent->edge"):
            up, _ = self.traffic(i)
            target = "edge+accept" if "accepts" in kind else "edge"
            return Case(kind, mutate(up, rng), target), rng
        if kind == "mutated edge->agent":
            _, down = self.traffic(i)
            return Case(kind, mutate(down, rng), "agent+hello"), rng
        if kind.startswith("random frames"):
            target = "edge+accept" if kind.endswith("edge") else "agent+hello"
            prefix = handshake_prefix(target) if rng.random() < 0.7 else b""
            return Case(kind, prefix + random_frames(rng), target), rng
        if kind.startswith("random bytes"):
            target = rng.choice(["edge", "agent+hello"])
            return Case(kind, rng.randbytes(rng.randint(0, 5000)), target), rng
        up, down = self.traffic(i)
        data = mutate(rng.choice([up, down]), rng) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 5000))
        return Case(kind, data, "decoder"), rng


# ------------------------------------------------------------------- feeding
def chunks(data: bytes, rng: random.Random) -> list[int]:
    """How the input is split across receive_data calls: as the test does
    (1..2048 bytes), all at once, at a few random points (splitting headers),
    or byte by byte over the first frames (byte by byte throughout would make
    each input cost ~100x more for little extra coverage)."""
    size = len(data)
    r = rng.random()
    if r < 0.6:
        sizes, left = [], size
        while left > 0:
            n = min(left, rng.randint(1, 2048))
            sizes.append(n)
            left -= n
        return sizes
    if r < 0.7 or size < 2:
        return [size] if size else []
    if r < 0.9:
        cuts = sorted(set(rng.sample(range(1, size), min(size - 1, rng.randint(1, 8)))))
        return [b - a for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
    head = min(size, rng.randint(1, 64))
    return [1] * head + ([size - head] if size > head else [])


def new_connection(target: str) -> Connection:
    if target.startswith("edge"):
        return Connection(Role.EDGE, LIMITS)
    conn = Connection(Role.AGENT, LIMITS)
    if target == "agent+hello":
        conn.send_hello(Hello("fuzz"))
        conn.data_to_send()
    return conn


def admit(conn: Connection) -> None:
    """What the edge does with a HELLO: refuse an unknown version, otherwise
    accept and send requests, so responses to them are legal."""
    assert conn.hello is not None
    if choose_version(conn.hello.versions) is None:
        conn.reject(ErrorCode.VERSION_MISMATCH, "no common version")
        return
    conn.accept()
    for _ in range(4):
        sid = conn.open_stream()
        conn.send_request(sid, RequestHead("POST", "/p", (("content-type", "a/b"),)), end_stream=True)
    conn.data_to_send()


def check_bounds(conn: Connection, unacked: dict[int, int]) -> None:
    if conn.buffered_bytes > MAX_BUFFERED:
        raise BoundBroken(f"decoder buffers {conn.buffered_bytes} bytes > {MAX_BUFFERED}")
    if conn.open_streams > LIMITS.max_streams:
        raise BoundBroken(f"{conn.open_streams} open streams > {LIMITS.max_streams}")
    total = sum(unacked.values())
    if total > LIMITS.connection_window:
        raise BoundBroken(f"{total} body bytes delivered unacknowledged > connection window {LIMITS.connection_window}")
    worst = max(unacked.values(), default=0)
    if worst > LIMITS.stream_window:
        raise BoundBroken(f"{worst} body bytes delivered unacknowledged on one stream > stream window "
                          f"{LIMITS.stream_window}")


def run_case(case: Case, rng: random.Random, stats: Stats) -> str:
    """Returns the outcome; raises anything that is not the one allowed error."""
    case.chunks = chunks(case.data, rng)
    if case.target == "decoder":
        dec = FrameDecoder(LIMITS.max_frame_size)
        pos = 0
        try:
            for n in case.chunks:
                dec.feed(case.data[pos:pos + n])
                pos += n
                if dec.buffered > MAX_BUFFERED:
                    raise BoundBroken(f"decoder buffers {dec.buffered} bytes > {MAX_BUFFERED}")
        except ProtocolError as exc:
            return f"ProtocolError {exc.code.name}"
        return "accepted" if dec.buffered == 0 else "accepted, partial frame left"
    conn = new_connection(case.target)
    unacked: dict[int, int] = {}
    pos = 0
    try:
        for n in case.chunks:
            events = conn.receive_data(case.data[pos:pos + n])
            pos += n
            for ev in events:
                if isinstance(ev, DataReceived):
                    unacked[ev.stream_id] = unacked.get(ev.stream_id, 0) + len(ev.data)
                elif isinstance(ev, HelloReceived) and case.target == "edge+accept" and conn.state is State.HANDSHAKE:
                    admit(conn)
            check_bounds(conn, unacked)
            out = len(conn.data_to_send())
            if out > stats.max_out_per_chunk[0]:
                stats.max_out_per_chunk = (out, n)
    except ProtocolError as exc:
        return f"ProtocolError {exc.code.name}"
    if conn.state is State.CLOSED:
        return "accepted, tunnel closed (GOAWAY)"
    return "accepted" if conn.buffered_bytes == 0 else "accepted, partial frame left"


@dataclass
class Stats:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_in: int = 0
    max_out_per_chunk: tuple[int, int] = (0, 0)  # (bytes queued to send after one chunk, that chunk's size)


def current_rss_mb() -> float:
    return status_mb("self", "VmRSS")


def peak_rss_mb() -> float:
    return status_mb("self", "VmHWM")


def report_failure(seed: int, i: int, case: Case, exc: BaseException) -> None:
    print(f"\nFAILURE on input {i} (seed {seed}): {exc.__class__.__name__}: {exc}")
    print(f"kind: {case.kind}; fed to: {case.target}; chunk sizes: {case.chunks}")
    print(f"reproducer ({len(case.data)} bytes, hex):\n{case.data.hex()}")
    print(f"replay: python bench/fuzz_tunnel.py --seed {seed} --replay {i}")
    traceback.print_exception(exc, file=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replay", type=int, default=None, metavar="I", help="run only input I of this seed")
    ap.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines (0: none)")
    a = ap.parse_args(argv)
    gen = Generator(a.seed)
    stats = Stats()
    if a.replay is not None:
        case, rng = gen.case(a.replay)
        try:
            outcome = run_case(case, rng, stats)
        except Exception as exc:  # the finding itself
            report_failure(a.seed, a.replay, case, exc)
            return 1
        print(f"input {a.replay}: {case.kind}, {len(case.data)} bytes to {case.target} in chunks {case.chunks}: "
              f"{outcome}\n{case.data.hex()}")
        return 0

    rss_start = current_rss_mb()
    start = time.perf_counter()
    next_progress = start + a.progress if a.progress > 0 else float("inf")
    failures = 0
    broken = 0
    for i in range(a.inputs):
        case, rng = gen.case(i)
        try:
            outcome = run_case(case, rng, stats)
        except Exception as exc:  # anything but ProtocolError is a finding
            failures += 1
            broken += isinstance(exc, BoundBroken)
            outcome = f"FAILED {exc.__class__.__name__}"
            if failures <= 3:
                report_failure(a.seed, i, case, exc)
        stats.outcomes[(case.kind, outcome)] += 1
        stats.bytes_in += len(case.data)
        if i % 1024 == 0 and time.perf_counter() >= next_progress:
            next_progress += a.progress
            el = time.perf_counter() - start
            print(f"  {i:>9} inputs  {el:6.0f} s  {i / el:8.0f} inputs/s  RSS {current_rss_mb():.1f} MB  "
                  f"failures {failures}", flush=True)
    elapsed = time.perf_counter() - start
    rss_end = current_rss_mb()

    print(f"\n{'kind':<52} {'outcome':<36} {'inputs':>9}")
    for (kind, outcome), n in sorted(stats.outcomes.items()):
        print(f"{kind:<52} {outcome:<36} {n:>9}")
    by_outcome: Counter[str] = Counter()
    for (_, outcome), n in stats.outcomes.items():
        by_outcome[outcome.split(" ")[0].rstrip(",")] += n
    print()
    rows = [
        ("inputs", f"{a.inputs:,} (seed {a.seed})", True),
        ("inputs/s", f"{a.inputs / elapsed:,.0f} ({elapsed:.1f} s, {stats.bytes_in / 1e6:.0f} MB fed)", True),
        ("outcomes", ", ".join(f"{k} {v:,}" for k, v in sorted(by_outcome.items())), True),
        ("exceptions other than ProtocolError", f"{failures - broken}", failures == broken),
        ("limits exceeded", f"{broken} (buffer <= {MAX_BUFFERED} B, streams <= {LIMITS.max_streams}, "
                              f"unacked <= {LIMITS.stream_window}/{LIMITS.connection_window} B)", broken == 0),
        ("largest output after one input chunk (info)",
         f"{stats.max_out_per_chunk[0]} B (chunk of {stats.max_out_per_chunk[1]} B)", True),
        ("RSS start -> end, peak (MB)", f"{rss_start:.1f} -> {rss_end:.1f}, peak {peak_rss_mb():.1f}", True),
    ]
    width = max(len(measured) for _, measured, _ in rows)
    print(f"{'check':<52} {'measured':<{width}} verdict")
    for name, measured, ok in rows:
        print(f"{name:<52} {measured:<{width}} {'ok' if ok else 'BROKEN'}")
    print(f"\npython {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
