"""Unit tests of the tunnel state machine: plain calls, no sockets."""

from __future__ import annotations

import pytest

from tunnel import (
    Connection,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    Hello,
    HelloReceived,
    PeerSettings,
    PongReceived,
    ProtocolError,
    RequestHead,
    RequestReceived,
    ResponseHead,
    ResponseReceived,
    Role,
    State,
    StatusReceived,
    StreamClosedError,
    StreamReset,
    UsageError,
    WelcomeReceived,
    WindowUpdated,
    WorkerStatus,
)
from tunnel.frames import FLAG_END_STREAM, FrameType, encode_frame


def pump(src: Connection, dst: Connection) -> list:
    return dst.receive_data(src.data_to_send())


def pair(edge_settings: PeerSettings | None = None, agent_settings: PeerSettings | None = None):
    edge = Connection(Role.EDGE, edge_settings)
    agent = Connection(Role.AGENT, agent_settings)
    agent.send_hello(Hello("w1", pool="gpu", capacity=4, software="t/1", labels={"zone": "home"}))
    (ev,) = pump(agent, edge)
    assert isinstance(ev, HelloReceived)
    assert ev.hello.agent_id == "w1" and ev.hello.pool == "gpu" and ev.hello.capacity == 4
    edge.accept(heartbeat_interval=0.5)
    (ev2,) = pump(edge, agent)
    assert isinstance(ev2, WelcomeReceived)
    assert ev2.welcome.version == 1 and ev2.welcome.heartbeat_interval == 0.5
    return edge, agent


def test_handshake_opens_both_sides_and_exchanges_settings():
    edge, agent = pair(agent_settings=PeerSettings(stream_window=4096))
    assert edge.state is State.OPEN and agent.state is State.OPEN
    assert edge.peer_settings.stream_window == 4096


def test_request_and_response_round_trip_with_bodies():
    edge, agent = pair()
    sid = edge.open_stream()
    edge.send_request(sid, RequestHead("POST", "/photo?x=1", (("content-type", "image/jpeg"),)))
    edge.send_data(sid, b"abc", end_stream=True)
    evs = pump(edge, agent)
    assert isinstance(evs[0], RequestReceived) and evs[0].head.target == "/photo?x=1"
    assert evs[0].head.headers == (("content-type", "image/jpeg"),)
    assert isinstance(evs[1], DataReceived) and evs[1].data == b"abc" and evs[1].end_stream
    agent.acknowledge_received(sid, 3)
    agent.send_response(sid, ResponseHead(200, (("content-type", "text/plain"),)))
    agent.send_data(sid, b"hello", end_stream=True)
    evs = pump(agent, edge)
    assert isinstance(evs[0], ResponseReceived) and evs[0].head.status == 200
    assert isinstance(evs[1], DataReceived) and evs[1].data == b"hello" and evs[1].end_stream
    edge.acknowledge_received(sid, 5)
    assert not edge.is_open(sid) and not agent.is_open(sid)


def test_send_beyond_window_is_refused_and_window_update_restores_it():
    edge, agent = pair(agent_settings=PeerSettings(stream_window=2048, connection_window=1 << 20))
    sid = edge.open_stream()
    edge.send_request(sid, RequestHead("POST", "/"))
    assert edge.send_window(sid) == 2048
    with pytest.raises(UsageError):
        edge.send_data(sid, b"x" * 2049)
    edge.send_data(sid, b"x" * 2048)
    assert edge.send_window(sid) == 0
    evs = pump(edge, agent)
    assert sum(len(e.data) for e in evs if isinstance(e, DataReceived)) == 2048
    agent.acknowledge_received(sid, 2048)
    evs = pump(agent, edge)
    assert WindowUpdated(sid) in evs
    assert edge.send_window(sid) == 2048


def test_peer_exceeding_window_is_a_protocol_error():
    edge, agent = pair(agent_settings=PeerSettings(stream_window=1024))
    sid = edge.open_stream()
    edge.send_request(sid, RequestHead("POST", "/"))
    pump(edge, agent)
    raw = encode_frame(FrameType.DATA, sid, b"y" * 1025)
    with pytest.raises(ProtocolError) as info:
        agent.receive_data(raw)
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR
    # The agent told the edge why before closing.
    evs = edge.receive_data(agent.data_to_send())
    assert isinstance(evs[-1], GoAwayReceived) and evs[-1].code is ErrorCode.FLOW_CONTROL_ERROR


def test_reset_frees_unacknowledged_credit_at_connection_level():
    edge, agent = pair(agent_settings=PeerSettings(stream_window=4096, connection_window=4096))
    sid = edge.open_stream()
    edge.send_request(sid, RequestHead("POST", "/"))
    edge.send_data(sid, b"z" * 4096)
    pump(edge, agent)
    assert edge.connection_send_window == 0
    agent.reset_stream(sid, ErrorCode.CANCEL)
    evs = pump(agent, edge)
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in evs)
    assert edge.connection_send_window == 4096
    with pytest.raises(StreamClosedError):
        edge.send_data(sid, b"more")


def test_data_in_flight_for_a_reset_stream_is_counted_and_credited_back():
    edge, agent = pair(agent_settings=PeerSettings(stream_window=4096, connection_window=4096))
    sid = edge.open_stream()
    edge.send_request(sid, RequestHead("POST", "/"))
    pump(edge, agent)
    agent.reset_stream(sid)
    edge.send_data(sid, b"q" * 4096)  # sent before the RESET arrives
    late = edge.data_to_send()
    pump(agent, edge)
    assert agent.receive_data(late) == []
    pump(agent, edge)
    assert edge.connection_send_window == 4096


def test_ping_is_answered_and_pong_carries_the_timestamp():
    edge, agent = pair()
    edge.ping(123456789)
    assert pump(edge, agent) == []
    assert pump(agent, edge) == [PongReceived(123456789)]


def test_status_and_goaway():
    edge, agent = pair()
    agent.send_status(WorkerStatus(False, "upstream refused"))
    assert pump(agent, edge) == [StatusReceived(WorkerStatus(False, "upstream refused"))]
    sid = edge.open_stream()
    edge.send_request(sid, RequestHead("GET", "/"), end_stream=True)
    pump(edge, agent)
    agent.goaway(ErrorCode.NO_ERROR, "draining")
    (ev,) = pump(agent, edge)
    assert isinstance(ev, GoAwayReceived) and ev.last_stream_id == sid and ev.reason == "draining"
    assert edge.state is State.CLOSING
    with pytest.raises(UsageError):
        edge.open_stream()


def test_new_stream_while_draining_is_refused_not_fatal():
    edge, agent = pair()
    agent.goaway()
    sid = edge.open_stream()  # the edge has not seen the GOAWAY yet
    edge.send_request(sid, RequestHead("GET", "/"), end_stream=True)
    assert pump(edge, agent) == []
    evs = pump(agent, edge)
    assert any(isinstance(e, StreamReset) and e.code is ErrorCode.REFUSED_STREAM for e in evs)


@pytest.mark.parametrize(
    "raw",
    [
        encode_frame(FrameType.HEADERS, 2, b"\x00\x02\x00\x03GET\x00\x01/"),  # even id
        encode_frame(FrameType.HEADERS, 1, b"\x00\x02\x00\x03GET\x00\x0bhttp://evil"),  # absolute form
        encode_frame(FrameType.HEADERS, 1, b"\x00\x02\x00\x03GET\x00\x02//"),  # scheme-relative
        encode_frame(FrameType.DATA, 9, b"x"),  # never opened
        encode_frame(FrameType.WINDOW_UPDATE, 0, b"\x00\x00\x00\x00"),  # zero increment
        encode_frame(FrameType.PING, 0, b"short"),
        encode_frame(FrameType.HELLO, 0, b"{}"),  # second handshake
        b"\x63" + b"\x00" * 9,  # unknown type
        encode_frame(FrameType.DATA, 1, b"", flags=0x80),  # unknown flag
    ],
)
def test_malformed_frames_raise_protocol_error_only(raw):
    _, agent = pair()
    with pytest.raises(ProtocolError):
        agent.receive_data(raw)


def test_oversized_frame_length_is_refused_before_buffering():
    _, agent = pair(agent_settings=PeerSettings(max_frame_size=1024))
    header_only = encode_frame(FrameType.DATA, 1, b"")[:6] + (10**9).to_bytes(4, "big")
    with pytest.raises(ProtocolError):
        agent.receive_data(header_only)
    assert agent.buffered_bytes <= 10


def test_frames_split_across_reads_are_reassembled():
    edge, agent = pair()
    sid = edge.open_stream()
    edge.send_request(sid, RequestHead("POST", "/"))
    edge.send_data(sid, bytes(range(256)) * 10, end_stream=True)
    raw = edge.data_to_send()
    events = []
    for i in range(0, len(raw), 7):
        events += agent.receive_data(raw[i : i + 7])
    body = b"".join(e.data for e in events if isinstance(e, DataReceived))
    assert body == bytes(range(256)) * 10


def test_agent_may_not_open_streams_or_send_requests():
    edge, agent = pair()
    with pytest.raises(UsageError):
        agent.open_stream()
    raw = encode_frame(FrameType.HEADERS, 1, b"\x00\x01\x00\x03200", FLAG_END_STREAM)
    with pytest.raises(ProtocolError):
        edge.receive_data(raw)


def test_hello_with_bad_fields_is_refused():
    edge = Connection(Role.EDGE)
    with pytest.raises(ProtocolError):
        edge.receive_data(encode_frame(FrameType.HELLO, 0, b'{"versions":[1],"agent_id":"../etc","capacity":1}'))


def test_hello_carries_the_instance_and_health_path_and_old_hellos_still_decode():
    edge = Connection(Role.EDGE)
    agent = Connection(Role.AGENT)
    agent.send_hello(Hello("w1", instance="0123456789abcdef", health_path="/v2/health/ready?x=1"))
    (ev,) = pump(agent, edge)
    assert ev.hello.instance == "0123456789abcdef" and ev.hello.health_path == "/v2/health/ready?x=1"
    # An agent from before these fields: decodes, both empty (= not declared).
    old = Hello.decode(b'{"versions":[1],"agent_id":"w1","pool":"p","capacity":2}')
    assert old.instance == "" and old.health_path == "" and old.capacity == 2
    # Not declared -> not sent at all: what an older edge sees is unchanged.
    assert b"instance" not in Hello("w1").encode() and b"health_path" not in Hello("w1").encode()


@pytest.mark.parametrize("field", [
    '"instance":"short"', '"instance":"has space in it"', '"instance":12345678', '"instance":"' + "a" * 65 + '"',
    '"health_path":"healthz"', '"health_path":"//evil.example/x"', '"health_path":"/with space"', '"health_path":"/\u00e9"', '"health_path":["/x"]',
    '"health_path":"/' + "a" * 1024 + '"',
])
def test_hello_with_a_bad_instance_or_health_path_is_refused(field):
    edge = Connection(Role.EDGE)
    payload = ('{"versions":[1],"agent_id":"w1","capacity":1,' + field + "}").encode()
    with pytest.raises(ProtocolError, match="HELLO (instance|health_path)"):
        edge.receive_data(encode_frame(FrameType.HELLO, 0, payload))
    assert edge.data_to_send()[0] == FrameType.GOAWAY  # the agent is told why


def test_refusing_a_duplicate_id_reaches_the_agent_as_goaway_duplicate_id():
    edge = Connection(Role.EDGE)
    agent = Connection(Role.AGENT)
    agent.send_hello(Hello("w1", instance="0123456789abcdef"))
    pump(agent, edge)
    edge.reject(ErrorCode.DUPLICATE_ID, "another worker process already uses it")
    (ev,) = pump(edge, agent)
    assert isinstance(ev, GoAwayReceived) and ev.code is ErrorCode.DUPLICATE_ID
    assert ev.reason == "another worker process already uses it" and agent.state is State.CLOSED


def test_resetting_a_stream_whose_head_never_left_sends_nothing():
    edge, agent = pair()
    sid = edge.open_stream()
    edge.reset_stream(sid)
    assert edge.data_to_send() == b""
    sid2 = edge.open_stream()  # ids may skip: the agent only needs them increasing
    edge.send_request(sid2, RequestHead("GET", "/"), end_stream=True)
    (ev,) = pump(edge, agent)
    assert isinstance(ev, RequestReceived) and ev.stream_id == sid2


# --------------------------------------------- several edge processes (WELCOME process/processes)
def test_welcome_names_the_accepting_process_and_how_many_share_the_port():
    edge = Connection(Role.EDGE)
    agent = Connection(Role.AGENT)
    agent.send_hello(Hello("w1", process_aware=True))
    (ev,) = pump(agent, edge)
    assert isinstance(ev, HelloReceived) and ev.hello.process_aware
    edge.accept(process=1, processes=3)
    (ev2,) = pump(edge, agent)
    assert isinstance(ev2, WelcomeReceived)
    assert (ev2.welcome.process, ev2.welcome.processes) == (1, 3)


def test_one_process_edge_sends_no_process_fields_and_old_welcomes_mean_0_of_1():
    import json

    from tunnel.handshake import Welcome

    one = json.loads(Welcome(1, "s").encode())
    assert "process" not in one and "processes" not in one  # byte-for-byte what an old edge sends
    old = Welcome.decode(json.dumps({"version": 1, "session_id": "s"}).encode())
    assert (old.process, old.processes) == (0, 1)
    assert "process_aware" not in json.loads(Hello("w1").encode())  # an unaware HELLO is unchanged
    assert not Hello.decode(json.dumps({"versions": [1], "agent_id": "w1"}).encode()).process_aware


def test_old_agent_decoding_ignores_the_new_welcome_fields():
    """An old agent's decoder reads only the keys it knows: the new ones must
    not disturb them (simulated by decoding with the fields and dropping them)."""
    import json

    from tunnel.handshake import Welcome

    wire = json.loads(Welcome(1, "s", 0.5, process=1, processes=2).encode())
    assert wire["process"] == 1 and wire["processes"] == 2
    old_view = {k: wire[k] for k in ("version", "session_id", "heartbeat_interval", "settings")}
    assert Welcome.decode(json.dumps(old_view).encode()).heartbeat_interval == 0.5


@pytest.mark.parametrize("fields", [
    {"processes": 0}, {"processes": 2000}, {"processes": True}, {"processes": "2"},
    {"process": 2, "processes": 2}, {"process": -1, "processes": 2}, {"process": 1}, {"process": 0.5, "processes": 2},
])
def test_malformed_process_fields_are_protocol_errors(fields):
    import json

    from tunnel.handshake import Welcome

    with pytest.raises(ProtocolError):
        Welcome.decode(json.dumps({"version": 1, "session_id": "s", **fields}).encode())


def test_malformed_process_aware_is_a_protocol_error():
    import json

    with pytest.raises(ProtocolError):
        Hello.decode(json.dumps({"versions": [1], "agent_id": "w1", "process_aware": "yes"}).encode())


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_cut_of_the_byte_stream_gives_the_same_frames(kind):
    """The agent feeds WebSocket payload pieces as the transport reads them:
    every cut point, over any bytes-like input, decodes to the same frames,
    and a mutable input changed after the call does not change them."""
    from tunnel.frames import FrameDecoder

    frames = [encode_frame(FrameType.DATA, 1, bytes(range(200))), encode_frame(FrameType.PING, 0, b"12345678"),
              encode_frame(FrameType.DATA, 3, b""), encode_frame(FrameType.DATA, 5, b"x" * 30)]
    raw = b"".join(frames)
    want = FrameDecoder(1024).feed(raw)
    assert len(want) == 4
    for a in range(len(raw) + 1):
        for b in range(a, len(raw) + 1, 13):
            d = FrameDecoder(1024)
            got = []
            for piece in (raw[:a], raw[a:b], raw[b:]):
                buf = bytearray(piece) if kind is bytearray else piece
                got += d.feed(kind(buf) if kind is memoryview else buf)
                if isinstance(buf, bytearray):
                    buf[:] = b"\xff" * len(buf)  # the caller reuses its buffer
            assert got == want, (a, b)
            assert all(type(f.payload) is bytes for f in got)
            assert d.buffered == 0
