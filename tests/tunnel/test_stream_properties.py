"""Property tests of the tunnel core: whatever the interleaving of frames
of many streams, the split points of delivery, the window sizes and the
moment credit is given back, every body arrives byte-exact, windows stay
within their bounds, and reset streams give all their credit back."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel import (
    Connection,
    DataReceived,
    ErrorCode,
    Hello,
    PeerSettings,
    RequestHead,
    RequestReceived,
    ResponseHead,
    ResponseReceived,
    Role,
    StreamReset,
)


@dataclass
class Side:
    conn: Connection
    settings: PeerSettings
    received: dict[int, bytearray] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    unacked: dict[int, int] = field(default_factory=dict)
    reset: set[int] = field(default_factory=set)
    pending_out: bytearray = field(default_factory=bytearray)


def check_windows(side: Side, peer_settings: PeerSettings) -> None:
    c = side.conn
    assert 0 <= c.connection_send_window <= 2**31 - 1
    assert 0 <= c.connection_recv_window <= side.settings.connection_window
    for sid in c.stream_ids:
        send, recv = c.stream_windows(sid)
        assert send >= 0
        assert 0 <= recv <= side.settings.stream_window


def make_pair(es: PeerSettings, ag: PeerSettings) -> tuple[Side, Side]:
    edge, agent = Side(Connection(Role.EDGE, es), es), Side(Connection(Role.AGENT, ag), ag)
    agent.conn.send_hello(Hello("w", capacity=8))
    edge.conn.receive_data(agent.conn.data_to_send())
    edge.conn.accept()
    agent.conn.receive_data(edge.conn.data_to_send())
    return edge, agent


def on_events(side: Side, events: list, rng: random.Random, ack_now: float) -> None:
    for ev in events:
        if isinstance(ev, DataReceived):
            side.received.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            side.unacked[ev.stream_id] = side.unacked.get(ev.stream_id, 0) + len(ev.data)
            if ev.end_stream:
                side.ended.add(ev.stream_id)
        elif isinstance(ev, RequestReceived | ResponseReceived):
            side.received.setdefault(ev.stream_id, bytearray())
            if ev.end_stream:
                side.ended.add(ev.stream_id)
        elif isinstance(ev, StreamReset):
            side.reset.add(ev.stream_id)
            side.unacked.pop(ev.stream_id, None)  # the core frees that credit itself
    if rng.random() < ack_now:
        ack_some(side, rng)


def ack_some(side: Side, rng: random.Random, everything: bool = False) -> None:
    for sid in list(side.unacked):
        n = side.unacked[sid] if everything else rng.randint(0, side.unacked[sid])
        if n:
            side.conn.acknowledge_received(sid, n)
            side.unacked[sid] -= n


def deliver(src: Side, dst: Side, rng: random.Random, ack_now: float, all_of_it: bool = False) -> None:
    src.pending_out.extend(src.conn.data_to_send())
    if not src.pending_out:
        return
    n = len(src.pending_out) if all_of_it else rng.randint(1, len(src.pending_out))
    chunk = bytes(src.pending_out[:n])
    del src.pending_out[:n]
    on_events(dst, dst.conn.receive_data(chunk), rng, ack_now)


windows = st.builds(
    PeerSettings,
    max_frame_size=st.sampled_from([1024, 4096, 16384]),
    stream_window=st.integers(1024, 65536),
    connection_window=st.integers(1024, 200_000),
)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    es=windows,
    ag=windows,
    sizes=st.lists(st.tuples(st.integers(0, 150_000), st.integers(0, 150_000)), min_size=1, max_size=6),
    ack_now=st.floats(0.1, 1.0),
    reset_some=st.booleans(),
)
def test_any_interleaving_delivers_every_body_and_respects_windows(seed, es, ag, sizes, ack_now, reset_some):
    rng = random.Random(seed)
    edge, agent = make_pair(es, ag)
    requests = {}
    responses = {}
    sent_req: dict[int, int] = {}
    sent_resp: dict[int, int] = {}
    resets: set[int] = set()
    for req_size, resp_size in sizes:
        sid = edge.conn.open_stream()
        requests[sid] = rng.randbytes(req_size)
        responses[sid] = rng.randbytes(resp_size)
        edge.conn.send_request(sid, RequestHead("POST", f"/s{sid}"), end_stream=req_size == 0)
        sent_req[sid] = 0
    responded: set[int] = set()

    def send_chunk(side: Side, sid: int, body: bytes, sent: dict[int, int]) -> None:
        room = side.conn.send_window(sid)
        left = len(body) - sent[sid]
        if left == 0 or room == 0:
            return
        n = rng.randint(1, min(room, left))
        side.conn.send_data(sid, body[sent[sid]:sent[sid] + n], end_stream=sent[sid] + n == len(body))
        sent[sid] += n

    for _step in range(20000):
        action = rng.random()
        live_req = [s for s in requests if s not in resets and edge.conn.can_send_body(s)]
        if action < 0.3 and live_req:
            sid = rng.choice(live_req)
            send_chunk(edge, sid, requests[sid], sent_req)
        elif action < 0.5:
            # The agent answers streams whose head it has seen.
            for sid in list(agent.received):
                if sid not in responded and sid not in agent.reset and sid not in resets:
                    responded.add(sid)
                    agent.conn.send_response(sid, ResponseHead(200), end_stream=len(responses[sid]) == 0)
                    sent_resp[sid] = 0
            live = [s for s in sent_resp if s not in resets and s not in agent.reset and agent.conn.can_send_body(s)]
            if live:
                sid = rng.choice(live)
                send_chunk(agent, sid, responses[sid], sent_resp)
        elif action < 0.7:
            deliver(edge, agent, rng, ack_now)
        elif action < 0.9:
            deliver(agent, edge, rng, ack_now)
        elif action < 0.95:
            ack_some(edge, rng)
            ack_some(agent, rng)
        elif reset_some and action < 0.96 and requests:
            sid = rng.choice(list(requests))
            side = edge if rng.random() < 0.5 else agent
            if sid not in resets and side.conn.is_open(sid):  # a side can only cancel what it knows
                resets.add(sid)
                side.conn.reset_stream(sid, ErrorCode.CANCEL)
        check_windows(edge, ag)
        check_windows(agent, es)
        done = all(
            s in resets or (s in agent.ended and s in edge.ended and sent_req[s] == len(requests[s]))
            for s in requests
        )
        if done:
            break
    # Flush everything that is still in flight and give back all credit.
    for _ in range(50):
        deliver(edge, agent, rng, 1.0, all_of_it=True)
        deliver(agent, edge, rng, 1.0, all_of_it=True)
        ack_some(edge, rng, everything=True)
        ack_some(agent, rng, everything=True)
    for sid in requests:
        if sid in resets or sid in edge.reset or sid in agent.reset:
            continue
        assert bytes(agent.received[sid]) == requests[sid], f"request body of stream {sid}"
        assert bytes(edge.received[sid]) == responses[sid], f"response body of stream {sid}"
    assert edge.conn.open_streams == 0 and agent.conn.open_streams == 0
    # Every byte was acknowledged or freed by a reset, so no credit is lost:
    # what the sender may send is what the receiver has granted, and the
    # receiver holds back less than one batching threshold (a quarter window).
    for sender, receiver in ((edge, agent), (agent, edge)):
        assert sender.conn.connection_send_window == receiver.conn.connection_recv_window
        withheld = receiver.settings.connection_window - receiver.conn.connection_recv_window
        assert 0 <= withheld < receiver.settings.connection_window // 4
