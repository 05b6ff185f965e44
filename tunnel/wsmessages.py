"""WebSocket messages on a tunnel stream (sans-I/O).

A stream whose request head carries `Upgrade: websocket` and whose answer is
101 carries WebSocket messages in both directions as its body, each encoded
as: kind u8 | length u32 (big endian) | payload. A message may span DATA
frames and a DATA frame may hold several messages: the body is one byte
stream and `MessageDecoder` cuts it incrementally. A CLOSE message's payload
is the close code u16 and a UTF-8 reason, as in RFC 6455. See docs/protocol.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .errors import ProtocolError

_HEAD = struct.Struct("!BI")
HEAD_SIZE = _HEAD.size  # 5 bytes
_CODE = struct.Struct("!H")
MAX_CLOSE_REASON = 123  # RFC 6455: a control frame payload is at most 125 bytes
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


class Kind(IntEnum):
    TEXT = 1
    BINARY = 2
    PING = 3
    PONG = 4
    CLOSE = 5


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    payload: bytes


class MessageTooBig(ProtocolError):
    """A message announced more bytes than the decoder accepts (close 1009)."""


def encode_message(kind: Kind, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def sendable(code: int) -> bool:
    """Whether RFC 6455 lets `code` travel in a close frame (1005, 1006 and
    1015 only describe what happened; 1004 is reserved)."""
    return 1000 <= code <= 4999 and code not in (1004, 1005, 1006, 1015)


def encode_close(code: int, reason: str = "") -> bytes:
    """A CLOSE message; the reason is cut to what fits in a close frame."""
    if not sendable(code):
        raise ValueError(f"close code {code} cannot be sent")
    raw = reason.encode("utf-8")[:MAX_CLOSE_REASON]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")  # never cut inside a character
    return encode_message(Kind.CLOSE, _CODE.pack(code) + raw)


def decode_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a CLOSE message's payload. An empty payload means
    "no code" and reads as 1005, as RFC 6455 reports it."""
    if not payload:
        return 1005, ""
    if len(payload) < 2:
        raise ProtocolError("close message with a truncated code")
    (code,) = _CODE.unpack_from(payload)
    return code, payload[2:].decode("utf-8", "replace")


class MessageDecoder:
    """Cuts a stream body into messages. Holds at most one incomplete message
    of at most `max_message` bytes plus one head."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buffer = bytearray()
        self._need: int | None = None  # payload length of the message being read
        self._kind = Kind.BINARY

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        out: list[Message] = []
        buf = self._buffer
        pos = 0
        while True:
            if self._need is None:
                if len(buf) - pos < HEAD_SIZE:
                    break
                raw_kind, length = _HEAD.unpack_from(buf, pos)
                try:
                    self._kind = Kind(raw_kind)
                except ValueError:
                    raise ProtocolError(f"unknown WebSocket message kind {raw_kind}") from None
                if length > self.max_message:
                    raise MessageTooBig(f"message of {length} bytes exceeds the limit of {self.max_message}")
                if self._kind >= Kind.PING and length > 125:
                    raise ProtocolError("control message longer than 125 bytes")
                self._need = length
                pos += HEAD_SIZE
            if len(buf) - pos < self._need:
                break
            end = pos + self._need
            out.append(Message(self._kind, bytes(buf[pos:end])))
            pos = end
            self._need = None
        if pos:
            del buf[:pos]
        return out
