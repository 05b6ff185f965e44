"""Relaying one WebSocket over one tunnel stream: the asyncio shell around
`wsmessages`, used by both ends (the edge with the client's socket, the agent
with the upstream's).

Two pumps run per WebSocket. Socket -> tunnel sends each message as it is
received, waiting for stream credit, so a slow tunnel-side reader holds back
this socket only. Tunnel -> socket writes each decoded message and only then
acknowledges its bytes, so a slow socket reader holds back this stream only:
the tunnel and its other streams keep their credit.

Closing is passed through: a CLOSE from either side is relayed with its code
and reason (then END_STREAM), and the other side's close answer is relayed
back, so both ends see a complete close handshake with the real codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import ClientWebSocketResponse, WebSocketError, WSMsgType, web

from tunnel import StreamError
from tunnel.errors import ErrorCode, ProtocolError
from tunnel.wsmessages import (
    Kind,
    Message,
    MessageDecoder,
    MessageTooBig,
    decode_close,
    encode_close,
    encode_message,
    sendable,
)

from .io import StreamChannel, TunnelIO

log = logging.getLogger(__name__)

Socket = web.WebSocketResponse | ClientWebSocketResponse
UP = "up"  # socket -> tunnel
DOWN = "down"  # tunnel -> socket


def _ignore(direction: str, kind: Kind, size: int) -> None:
    pass


class WsRelay:
    """One WebSocket <-> one tunnel stream whose heads are already exchanged.

    `lost_code`/`lost_reason` are relayed into the tunnel when the socket
    breaks without a close; `tunnel_lost_reason` is the reason the socket
    gets (with 1011) when the tunnel side breaks.
    """

    def __init__(
        self,
        ws: Socket,
        io: TunnelIO,
        ch: StreamChannel,
        *,
        max_message: int,
        lost_code: int,
        lost_reason: str,
        tunnel_lost_reason: str,
        idle_timeout: float = 0.0,
        close_timeout: float = 5.0,
        on_message: Callable[[str, Kind, int], None] = _ignore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ws = ws
        self.io = io
        self.ch = ch
        self.decoder = MessageDecoder(max_message)
        self.lost_code = lost_code
        self.lost_reason = lost_reason
        self.tunnel_lost_reason = tunnel_lost_reason
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.on_message = on_message
        self.clock = clock
        self.last_activity = clock()
        self.close_code: int | None = None  # the first close code seen, from either side
        self.close_reason = ""
        self._sent_close = False
        # One message at a time into the stream: a close sent from another
        # task must never land inside a message waiting for credit.
        self._send_lock = asyncio.Lock()
        self.abort_socket: Callable[[], None] | None = None  # drops a socket that will not take its close

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Relay until both sides are closed; returns the close code."""
        up = asyncio.create_task(self._from_socket(), name="ws-up")
        down = asyncio.create_task(self._from_tunnel(), name="ws-down")
        tasks = [up, down]
        if self.idle_timeout > 0:
            tasks.append(asyncio.create_task(self._idle(), name="ws-idle"))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            rest = [t for t in (up, down) if not t.done()]
            if rest:
                # One side closed: the other has a bounded time to answer.
                await asyncio.wait(rest, timeout=self.close_timeout)
        finally:
            for t in tasks:
                t.cancel()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, Exception):
                    log.warning("websocket relay of stream %d failed: %r", self.ch.stream_id, r)
            if not self.ws.closed:
                self._note_close(1011, "relay ended")
                await self._close_socket(self.close_code or 1011, self.close_reason)
            self._finish_stream()
        return self.close_code or 1006

    async def shutdown(self, code: int, reason: str) -> None:
        """Close both sides with `code` (edge drain, idle timeout)."""
        self._note_close(code, reason)
        await self._close_tunnel(code, reason)
        await self._close_socket(code, reason)

    def _finish_stream(self) -> None:
        io, ch = self.io, self.ch
        # Bytes nobody will read still hold credit: give it back first.
        while not ch.body.empty():
            item = ch.body.get_nowait()
            if isinstance(item, bytes):
                io.acknowledge(ch, len(item))
        if io.conn.is_open(ch.stream_id) and not io.closed.is_set():
            io.reset(ch.stream_id, ErrorCode.CANCEL, "websocket closed")
        else:
            io.release(ch.stream_id)

    def _note_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    # ------------------------------------------------------- socket -> tunnel
    async def _from_socket(self) -> None:
        try:
            await self._pump_socket()
        except StreamError:
            pass  # the stream is gone: the other pump closes the socket

    async def _pump_socket(self) -> None:
        ws = self.ws
        while True:
            msg = await ws.receive()
            t = msg.type
            if t is WSMsgType.TEXT:
                await self._to_tunnel(Kind.TEXT, msg.data.encode("utf-8"))
            elif t is WSMsgType.BINARY:
                await self._to_tunnel(Kind.BINARY, msg.data)
            elif t is WSMsgType.PING:
                await self._to_tunnel(Kind.PING, msg.data)
            elif t is WSMsgType.PONG:
                await self._to_tunnel(Kind.PONG, msg.data)
            elif t is WSMsgType.CLOSE:
                code = int(msg.data) if msg.data else 1005
                reason = msg.extra or ""
                self._note_close(code, reason)
                await self._close_tunnel(code, reason)
                return
            elif t is WSMsgType.CLOSING:
                return  # our own close() is under way (from the other pump)
            else:  # CLOSED or ERROR: the socket broke
                if t is WSMsgType.ERROR and isinstance(msg.data, WebSocketError) and msg.data.code == 1009:
                    code, reason = 1009, "message too big"
                else:
                    code, reason = self.lost_code, self.lost_reason
                self._note_close(code, reason)
                await self._close_tunnel(code, reason)
                return

    async def _to_tunnel(self, kind: Kind, payload: bytes) -> None:
        self.last_activity = self.clock()
        self.on_message(UP, kind, len(payload))
        data = encode_message(kind, payload)
        async with self._send_lock:
            if self._sent_close:
                return  # the stream's direction is closed: nothing may follow the close
            await self.io.send_body(self.ch, data)

    async def _close_tunnel(self, code: int, reason: str) -> None:
        if self._sent_close:
            return
        self._sent_close = True
        if code == 1005:
            data = encode_message(Kind.CLOSE, b"")
        else:
            data = encode_close(code if sendable(code) else self.lost_code, reason)
        try:
            # Bounded: a peer that gives no credit (an upstream that stopped
            # reading) cannot hold the close; the stream is reset instead.
            async with asyncio.timeout(self.close_timeout):
                async with self._send_lock:
                    await self.io.send_body(self.ch, data, end_stream=True)
        except StreamError:
            pass
        except TimeoutError:
            log.info("websocket stream %d: close not deliverable in %.0f s; resetting", self.ch.stream_id,
                     self.close_timeout)
            self.io.reset(self.ch.stream_id, ErrorCode.CANCEL, "close not deliverable")

    # ------------------------------------------------------- tunnel -> socket
    async def _from_tunnel(self) -> None:
        io, ch = self.io, self.ch
        while True:
            try:
                chunk = await ch.read()
            except StreamError:
                self._note_close(1011, self.tunnel_lost_reason)
                await self._close_socket(1011, self.tunnel_lost_reason)
                return
            if chunk is None:
                self._note_close(1011, "stream ended without a close")
                await self._close_socket(1011, "stream ended without a close")
                return
            try:
                messages = self.decoder.feed(chunk)
            except ProtocolError as exc:
                code = 1009 if isinstance(exc, MessageTooBig) else 1011
                reason = "message too big" if code == 1009 else "bad message on the tunnel"
                log.warning("websocket stream %d: %s", ch.stream_id, exc)
                io.acknowledge(ch, len(chunk))
                await self.shutdown(code, reason)
                return
            for m in messages:
                if m.kind is Kind.CLOSE:
                    io.acknowledge(ch, len(chunk))
                    await self._closed_by_tunnel(m)
                    return
                await self._to_socket(m)
            io.acknowledge(ch, len(chunk))

    async def _closed_by_tunnel(self, m: Message) -> None:
        try:
            code, reason = decode_close(m.payload)
        except ProtocolError:
            code, reason = 1011, "bad close message"
        self._note_close(code, reason)
        await self._close_socket(code, reason)
        answer = self.ws.close_code
        await self._close_tunnel(answer if answer is not None else code, "")

    async def _to_socket(self, m: Message) -> None:
        self.last_activity = self.clock()
        self.on_message(DOWN, m.kind, len(m.payload))
        ws = self.ws
        try:
            if m.kind is Kind.TEXT:
                await ws.send_str(m.payload.decode("utf-8", "replace"))
            elif m.kind is Kind.BINARY:
                await ws.send_bytes(m.payload)
            elif m.kind is Kind.PING:
                await ws.ping(m.payload)
            elif m.kind is Kind.PONG:
                await ws.pong(m.payload)
        except (ConnectionError, RuntimeError):
            # The socket is gone; its pump relays the loss. Keep draining the
            # stream so its credit comes back.
            pass

    async def _close_socket(self, code: int, reason: str) -> None:
        if not sendable(code):
            code = 1000 if code == 1005 else 1011
        try:
            # Bounded: a socket that stopped reading cannot take even a close.
            async with asyncio.timeout(self.close_timeout + 1):
                await self.ws.close(code=code, message=reason.encode("utf-8")[:123])
        except (ConnectionError, RuntimeError):
            pass
        except TimeoutError:
            if self.abort_socket is not None:
                self.abort_socket()

    # ------------------------------------------------------------------ idle
    async def _idle(self) -> None:
        while True:
            remaining = self.last_activity + self.idle_timeout - self.clock()
            if remaining <= 0:
                await self.shutdown(1001, "idle timeout")
                return
            await asyncio.sleep(remaining)
