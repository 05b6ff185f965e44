"""The agent's WebSocket connection to the edge: `websockets`' sans-I/O
`ClientProtocol` driven from our own asyncio protocol, not its asyncio client.

Why: the asyncio client reads every message through a task, a queue and
three copies (the sans-I/O reader's buffer, its exact reads, the message
assembler), which was ~45% of the agent's CPU on a 1 MB upload. Here the
payload of each received binary frame goes to `on_data` from
`data_received`, in the same call, as views of the bytes the transport
delivered, piece by piece as they arrive: no copy and no join here. The
tunnel's messages are one byte stream to its decoder (it takes any cut of
it and copies each payload once), so message boundaries need not be kept.

What `websockets` still does: the opening handshake (request, Sec-WebSocket-
Accept check, `InvalidStatus` for a refusal such as 401/403), every control
frame (ping -> pong, the closing handshake, close codes), fragmented and
text messages, and every protocol error (a masked frame, RSV bits, a
message over `max_size` -> close 1009). Only one kind of frame skips it:
an unfragmented, unmasked binary frame within `max_size` while no
fragmented message is in progress. Our reader keeps track of frame
boundaries and hands websockets every other frame's bytes unchanged, so its
parser always sees whole frames in order.

Sending: `send()` frames with websockets (`send_binary`, masked as a client
must) and writes the result in one `transport.writelines`; it waits only
while the transport's buffer is above its high-water mark
(`pause_writing`/`resume_writing`). Receive-side memory is bounded by the
tunnel's own flow control (the edge never sends beyond the windows we
announced), plus one message in assembly (at most `max_size`).

Not supported: HTTP/SOCKS proxies (the agent then uses websockets' asyncio
client) and permessage-deflate (the tunnel never offers it).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.proxy import get_proxy
from websockets.uri import WebSocketURI, parse_uri

FIN_BINARY = 0x82  # FIN set, no RSV bits, opcode 2
MAX_HANDSHAKE = 64 * 1024  # an answer head longer than this is not a WebSocket handshake

# Reader modes.
_HANDSHAKE, _FRAMES, _WEBSOCKETS, _STOPPED = range(4)


def needs_proxy(url: str) -> bool:
    """Whether the environment routes this edge URL through a proxy (which
    this module does not speak; the caller then uses websockets' client)."""
    return get_proxy(parse_uri(url)) is not None


class WSConnection(asyncio.Protocol):
    """One client WebSocket connection. Make it with `connect()`, then
    `start(on_data)`; `done` ends when reading does."""

    def __init__(self, protocol: ClientProtocol, headers: dict[str, str], user_agent: str | None,
                 close_timeout: float) -> None:
        self.protocol = protocol
        self.max_size = protocol.max_message_size
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._early: list[bytes | memoryview] = []
        self.on_data: Callable[[bytes | memoryview], None] = self._early.append  # until the owner calls start()
        self._headers = headers
        self._user_agent = user_agent
        self._close_timeout = close_timeout
        loop = asyncio.get_running_loop()
        self._opened: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()  # reading ended: None, or why (exception)
        self._lost: asyncio.Future[None] = loop.create_future()
        self._error: BaseException | None = None
        self._mode = _HANDSHAKE
        self._head = bytearray()  # the handshake answer until its end
        self._rest = b""  # the start of a frame header cut by a read
        self._need = 0  # payload bytes of the current fast-path frame still to come
        self._skip = 0  # bytes of the current frame still to hand to websockets
        self._fragments: list[bytes] = []  # a fragmented message (websockets' path)
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's SSL transport is not an asyncio.Transport
        request = self.protocol.connect()
        for name, value in self._headers.items():
            request.headers[name] = value
        if self._user_agent is not None:
            request.headers.setdefault("User-Agent", self._user_agent)
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except Exception as exc:  # from on_data (or a bug): reading ends with it; the owner closes
            self._stop(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self._opened.done():
            self._opened.set_exception(ConnectionError("connection closed during the WebSocket handshake"))
            self._opened.exception()  # retrieved by connect(), or nobody when it timed out
        self._stop(None)
        if not self._lost.done():
            self._lost.set_result(None)
        self._paused = False  # nothing is paused any more: a later drain() must not wait for a resume
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionError("connection lost"))
            self._drain.exception()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ------------------------------------------------------------ receive
    def _receive(self, data: bytes) -> None:
        mode = self._mode
        if mode is _FRAMES and not (self._rest or self._need or self._skip):
            self._frames(data)  # the common case: a read that starts at a frame boundary
            return
        if mode is _HANDSHAKE:
            data = self._handshake(data)
            if not data or self._mode is not _FRAMES:
                return
        elif mode is _WEBSOCKETS:
            self._to_websockets(data)
            return
        elif mode is _STOPPED:
            return
        n = len(data)
        pos = 0
        if self._need:  # a fast-path payload continues
            take = min(self._need, n)
            self._need -= take
            pos = take
            self.on_data(data if take == n else memoryview(data)[:take])
        elif self._skip:  # a frame of websockets' continues
            take = min(self._skip, n)
            self._skip -= take
            pos = take
            self._to_websockets(data if take == n else data[:take])
        if self._rest:
            data = self._rest + data[pos:]
            self._rest = b""
        elif pos:
            data = data[pos:]
        if data and self._mode is _FRAMES:
            self._frames(data)

    def _frames(self, data: bytes) -> None:
        """Parse frames from the start of `data`, a frame boundary."""
        n = len(data)
        pos = 0
        protocol = self.protocol
        while pos < n:
            if self._mode is not _FRAMES:
                if self._mode is _WEBSOCKETS:
                    self._to_websockets(data[pos:])
                return
            avail = n - pos
            if avail < 2:
                self._rest = data[pos:]
                return
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if avail < 4:
                    self._rest = data[pos:]
                    return
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if avail < 10:
                    self._rest = data[pos:]
                    return
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            start = pos + head
            if b0 == FIN_BINARY and b1 < 0x80 and protocol.current_size is None and (
                    self.max_size is None or length <= self.max_size):
                end = start + length
                if end <= n:
                    pos = end
                    if length:
                        self.on_data(memoryview(data)[start:end])
                else:
                    self._need = end - n
                    self.on_data(memoryview(data)[start:])
                    return
            else:
                # Everything else is websockets' to judge, a whole frame at a time.
                end = start + length + (4 if b1 & 0x80 else 0)
                if end > n and length > (self.max_size or length):
                    end = start  # the header alone: websockets refuses the size (1009)
                stop = min(end, n)
                self._skip = end - stop
                self._to_websockets(data[pos:stop])
                pos = stop

    def _handshake(self, data: bytes) -> bytes:
        """Buffer the answer head, give it to websockets; return the bytes after it."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HANDSHAKE:
                self._mode = _WEBSOCKETS
                head, self._head = bytes(self._head), bytearray()
                self._to_websockets(head)
            return b""
        head, rest = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        self._mode = _WEBSOCKETS  # until websockets says the connection is open
        self._to_websockets(head)
        if self._mode is _FRAMES:
            return rest
        if rest and self._mode is _WEBSOCKETS:
            self._to_websockets(rest)
        return b""

    def _to_websockets(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for ev in protocol.events_received():
            if isinstance(ev, Response):
                self._handshake_done(ev)
            elif isinstance(ev, Frame):
                self._frame(ev)
        self._flush()
        if protocol.state is not State.OPEN:  # closing or failed: websockets reads the rest
            if self._mode is _FRAMES:
                self._mode = _WEBSOCKETS
            if protocol.close_expected() and self._close_timer is None:
                self._close_timer = asyncio.get_running_loop().call_later(self._close_timeout,
                                                                          self.transport.abort)

    def _handshake_done(self, response: Response) -> None:
        exc = self.protocol.handshake_exc
        if exc is None and self.protocol.state is State.OPEN:
            self._mode = _FRAMES
            if not self._opened.done():
                self._opened.set_result(None)
            return
        if not self._opened.done():
            self._opened.set_exception(exc or ConnectionError("WebSocket handshake failed"))
        self.transport.abort()

    def _frame(self, frame: Frame) -> None:
        """A frame websockets parsed: data frames of the slow path (control
        frames are answered by websockets itself)."""
        op = frame.opcode
        if op is Opcode.BINARY or op is Opcode.CONT:
            if op is Opcode.CONT and not self._fragments:
                return  # the continuation of a text message: refused below already
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self.on_data(message)
        elif op is Opcode.TEXT:
            raise ConnectionError("edge sent a text message")

    # --------------------------------------------------------------- send
    def _flush(self) -> None:
        out = self.protocol.data_to_send()
        if not out:
            return
        if out[-1] == b"":  # websockets asks for a half close: TLS cannot, the edge closes
            out.pop()
            if self.transport.can_write_eof():
                self.transport.writelines(out)
                self.transport.write_eof()
                return
        if out:
            self.transport.writelines(out)

    async def send(self, data: bytes) -> None:
        """Send one binary message; waits while the transport's buffer is full."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            raise ConnectionError("the WebSocket connection is closing")
        protocol.send_binary(data)
        self.transport.writelines(protocol.data_to_send())
        if self._paused:
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def write_frames(self, frames: list[bytes | memoryview]) -> bool:
        """Send the frames as one binary message now; False when the transport
        is above its high-water mark (then `drain()` before writing more)."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            raise ConnectionError("the WebSocket connection is closing")
        protocol.send_binary(frames[0] if len(frames) == 1 else b"".join(frames))
        self.transport.writelines(protocol.data_to_send())
        return not self._paused

    async def drain(self) -> None:
        """Wait until the transport takes more (ConnectionError if it is lost)."""
        if self._lost.done():
            raise ConnectionError("connection lost")
        if self._paused:
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def send_now(self, data: bytes) -> None:
        """Send one binary message without waiting (a last word before a close)."""
        if data and self.protocol.state is State.OPEN:
            self.protocol.send_binary(data)
            self._flush()

    # ------------------------------------------------------------ closing
    def start(self, on_data: Callable[[bytes | memoryview], None]) -> None:
        """Deliver the binary messages' bytes to `on_data` from now on (and
        those that came before this call)."""
        self.on_data = on_data
        early, self._early = self._early, []
        try:
            for piece in early:
                on_data(bytes(piece))
        except Exception as exc:
            self._stop(exc)

    def _stop(self, exc: BaseException | None) -> None:
        self._mode = _STOPPED
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    def stop_reading(self) -> None:
        """The owner is done with this connection: end `done` cleanly and
        ignore whatever arrives until `close()`."""
        self._stop(None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake, then the TCP close; abort after `close_timeout`."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), self._close_timeout)
        except TimeoutError:
            self.transport.abort()
            await self._lost

    @property
    def closed_exc(self) -> ConnectionClosed | None:  # how it closed, once it has
        return self.protocol.close_exc if self.protocol.state is State.CLOSED else None


async def connect(url: str, *, ssl_context: ssl.SSLContext | None, headers: dict[str, str], user_agent: str | None,
                  max_size: int | None, open_timeout: float, close_timeout: float) -> WSConnection:
    """Open the connection: TCP, TLS for wss:, the WebSocket handshake, all
    within `open_timeout` (TimeoutError). A refusal raises websockets'
    `InvalidStatus` (its `.response.status_code`); any other bad handshake
    a ConnectionError."""
    uri: WebSocketURI = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_size)  # no extensions: no compression
    loop = asyncio.get_running_loop()
    conn: WSConnection | None = None
    try:
        async with asyncio.timeout(open_timeout):
            _, conn = await loop.create_connection(
                lambda: WSConnection(protocol, headers, user_agent, close_timeout), uri.host, uri.port,
                ssl=ssl_context if uri.secure else None)
            await conn._opened
    except InvalidStatus:
        raise
    except InvalidHandshake as exc:
        if conn is not None:
            conn.transport.abort()
        raise ConnectionError(f"bad WebSocket handshake: {exc}") from exc
    except BaseException:
        if conn is not None:
            conn.transport.abort()
        raise
    return conn
