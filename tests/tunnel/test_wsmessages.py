"""The WebSocket message encoding of tunnel streams: round trips, close
payloads, limits, and (property) any split of the byte stream into DATA
frames yields the same messages with bounded buffering."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.errors import ProtocolError
from tunnel.wsmessages import (
    HEAD_SIZE,
    Kind,
    Message,
    MessageDecoder,
    MessageTooBig,
    decode_close,
    encode_close,
    encode_message,
)


def test_round_trip_of_every_kind() -> None:
    msgs = [Message(Kind.TEXT, "héllo".encode()), Message(Kind.BINARY, b"\x00" * 70000),
            Message(Kind.PING, b"p"), Message(Kind.PONG, b""), Message(Kind.CLOSE, encode_close(4321, "why")[5:])]
    data = b"".join(encode_message(m.kind, m.payload) for m in msgs)
    assert MessageDecoder().feed(data) == msgs


def test_close_payloads() -> None:
    payload = encode_close(4321, "why")[HEAD_SIZE:]
    assert decode_close(payload) == (4321, "why")
    assert decode_close(b"") == (1005, "")
    with pytest.raises(ProtocolError):
        decode_close(b"\x03")
    with pytest.raises(ValueError):
        encode_close(1006)
    # A long reason is cut to fit a close frame, never inside a character.
    long = encode_close(1000, "é" * 100)[HEAD_SIZE:]
    assert len(long) <= 125
    code, reason = decode_close(long)
    assert code == 1000 and reason == "é" * 61


def test_limits_are_enforced_from_the_head() -> None:
    d = MessageDecoder(max_message=1000)
    with pytest.raises(MessageTooBig):
        d.feed(encode_message(Kind.BINARY, b"x" * 1001)[:HEAD_SIZE])  # refused before any payload arrives
    with pytest.raises(ProtocolError):
        MessageDecoder().feed(b"\x09\x00\x00\x00\x00")  # unknown kind
    with pytest.raises(ProtocolError):
        MessageDecoder().feed(encode_message(Kind.PING, b"x" * 126)[:HEAD_SIZE])


def test_split_at_every_byte() -> None:
    data = encode_message(Kind.TEXT, b"abc") + encode_message(Kind.BINARY, b"") + encode_message(Kind.PONG, b"z")
    d = MessageDecoder()
    out: list[Message] = []
    for i in range(len(data)):
        out += d.feed(data[i : i + 1])
    assert out == [Message(Kind.TEXT, b"abc"), Message(Kind.BINARY, b""), Message(Kind.PONG, b"z")]
    assert d.buffered == 0


_message = st.one_of(
    st.tuples(st.sampled_from([Kind.TEXT, Kind.BINARY]), st.binary(max_size=3000)),
    st.tuples(st.sampled_from([Kind.PING, Kind.PONG]), st.binary(max_size=125)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_message, max_size=20), st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=50))
def test_any_split_yields_the_same_messages(messages: list[tuple[Kind, bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_message(k, p) for k, p in messages)
    d = MessageDecoder(max_message=3000)
    out: list[Message] = []
    pos, i = 0, 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        out += d.feed(data[pos : pos + n])
        pos += n
        i += 1
        # At most one incomplete message (and its head) is ever held.
        assert d.buffered < HEAD_SIZE + 3000
    assert out == [Message(k, p) for k, p in messages]
    assert d.buffered == 0
