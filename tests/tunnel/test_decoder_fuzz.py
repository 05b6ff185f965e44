"""Fuzzing the tunnel decoder: random bytes and mutated valid traffic, fed
to both ends before and after the handshake. Only `ProtocolError` may ever
escape, and the decoder never buffers more than one frame's worth."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel import (
    Connection,
    Hello,
    PeerSettings,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    WorkerStatus,
)
from tunnel.frames import HEADER_SIZE

LIMITS = PeerSettings(max_frame_size=4096, stream_window=8192, connection_window=16384)


def valid_traffic(rng: random.Random) -> tuple[bytes, bytes]:
    """A realistic byte stream in each direction: (agent -> edge, edge -> agent)."""
    edge, agent = Connection(Role.EDGE, LIMITS), Connection(Role.AGENT, LIMITS)
    agent.send_hello(Hello("fuzz", capacity=4, labels={"a": "b"}))
    to_edge = agent.data_to_send()
    edge.receive_data(to_edge)
    edge.accept()
    to_agent = edge.data_to_send()
    agent.receive_data(to_agent)
    up, down = bytearray(to_edge), bytearray(to_agent)
    for _ in range(rng.randint(1, 4)):
        sid = edge.open_stream()
        edge.send_request(sid, RequestHead("POST", "/p?q=1", (("content-type", "image/jpeg"),)))
        edge.send_data(sid, rng.randbytes(rng.randint(0, 3000)), end_stream=True)
        edge.ping(rng.getrandbits(63))
        chunk = edge.data_to_send()
        down += chunk
        agent.receive_data(chunk)
        agent.send_response(sid, ResponseHead(200, (("x-a", "1"),)))
        agent.send_data(sid, rng.randbytes(rng.randint(0, 3000)), end_stream=True)
        agent.send_status(WorkerStatus(rng.random() < 0.5, "ok"))
        chunk = agent.data_to_send()
        up += chunk
        edge.receive_data(chunk)
    return bytes(up), bytes(down)


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.4 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)  # bit flip
        elif op < 0.55 and b:
            i = rng.randrange(len(b))
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80])
        elif op < 0.7 and b:
            del b[rng.randrange(len(b)):]  # truncate
        elif op < 0.85 and len(b) > HEADER_SIZE:
            i = rng.randrange(len(b) - 4)
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])  # lying lengths
        else:
            i = rng.randrange(len(b) + 1)
            b[i:i] = b[: rng.randint(0, 64)]  # duplicate a slice
    return bytes(b)


def feed_all(role: Role, data: bytes, rng: random.Random, handshake: bool) -> None:
    conn = Connection(role, LIMITS)
    if handshake and role is Role.AGENT:
        conn.send_hello(Hello("fuzz"))
    pos = 0
    try:
        while pos < len(data):
            n = rng.randint(1, 2048)
            conn.receive_data(data[pos:pos + n])
            pos += n
            assert conn.buffered_bytes <= HEADER_SIZE + LIMITS.max_frame_size
    except ProtocolError:
        return  # the one allowed failure


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=5000), seed=st.integers(0, 2**32))
def test_random_bytes_raise_only_protocol_error(data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    for role in (Role.EDGE, Role.AGENT):
        feed_all(role, data, rng, handshake=True)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_mutated_traffic_raises_only_protocol_error(seed: int) -> None:
    rng = random.Random(seed)
    up, down = valid_traffic(rng)
    feed_all(Role.EDGE, mutate(up, rng), rng, handshake=False)
    feed_all(Role.AGENT, mutate(down, rng), rng, handshake=True)
