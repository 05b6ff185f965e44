"""Binary framing of the tunnel: frame header layout, frame types, the
incremental decoder, and the encoding of request/response heads.

Frame layout (big endian): type u8 | flags u8 | stream_id u32 | length u32 | payload.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from .errors import ProtocolError

HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size  # 10 bytes
MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1


class FrameType(IntEnum):
    HELLO = 1  # agent -> edge, stream 0: JSON handshake
    WELCOME = 2  # edge -> agent, stream 0: JSON handshake answer
    HEADERS = 3  # request head (edge -> agent) or response head (agent -> edge)
    DATA = 4  # body bytes, flow controlled
    WINDOW_UPDATE = 5  # u32 increment; stream 0 = connection budget
    RESET = 6  # u32 error code + utf-8 reason
    PING = 7  # u64 opaque timestamp; flag ACK on the answer
    GOAWAY = 8  # u32 last stream id + u32 code + utf-8 reason
    STATUS = 9  # agent -> edge, stream 0: JSON health report


FLAG_END_STREAM = 0x1
FLAG_ACK = 0x2

_KNOWN_FLAGS = {
    FrameType.HEADERS: FLAG_END_STREAM,
    FrameType.DATA: FLAG_END_STREAM,
    FrameType.PING: FLAG_ACK,
}
_STREAM_ZERO_ONLY = {
    FrameType.HELLO,
    FrameType.WELCOME,
    FrameType.PING,
    FrameType.GOAWAY,
    FrameType.STATUS,
}
_STREAM_REQUIRED = {FrameType.HEADERS, FrameType.DATA, FrameType.RESET}


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    flags: int
    stream_id: int
    payload: bytes

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & FLAG_END_STREAM)


def encode_frame(ftype: FrameType, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(ftype, flags, stream_id, len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into frames, validating each header as soon as it is
    complete, so that a lying length never makes it buffer more than
    `HEADER_SIZE + max_frame_size` bytes.

    The input may be cut anywhere (the agent feeds WebSocket payloads piece
    by piece as the transport reads them). Each payload is copied once: a
    slice when the frame lies in one input, a join of the pieces when it
    straddles several (held as views of read-only inputs until then)."""

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._head = b""  # the start of a header cut by the end of an input
        self._frame: tuple[FrameType, int, int] | None = None  # a frame whose payload is incomplete
        self._parts: list[bytes | memoryview] = []  # its payload so far
        self._missing = 0  # its missing payload bytes
        self._held = 0  # bytes in _parts

    @property
    def buffered(self) -> int:
        return len(self._head) + self._held

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        n = len(view)
        pos = 0
        if self._head:
            need = HEADER_SIZE - len(self._head)
            if n < need:
                self._head += bytes(view)
                return frames
            header = self._head + bytes(view[:need])
            self._head = b""
            pos = need
            ftype, flags, stream_id, length = HEADER.unpack(header)
            frame_type = self._check_header(ftype, flags, stream_id, length)
            self._frame, self._missing = (frame_type, flags, stream_id), length
        if self._frame is not None:
            take = min(self._missing, n - pos)
            if take:
                self._parts.append(view[pos : pos + take] if view.readonly else bytes(view[pos : pos + take]))
                self._held += take
                self._missing -= take
                pos += take
            if self._missing:
                return frames
            frame_type, flags, stream_id = self._frame
            parts = self._parts
            frames.append(Frame(frame_type, flags, stream_id, bytes(parts[0]) if len(parts) == 1 else b"".join(parts)))
            self._frame, self._parts, self._held = None, [], 0
        while n - pos >= HEADER_SIZE:
            ftype, flags, stream_id, length = HEADER.unpack_from(view, pos)
            frame_type = self._check_header(ftype, flags, stream_id, length)
            start = pos + HEADER_SIZE
            end = start + length
            if end > n:
                self._frame, self._missing = (frame_type, flags, stream_id), end - n
                if start < n:
                    self._parts = [view[start:] if view.readonly else bytes(view[start:])]
                    self._held = n - start
                return frames
            frames.append(Frame(frame_type, flags, stream_id, bytes(view[start:end])))
            pos = end
        if pos < n:
            self._head = bytes(view[pos:])
        return frames

    def _check_header(self, ftype: int, flags: int, stream_id: int, length: int) -> FrameType:
        try:
            frame_type = FrameType(ftype)
        except ValueError:
            raise ProtocolError(f"unknown frame type {ftype}") from None
        if length > self.max_frame_size:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame_size}")
        if flags & ~_KNOWN_FLAGS.get(frame_type, 0):
            raise ProtocolError(f"unknown flags 0x{flags:02x} on {frame_type.name}")
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError("stream id out of range")
        if frame_type in _STREAM_ZERO_ONLY and stream_id != 0:
            raise ProtocolError(f"{frame_type.name} must be sent on stream 0")
        if frame_type in _STREAM_REQUIRED and stream_id == 0:
            raise ProtocolError(f"{frame_type.name} must not be sent on stream 0")
        return frame_type


# --- heads -----------------------------------------------------------------

Headers = tuple[tuple[str, str], ...]

# Regexes rather than per-byte Python loops: heads are decoded on every request.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_VALUE_BYTES = re.compile(rb"[\r\n\x00]")
_FORBIDDEN_TARGET_BYTES = re.compile(rb"[\x00-\x20\x7f]")


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # origin-form only: "/path?query"
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: Headers = ()


def _is_token(value: bytes) -> bool:
    return _TOKEN.fullmatch(value) is not None


_U16 = struct.Struct("!H")


def encode_fields(fields: list[bytes]) -> bytes:
    out = [_U16.pack(len(fields))]
    for f in fields:
        out.append(_U16.pack(len(f)))
        out.append(f)
    return b"".join(out)


def decode_fields(block: bytes, max_fields: int) -> list[bytes]:
    if len(block) < 2:
        raise ProtocolError("truncated header block")
    (count,) = _U16.unpack_from(block, 0)
    if count > max_fields:
        raise ProtocolError(f"header block has {count} fields, limit {max_fields}")
    pos = 2
    fields: list[bytes] = []
    for _ in range(count):
        if pos + 2 > len(block):
            raise ProtocolError("truncated header block")
        (flen,) = _U16.unpack_from(block, pos)
        pos += 2
        if pos + flen > len(block):
            raise ProtocolError("truncated header block")
        fields.append(block[pos : pos + flen])
        pos += flen
    if pos != len(block):
        raise ProtocolError("trailing bytes after header block")
    return fields


# Header values travel as the exact bytes they arrived as: str values hold
# them decoded as UTF-8 with surrogateescape (as aiohttp decodes them).
def _encode_headers(headers: Headers) -> list[bytes]:
    out: list[bytes] = []
    for name, value in headers:
        out.append(name.encode("ascii"))
        out.append(value.encode("utf-8", "surrogateescape"))
    return out


def _decode_headers(fields: list[bytes]) -> Headers:
    if len(fields) % 2:
        raise ProtocolError("header name without value")
    pairs = []
    for i in range(0, len(fields), 2):
        name, value = fields[i], fields[i + 1]
        if not _is_token(name):
            raise ProtocolError("invalid header name")
        if _FORBIDDEN_VALUE_BYTES.search(value):
            raise ProtocolError("invalid byte in header value")
        pairs.append((name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
    return tuple(pairs)


def encode_request_head(head: RequestHead) -> bytes:
    target = head.target.encode("utf-8", "surrogateescape")
    return encode_fields([head.method.encode("ascii"), target] + _encode_headers(head.headers))


def decode_request_head(block: bytes, max_fields: int) -> RequestHead:
    fields = decode_fields(block, max_fields)
    if len(fields) < 2:
        raise ProtocolError("request head without method and target")
    method, target = fields[0], fields[1]
    if not _is_token(method):
        raise ProtocolError("invalid request method")
    # Only origin-form targets: the agent must never be steered to another host.
    if not target.startswith(b"/") or target.startswith(b"//"):
        raise ProtocolError("request target must be in origin form")
    if _FORBIDDEN_TARGET_BYTES.search(target):
        raise ProtocolError("invalid byte in request target")
    return RequestHead(method.decode("ascii"), target.decode("utf-8", "surrogateescape"), _decode_headers(fields[2:]))


def encode_response_head(head: ResponseHead) -> bytes:
    return encode_fields([str(head.status).encode("ascii")] + _encode_headers(head.headers))


def decode_response_head(block: bytes, max_fields: int) -> ResponseHead:
    fields = decode_fields(block, max_fields)
    if not fields:
        raise ProtocolError("response head without status")
    raw = fields[0]
    if len(raw) != 3 or not raw.isdigit() or not 100 <= int(raw) <= 599:
        raise ProtocolError("invalid response status")
    return ResponseHead(int(raw), _decode_headers(fields[1:]))
