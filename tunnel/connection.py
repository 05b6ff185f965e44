"""The tunnel connection state machine (sans-I/O): bytes in -> events out,
API calls -> bytes out. It owns every stream's state and all flow control.

The edge opens streams (odd ids, increasing); the agent answers them. Each
side announces its receive limits (`PeerSettings`) in the handshake and the
other side must stay within them: DATA beyond a window is a protocol error,
so memory held for a peer is bounded by `stream_window` per stream and
`connection_window` per tunnel.

Long because one class owns every transition of every stream: splitting it
would spread each stream's state, which is the thing to keep in one place.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, replace
from enum import Enum

from .errors import ErrorCode, ProtocolError, StreamClosedError, UsageError
from .events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    StatusReceived,
    StreamReset,
    WelcomeReceived,
    WindowUpdated,
)
from .frames import (
    FLAG_ACK,
    FLAG_END_STREAM,
    HEADER,
    MAX_WINDOW,
    Frame,
    FrameDecoder,
    FrameType,
    RequestHead,
    ResponseHead,
    decode_request_head,
    decode_response_head,
    encode_frame,
    encode_request_head,
    encode_response_head,
)
from .handshake import Hello, PeerSettings, Welcome, WorkerStatus, choose_version

_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_GOAWAY = struct.Struct("!II")
MAX_REASON = 512


class Role(Enum):
    EDGE = "edge"
    AGENT = "agent"


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"  # GOAWAY sent or received: no new streams
    CLOSED = "closed"


@dataclass(slots=True)
class _Stream:
    send_window: int
    recv_window: int  # credit the peer still has on this stream
    recv_unacked: int = 0  # received and not yet acknowledged by the application
    local_open: bool = True  # we may still send body
    remote_open: bool = True  # the peer may still send body
    head_sent: bool = False
    head_received: bool = False


class Connection:
    """One end of a tunnel. Call `receive_data()` with bytes from the peer and
    send whatever `data_to_send()` returns after any call."""

    def __init__(self, role: Role, settings: PeerSettings | None = None) -> None:
        self.role = role
        self.local_settings = settings or PeerSettings()
        self.peer_settings = PeerSettings()  # replaced by the handshake
        self.state = State.HANDSHAKE
        self.version: int | None = None
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self._decoder = FrameDecoder(self.local_settings.max_frame_size)
        self._out: list[bytes | memoryview] = []  # frames, a DATA payload apart from its header (no copy)
        self._streams: dict[int, _Stream] = {}
        self._highest_stream_id = 0
        self._next_stream_id = 1
        self._conn_send_window = 0
        self._conn_recv_window = self.local_settings.connection_window
        self._conn_recv_unacked = 0
        self.goaway_received: GoAwayReceived | None = None

    # ------------------------------------------------------------ inspection
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def stream_ids(self) -> list[int]:
        return list(self._streams)

    @property
    def buffered_bytes(self) -> int:
        return self._decoder.buffered

    @property
    def highest_stream_id(self) -> int:
        return self._highest_stream_id

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def can_send_body(self, stream_id: int) -> bool:
        s = self._streams.get(stream_id)
        return s is not None and s.local_open

    def send_window(self, stream_id: int) -> int:
        """Bytes of body that may be sent on the stream right now."""
        s = self._streams.get(stream_id)
        if s is None or not s.local_open:
            return 0
        return max(0, min(s.send_window, self._conn_send_window))

    @property
    def connection_send_window(self) -> int:
        return self._conn_send_window

    @property
    def connection_recv_window(self) -> int:
        return self._conn_recv_window

    def stream_windows(self, stream_id: int) -> tuple[int, int]:
        """(send_window, recv_window) of one stream, for tests and metrics."""
        s = self._streams[stream_id]
        return s.send_window, s.recv_window

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def frames_to_send(self) -> list[bytes | memoryview]:
        """What `data_to_send()` would join, unjoined: frame headers and
        DATA payloads as the senders gave them (views included), for a
        writer that can write several buffers without a copy."""
        out = self._out
        self._out = []
        return out

    # ------------------------------------------------------------- handshake
    def send_hello(self, hello: Hello) -> None:
        self._require_role(Role.AGENT)
        if self.hello is not None:
            raise UsageError("HELLO already sent")
        hello = replace(hello, settings=self.local_settings)
        self.hello = hello
        self._emit(FrameType.HELLO, 0, hello.encode())

    def accept(self, heartbeat_interval: float = 1.0, session_id: str | None = None, process: int = 0,
               processes: int = 1) -> Welcome:
        """(edge) Accept the HELLO just received; `process` of `processes` names
        the edge process that accepted (`edge-proxy serve --processes N`)."""
        self._require_role(Role.EDGE)
        if self.hello is None or self.state is not State.HANDSHAKE:
            raise UsageError("accept() needs a pending HELLO")
        version = choose_version(self.hello.versions)
        if version is None:
            raise UsageError("no common protocol version; call reject()")
        welcome = Welcome(version, session_id or uuid.uuid4().hex, heartbeat_interval, self.local_settings, process,
                          processes)
        self.welcome = welcome
        self.version = version
        self._emit(FrameType.WELCOME, 0, welcome.encode())
        self.state = State.OPEN
        return welcome

    def reject(self, code: ErrorCode, reason: str) -> None:
        """Refuse the tunnel (edge) or give up on it (agent) with a GOAWAY."""
        self._emit(FrameType.GOAWAY, 0, _GOAWAY.pack(0, code) + _reason(reason))
        self.state = State.CLOSED

    # --------------------------------------------------------------- streams
    def open_stream(self) -> int:
        """(edge) Reserve the id of a new stream; send its head with `send_request`."""
        self._require_role(Role.EDGE)
        self._require_open()
        if len(self._streams) >= self.peer_settings.max_streams:
            raise UsageError(f"peer accepts at most {self.peer_settings.max_streams} streams")
        sid = self._next_stream_id
        if sid > 2**31 - 1:
            raise UsageError("stream ids exhausted; open a new tunnel")
        self._next_stream_id += 2
        self._highest_stream_id = sid
        self._streams[sid] = _Stream(self.peer_settings.stream_window, self.local_settings.stream_window)
        return sid

    def send_request(self, stream_id: int, head: RequestHead, end_stream: bool = False) -> None:
        self._require_role(Role.EDGE)
        self._send_head(stream_id, encode_request_head(head), end_stream)

    def send_response(self, stream_id: int, head: ResponseHead, end_stream: bool = False) -> None:
        self._require_role(Role.AGENT)
        s = self._live_stream(stream_id)
        if not s.head_received:
            raise UsageError("cannot answer a stream before its request head")
        self._send_head(stream_id, encode_response_head(head), end_stream)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Send body bytes; `len(data)` must not exceed `send_window(stream_id)`.
        The payload is not copied: the caller must not change `data` until
        `data_to_send()` has been called."""
        s = self._live_stream(stream_id)
        if not s.head_sent:
            raise UsageError("send the head before the body")
        if not s.local_open:
            raise StreamClosedError(f"stream {stream_id} already ended")
        n = len(data)
        if n > s.send_window or n > self._conn_send_window:
            raise UsageError(f"{n} bytes exceed the send window ({self.send_window(stream_id)})")
        max_frame = self.peer_settings.max_frame_size
        end_flag = FLAG_END_STREAM if end_stream else 0
        if n <= max_frame:
            self._out.append(HEADER.pack(FrameType.DATA, end_flag, stream_id, n))
            if n:
                self._out.append(data)
        else:
            view = memoryview(data)
            for start in range(0, n, max_frame):
                chunk = view[start : start + max_frame]
                last = start + max_frame >= n
                self._out.append(HEADER.pack(FrameType.DATA, end_flag if last else 0, stream_id, len(chunk)))
                self._out.append(chunk)
        s.send_window -= n
        self._conn_send_window -= n
        if end_stream:
            s.local_open = False
            self._maybe_close(stream_id, s)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        """Cancel a stream. Resetting an already closed stream does nothing."""
        s = self._streams.pop(stream_id, None)
        if s is None:
            return
        self._release_recv_credit(s)
        # A stream whose head never left is unknown to the peer: say nothing
        # (a RESET for it would be a protocol error there).
        if self.state is not State.CLOSED and (s.head_sent or s.head_received):
            self._emit(FrameType.RESET, stream_id, _U32.pack(code) + _reason(reason))

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed `n` bytes of body: give the credit back."""
        if n <= 0:
            return
        s = self._streams.get(stream_id)
        if s is not None:
            if n > s.recv_unacked:
                raise UsageError("acknowledging more than was received")
            s.recv_unacked -= n
            if s.remote_open:
                pending = self.local_settings.stream_window - s.recv_window - s.recv_unacked
                # Batch updates: one frame per half window keeps the overhead low.
                if pending >= self.local_settings.stream_window // 2:
                    s.recv_window += pending
                    self._emit(FrameType.WINDOW_UPDATE, stream_id, _U32.pack(pending))
        self._credit_connection(n)

    # ------------------------------------------------------------- liveness
    def ping(self, timestamp: int) -> None:
        """Send a heartbeat carrying an opaque timestamp (e.g. monotonic ns).
        Before the handshake completes nothing but HELLO/WELCOME may be sent,
        so it is skipped then."""
        if self.state in (State.OPEN, State.CLOSING):
            self._emit(FrameType.PING, 0, _U64.pack(timestamp & 0xFFFFFFFFFFFFFFFF))

    def send_status(self, status: WorkerStatus) -> None:
        self._require_role(Role.AGENT)
        self._require_open()
        self._emit(FrameType.STATUS, 0, status.encode())

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Start draining: no new streams; existing ones may finish."""
        if self.state is State.CLOSED:
            return
        self._emit(FrameType.GOAWAY, 0, _GOAWAY.pack(self._highest_stream_id, code) + _reason(reason))
        if self.state is not State.HANDSHAKE:
            self.state = State.CLOSING

    def close(self) -> None:
        """The transport is gone: forget every stream."""
        self.state = State.CLOSED
        self._streams.clear()

    # -------------------------------------------------------------- receive
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer. Raises `ProtocolError` (only) on bad input;
        the connection is then unusable and should be closed."""
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        try:
            for frame in self._decoder.feed(data):
                self._handle(frame, events)
        except ProtocolError as exc:
            # Tell the peer why before the transport is closed.
            self.reject(exc.code, str(exc))
            raise
        return events

    def _handle(self, f: Frame, events: list[Event]) -> None:
        t = f.type
        if self.state is State.HANDSHAKE:
            self._handle_handshake(f, events)
            return
        if t is FrameType.DATA:
            self._on_data(f, events)
        elif t is FrameType.HEADERS:
            self._on_headers(f, events)
        elif t is FrameType.WINDOW_UPDATE:
            self._on_window_update(f, events)
        elif t is FrameType.RESET:
            self._on_reset(f, events)
        elif t is FrameType.PING:
            if len(f.payload) != 8:
                raise ProtocolError("PING payload must be 8 bytes")
            if f.flags & FLAG_ACK:
                events.append(PongReceived(_U64.unpack(f.payload)[0]))
            else:
                self._emit(FrameType.PING, 0, f.payload, FLAG_ACK)
        elif t is FrameType.GOAWAY:
            events.append(self._on_goaway(f))
        elif t is FrameType.STATUS:
            if self.role is not Role.EDGE:
                raise ProtocolError("only the agent sends STATUS")
            events.append(StatusReceived(WorkerStatus.decode(f.payload)))
        else:  # HELLO / WELCOME after the handshake
            raise ProtocolError(f"unexpected {t.name} after the handshake")

    def _handle_handshake(self, f: Frame, events: list[Event]) -> None:
        if f.type is FrameType.GOAWAY:
            events.append(self._on_goaway(f))
            self.state = State.CLOSED
            return
        if self.role is Role.EDGE:
            if f.type is not FrameType.HELLO or self.hello is not None:
                raise ProtocolError("the tunnel must start with one HELLO")
            hello = Hello.decode(f.payload)
            self.hello = hello
            self.peer_settings = hello.settings
            self._conn_send_window = hello.settings.connection_window
            events.append(HelloReceived(hello))
        else:
            if f.type is not FrameType.WELCOME or self.hello is None:
                raise ProtocolError("expected WELCOME")
            welcome = Welcome.decode(f.payload)
            self.welcome = welcome
            self.version = welcome.version
            self.peer_settings = welcome.settings
            self._conn_send_window = welcome.settings.connection_window
            self.state = State.OPEN
            events.append(WelcomeReceived(welcome))

    def _on_headers(self, f: Frame, events: list[Event]) -> None:
        sid = f.stream_id
        if self.role is Role.AGENT:
            if sid in self._streams:
                raise ProtocolError(f"second head on stream {sid}")
            if sid % 2 == 0 or sid <= self._highest_stream_id:
                raise ProtocolError(f"stream id {sid} is not a new edge stream")
            self._highest_stream_id = sid
            head = decode_request_head(f.payload, self.local_settings.max_header_fields)
            if self.state is State.CLOSING or len(self._streams) >= self.local_settings.max_streams:
                # A race with a reset the edge has not seen yet is possible:
                # refuse (retryable) instead of killing the tunnel.
                # Any DATA still in flight for it is counted and freed as for
                # every closed stream.
                self._emit(FrameType.RESET, sid, _U32.pack(ErrorCode.REFUSED_STREAM) + b"stream limit or draining")
                return
            s = _Stream(self.peer_settings.stream_window, self.local_settings.stream_window, head_received=True)
            if f.end_stream:
                s.remote_open = False
            self._streams[sid] = s
            events.append(RequestReceived(sid, head, f.end_stream))
        else:
            s_or_none = self._streams.get(sid)
            if s_or_none is None:
                if sid % 2 == 0 or sid > self._highest_stream_id:
                    raise ProtocolError(f"response on stream {sid} that was never opened")
                return  # we reset it already
            if s_or_none.head_received:
                raise ProtocolError(f"second head on stream {sid}")
            head_r = decode_response_head(f.payload, self.local_settings.max_header_fields)
            s_or_none.head_received = True
            if f.end_stream:
                s_or_none.remote_open = False
            events.append(ResponseReceived(sid, head_r, f.end_stream))
            self._maybe_close(sid, s_or_none)

    def _on_data(self, f: Frame, events: list[Event]) -> None:
        sid = f.stream_id
        n = len(f.payload)
        if n > self._conn_recv_window:
            raise ProtocolError("DATA exceeds the connection window", ErrorCode.FLOW_CONTROL_ERROR)
        s = self._streams.get(sid)
        if s is None:
            if sid % 2 == 0 or sid > self._highest_stream_id:
                raise ProtocolError(f"DATA on stream {sid} that was never opened")
            # A stream we reset: the bytes were in flight. Count and free them.
            self._conn_recv_window -= n
            self._conn_recv_unacked += n
            self._credit_connection(n)
            return
        if not s.head_received:
            raise ProtocolError(f"DATA before the head on stream {sid}")
        if not s.remote_open:
            raise ProtocolError(f"DATA after the end of stream {sid}")
        if n > s.recv_window:
            raise ProtocolError(f"DATA exceeds the window of stream {sid}", ErrorCode.FLOW_CONTROL_ERROR)
        s.recv_window -= n
        s.recv_unacked += n
        self._conn_recv_window -= n
        self._conn_recv_unacked += n
        if f.end_stream:
            s.remote_open = False
        events.append(DataReceived(sid, f.payload, f.end_stream))
        self._maybe_close(sid, s)

    def _on_window_update(self, f: Frame, events: list[Event]) -> None:
        if len(f.payload) != 4:
            raise ProtocolError("WINDOW_UPDATE payload must be 4 bytes")
        (inc,) = _U32.unpack(f.payload)
        if inc == 0:
            raise ProtocolError("WINDOW_UPDATE of 0")
        if f.stream_id == 0:
            if self._conn_send_window + inc > MAX_WINDOW:
                raise ProtocolError("connection window overflow", ErrorCode.FLOW_CONTROL_ERROR)
            self._conn_send_window += inc
            events.append(WindowUpdated(0))
            return
        s = self._streams.get(f.stream_id)
        if s is None:
            if f.stream_id > self._highest_stream_id:
                raise ProtocolError("WINDOW_UPDATE on a stream that was never opened")
            return
        if s.send_window + inc > MAX_WINDOW:
            raise ProtocolError("stream window overflow", ErrorCode.FLOW_CONTROL_ERROR)
        s.send_window += inc
        events.append(WindowUpdated(f.stream_id))

    def _on_reset(self, f: Frame, events: list[Event]) -> None:
        if len(f.payload) < 4 or len(f.payload) > 4 + MAX_REASON:
            raise ProtocolError("RESET payload must be a code and a short reason")
        (raw,) = _U32.unpack_from(f.payload)
        s = self._streams.pop(f.stream_id, None)
        if s is None:
            if f.stream_id > self._highest_stream_id:
                raise ProtocolError("RESET of a stream that was never opened")
            return
        self._release_recv_credit(s)
        events.append(StreamReset(f.stream_id, _code(raw), _text(f.payload[4:])))

    def _on_goaway(self, f: Frame) -> GoAwayReceived:
        if len(f.payload) < 8 or len(f.payload) > 8 + MAX_REASON:
            raise ProtocolError("GOAWAY payload must be last id, code and a short reason")
        last, raw = _GOAWAY.unpack_from(f.payload)
        ev = GoAwayReceived(last, _code(raw), _text(f.payload[8:]))
        self.goaway_received = ev
        if self.state is State.OPEN:
            self.state = State.CLOSING
        return ev

    # -------------------------------------------------------------- helpers
    def _send_head(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        s = self._live_stream(stream_id)
        if s.head_sent:
            raise UsageError(f"head already sent on stream {stream_id}")
        if len(block) > self.peer_settings.max_frame_size:
            raise UsageError("head larger than the peer's frame size")
        s.head_sent = True
        self._emit(FrameType.HEADERS, stream_id, block, FLAG_END_STREAM if end_stream else 0)
        if end_stream:
            s.local_open = False
            self._maybe_close(stream_id, s)

    def _live_stream(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise StreamClosedError(f"stream {stream_id} is closed")
        return s

    def _maybe_close(self, stream_id: int, s: _Stream) -> None:
        # The stream record stays while the application may still acknowledge
        # body bytes; those acks then only credit the connection.
        if not s.local_open and not s.remote_open and s.head_received and s.head_sent:
            self._streams.pop(stream_id, None)

    def _release_recv_credit(self, s: _Stream) -> None:
        if s.recv_unacked:
            self._credit_connection(s.recv_unacked)
            s.recv_unacked = 0

    def _credit_connection(self, n: int) -> None:
        self._conn_recv_unacked -= n
        if self._conn_recv_unacked < 0:
            # An over-acknowledgement is a local bug, never the peer's doing.
            self._conn_recv_unacked = 0
        pending = self.local_settings.connection_window - self._conn_recv_window - self._conn_recv_unacked
        if pending >= self.local_settings.connection_window // 4:
            self._conn_recv_window += pending
            if self.state is not State.CLOSED:
                self._emit(FrameType.WINDOW_UPDATE, 0, _U32.pack(pending))

    def _emit(self, ftype: FrameType, stream_id: int, payload: bytes, flags: int = 0) -> None:
        self._out.append(encode_frame(ftype, stream_id, payload, flags))

    def _require_role(self, role: Role) -> None:
        if self.role is not role:
            raise UsageError(f"only the {role.value} may do this")

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise UsageError(f"tunnel is {self.state.value}")


def _reason(reason: str) -> bytes:
    return reason.encode("utf-8")[:MAX_REASON]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _code(raw: int) -> ErrorCode:
    try:
        return ErrorCode(raw)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR
