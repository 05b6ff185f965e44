"""The asyncio shell around the sans-I/O `tunnel.Connection`, shared by the
edge and the agent: frames written once per loop iteration as one transport
message, one `StreamChannel` (channel.py) per stream, send-side flow control waits,
reading a stream with acknowledgement, heartbeats. The protocol core in
`tunnel/` stays sans-I/O; this is where it meets asyncio and the clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from tunnel.connection import Connection, State
from tunnel.errors import ErrorCode, StreamClosedError, StreamError
from tunnel.events import (
    DataReceived,
    Event,
    PongReceived,
    ResponseReceived,
    StreamReset,
    WindowUpdated,
)
from tunnel.heartbeat import Heartbeat

from .channel import StreamChannel

__all__ = ["StreamChannel", "TunnelIO"]

log = logging.getLogger(__name__)


def _ignore_event(ev: Event) -> None:
    pass


def _ignore_dead(reason: str) -> None:
    pass


class TunnelIO:
    """Runs one `Connection` over a message transport.

    The owner feeds every received message to `feed()` and calls `close()`
    when the transport ends. `send` must send one binary message.
    Events that concern only the owner (requests, hello, status, goaway)
    go to `on_event`, and so do resets after their channel has failed;
    the other stream-level ones are handled here.
    """

    def __init__(
        self,
        conn: Connection,
        send: Callable[[bytes], Awaitable[None]],
        on_event: Callable[[Event], None],
        heartbeat: Heartbeat,
        on_dead: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[list[bytes | memoryview]], bool] | None = None,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.conn = conn
        self._send = send
        # The synchronous path (both or neither): `write` puts frames on the
        # transport at once as one message and says whether it may take more
        # now; `drain` waits until it may. Then frames leave once per loop
        # iteration from a callback, with no writer task step and no join.
        self._write = write
        self._drain = drain
        self._soon: asyncio.Handle | None = None
        self._blocked = False
        self._on_event = on_event
        self._on_dead = on_dead
        self.heartbeat = heartbeat
        self.clock = clock
        self.channels: dict[int, StreamChannel] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.bytes_in = 0
        self.bytes_out = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.heartbeat.start(self.clock())
        self._tasks = [
            asyncio.create_task(self._writer(), name="tunnel-writer"),
            asyncio.create_task(self._heartbeats(), name="tunnel-heartbeat"),
        ]

    async def close(self, reason: str, retryable: bool = False) -> None:
        """Fail every open stream and stop the tasks. Idempotent."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self.conn.close()
        err = StreamError(f"tunnel closed: {reason}", ErrorCode.CANCEL, retryable)
        for ch in self.channels.values():
            ch.fail(err)
        self.channels.clear()
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        for t in self._tasks:
            if t is not current:
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass

    def forget_owner(self) -> None:
        """After `close()`: drop the owner's callbacks (writers included) and the finished tasks.
        Both hold the owner or this object (a bound method; a cancelled task's
        traceback), so without this a closed tunnel's objects form reference
        cycles and wait for a full garbage collection; with it, reference
        counting frees them when the owner lets go."""
        self._on_event = _ignore_event
        self._on_dead = _ignore_dead
        self._write = self._drain = None
        self._tasks = []

    async def drain_output(self) -> None:
        """Send whatever is queued (used before closing, e.g. a GOAWAY)."""
        if self._write is not None:
            frames = self.conn.frames_to_send()
            if frames:
                try:
                    self._write(frames)
                except Exception:  # the transport is going away anyway
                    pass
            return
        data = self.conn.data_to_send()
        if data:
            try:
                await self._send(data)
            except Exception:  # the transport is going away anyway
                pass

    # --------------------------------------------------------------- input
    def feed(self, data: bytes | memoryview) -> None:
        """Process received bytes (a message, or any piece of the byte stream
        the messages make). ProtocolError propagates: the owner
        must then `drain_output()` (the GOAWAY) and close the transport."""
        self.bytes_in += len(data)
        self.heartbeat.on_receive(self.clock())
        try:
            for ev in self.conn.receive_data(data):
                self._dispatch(ev)
        finally:
            self.flush()

    def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, DataReceived):
            ch = self.channels.get(ev.stream_id)
            if ch is None:
                # Nobody will read it: give the credit back at once.
                self.conn.acknowledge_received(ev.stream_id, len(ev.data))
                return
            if ev.data:
                ch.body.put_nowait(ev.data)
            if ev.end_stream:
                ch.body.put_nowait(None)
        elif isinstance(ev, ResponseReceived):
            ch = self.channels.get(ev.stream_id)
            if ch is not None and not (head := ch.head).done():
                head.set_result(ev.head)
                if ev.end_stream:
                    ch.body.put_nowait(None)
        elif isinstance(ev, WindowUpdated):
            if ev.stream_id == 0:
                for c in self.channels.values():
                    c.window_opened()
            elif (ch := self.channels.get(ev.stream_id)) is not None:
                ch.window_opened()
        elif isinstance(ev, StreamReset):
            ch = self.channels.pop(ev.stream_id, None)
            if ch is not None:
                retryable = ev.code is ErrorCode.REFUSED_STREAM
                ch.fail(StreamError(f"stream reset by peer: {ev.code.name} {ev.reason}".strip(), ev.code, retryable))
            self._on_event(ev)  # the owner may have work to cancel
        elif isinstance(ev, PongReceived):
            self.heartbeat.on_pong(self.clock(), ev.timestamp / 1e9)
        else:
            self._on_event(ev)

    # -------------------------------------------------------------- output
    def flush(self) -> None:
        """Send what the connection has queued: at the end of this loop
        iteration, so that everything queued in it leaves as one message."""
        if self._write is None:
            self._wake.set()
        elif self._soon is None and not self._blocked:
            self._soon = asyncio.get_running_loop().call_soon(self._write_soon)

    def _write_soon(self) -> None:
        self._soon = None
        if self.closed.is_set():
            return
        frames = self.conn.frames_to_send()
        if not frames:
            return
        assert self._write is not None
        try:
            more = self._write(frames)
        except Exception as exc:
            log.debug("tunnel write failed: %s", exc)
            self._on_dead(f"send failed: {exc}")
            return
        if not more:
            # Over the transport's high-water mark: the writer task waits for
            # it to drain; frames queue in the connection meanwhile (bounded
            # by the peer's flow-control windows).
            self._blocked = True
            self._wake.set()

    def register(self, stream_id: int) -> StreamChannel:
        ch = StreamChannel(stream_id)
        self.channels[stream_id] = ch
        return ch

    async def send_body(self, ch: StreamChannel, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Send body bytes, waiting for credit as needed. The bytes are not
        copied here: the frames hold views of `data` until they are sent."""
        pos, n = 0, len(data)
        conn = self.conn
        while True:
            if ch.error is not None:
                raise ch.error
            if not conn.can_send_body(ch.stream_id):
                raise StreamError("stream closed", ErrorCode.CANCEL)
            room = conn.send_window(ch.stream_id)
            take = min(room, n - pos)
            if take > 0 or (pos == n and end_stream):
                last = pos + take == n
                piece = data if take == n else memoryview(data)[pos : pos + take]
                try:
                    conn.send_data(ch.stream_id, piece, end_stream and last)
                except StreamClosedError as exc:
                    raise StreamError(str(exc)) from None
                pos += take
                ch.outbound += take
                self.bytes_out += take
                self.flush()
                if last:
                    return
            elif pos == n:
                return
            if conn.send_window(ch.stream_id) == 0:
                await ch.wait_window()

    def acknowledge(self, ch: StreamChannel, n: int) -> None:
        if n and not self.closed.is_set():
            self.conn.acknowledge_received(ch.stream_id, n)
            self.flush()

    async def _next(self, ch: StreamChannel, idle: float | None) -> bytes | None:
        """The stream's next chunk (None at its end): one already there is
        taken without a timer (the common case under load), else a wait
        bounded by `idle` (TimeoutError)."""
        item = ch.read_nowait()
        if item is not False:
            return item  # type: ignore[return-value]
        async with asyncio.timeout(idle):
            return await ch.read()

    async def chunks(self, ch: StreamChannel, idle: float | None = None) -> AsyncIterator[bytes]:
        """A stream's body as it arrives. Each chunk's credit goes back to the
        peer only after the consumer has taken it (when the loop asks for the
        next): backpressure from whoever reads."""
        while (chunk := await self._next(ch, idle)) is not None:
            yield chunk
            self.acknowledge(ch, len(chunk))

    async def read_all(self, ch: StreamChannel, limit: int | None = None, idle: float | None = None) -> bytes:
        """A stream's whole body; StreamError if it exceeds `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self._next(ch, idle)) is not None:
            size += len(chunk)
            if limit is not None and size > limit:
                raise StreamError(f"body longer than its limit of {limit} bytes")
            parts.append(chunk)
            self.acknowledge(ch, len(chunk))
        # One chunk that is already bytes needs no copy.
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def reset(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        ch = self.channels.pop(stream_id, None)
        if not self.closed.is_set():
            self.conn.reset_stream(stream_id, code, reason)
            self.flush()
        if ch is not None:
            ch.fail(StreamError(f"stream reset locally: {reason or code.name}", code))

    def release(self, stream_id: int) -> None:
        """Forget a finished stream's channel."""
        self.channels.pop(stream_id, None)

    @property
    def accepting(self) -> bool:
        return self.conn.state is State.OPEN and not self.closed.is_set()

    # --------------------------------------------------------------- tasks
    async def _writer(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._drain is not None:
                    await self._drain()
                    self._blocked = False
                    self._write_soon()
                    continue
                data = self.conn.data_to_send()
                if data:
                    await self._send(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("tunnel writer stopped: %s", exc)
            self._on_dead(f"send failed: {exc}")

    async def _heartbeats(self) -> None:
        hb = self.heartbeat
        while True:
            now = self.clock()
            if hb.is_dead(now):
                self._on_dead(f"no frame received for {hb.timeout:g} s")
                return
            if hb.ping_due(now):
                hb.on_ping_sent(now)
                self.conn.ping(int(now * 1e9))
                self.flush()
            await asyncio.sleep(max(0.01, hb.next_wakeup(self.clock())))
