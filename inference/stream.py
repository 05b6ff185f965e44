"""`GET /stream`: frame-by-frame inference over a WebSocket. Binary
messages in (one encoded image each), one JSON text answer per message out, in
order (a transformation's answer is followed by its image as one binary
message; what each model kind does with a frame is `stream_kinds.py`). The decisions (seq, drop policy, order, bounds) are `frames.FrameScheduler`;
this is its asyncio shell: a reader, one worker (decode on the decode pool,
forward pass through the shared batcher, as POST /photo), and a writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time

from aiohttp import WSCloseCode, WSMsgType, web

from .answers import error
from .batcher import QueueFull
from .frames import DropPolicy, FrameScheduler, Outcome
from .imaging import BadImage
from .state import STATE, State
from .stream_kinds import IMAGE_KEY, FrameRun, choose

log = logging.getLogger("inference")

SUBPROTOCOL = "inference.v1"
# Real-time answers should not queue in a socket: keep at most this many
# unsent bytes in the kernel (TCP_NOTSENT_LOWAT) and in the transport.
SEND_BUFFER_BYTES = 16 * 1024
CLOSE_GRACE_S = 2.0  # a close handshake that takes longer is cut short


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class StreamSession:
    """One open WebSocket: three tasks around a FrameScheduler. `run()`
    returns why the stream ended: `client` (closed or went away),
    `slow_reader` (answers backed up), `too_big`, `shutdown`, `error`."""

    def __init__(self, st: State, ws: web.WebSocketResponse, drop: DropPolicy,
                 transport: asyncio.Transport | None, run_frame: FrameRun) -> None:
        self.st = st
        self.run_frame = run_frame
        self.ws = ws
        self.transport = transport
        cfg = st.config
        self.sched: FrameScheduler[tuple[bytes, float]] = FrameScheduler(
            drop, max_waiting=cfg.stream_max_backlog, max_unsent=cfg.stream_max_backlog)
        self._work = asyncio.Event()  # a frame waits, or the model is free
        self._out = asyncio.Event()  # an answer is ready
        self._room = asyncio.Event()  # reading may resume (a frame started or finished)
        self._counted = Outcome()
        self.detail = ""

    async def run(self) -> str:
        tasks = [asyncio.create_task(self._read(), name="stream-read"),
                 asyncio.create_task(self._classify(), name="stream-classify"),
                 asyncio.create_task(self._write(), name="stream-write")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            if first.cancelled():
                return "shutdown"
            if (exc := first.exception()) is not None:
                log.error("stream task failed", exc_info=exc)
                self.detail = "internal error"
                return "error"
            return first.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._count()

    def _count(self) -> None:
        """Move the scheduler's counts to the Prometheus counters."""
        now, m = self.sched.outcome(), self.st.metrics.stream_frames
        for outcome, new, old in (("answered", now.answered, self._counted.answered),
                                  ("dropped", now.dropped, self._counted.dropped),
                                  ("error", now.errors, self._counted.errors)):
            if new > old:
                m.labels(outcome).inc(new - old)
        self._counted = now

    def _backed_up(self) -> bool:
        """The socket holds answers it could not send: the client is behind."""
        return self.transport is None or self.transport.get_write_buffer_size() > 0

    async def _read(self) -> str:
        cfg = self.st.config
        while True:
            await asyncio.sleep(0)  # the writer takes what is ready before we judge the client
            if self.sched.overloaded() and self._backed_up():
                self.detail = f"client not reading: {self.sched.releasable} answers unsent"
                return "slow_reader"
            if not self.sched.can_accept():
                self._room.clear()
                await self._room.wait()
                continue
            msg = await self.ws.receive()
            now = time.perf_counter()
            if msg.type == WSMsgType.BINARY:
                data: bytes = msg.data
                if len(data) > cfg.max_frame_bytes:
                    self.sched.reject(f"frame of {len(data)} bytes exceeds the limit of {cfg.max_frame_bytes} "
                                      "bytes; send smaller frames (server option --max-frame-mb)")
                else:
                    self.sched.frame((data, now))
                    self._work.set()
            elif msg.type == WSMsgType.TEXT:
                self.sched.reject("text message: send each frame as a binary message holding one encoded "
                                  "image (JPEG, PNG or WebP)")
            elif msg.type == WSMsgType.ERROR:
                self.detail = str(msg.data)
                too_big = getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                return "too_big" if too_big else "client"
            else:  # CLOSE, CLOSING, CLOSED
                return "client"
            self._count()
            self._out.set()

    async def _classify(self) -> str:
        while True:
            nxt = self.sched.next_frame()
            if nxt is None:
                self._work.clear()
                await self._work.wait()
                continue
            self._room.set()  # drop=none: room for one more waiting frame
            seq, (data, received) = nxt
            try:
                self.sched.finished(seq, await self.run_frame(data, received))
            except BadImage as exc:
                self.sched.failed(seq, exc.reason)
            except QueueFull as exc:
                self.sched.failed(seq, f"server busy: {exc}; frame skipped")
            except Exception:
                log.exception("stream frame %d failed", seq)
                self.sched.failed(seq, "internal error; the server logged the details")
            self._count()
            self._out.set()
            self._room.set()

    async def _write(self) -> str:
        timeout = self.st.config.stream_send_timeout
        while True:
            answer = self.sched.pop_answer()
            if answer is None:
                self._out.clear()
                await self._out.wait()
                continue
            try:
                # A context timeout, not wait_for: no task per send, so a send the
                # socket takes at once completes in this step and the writer keeps up.
                image = answer.pop(IMAGE_KEY, None)
                async with asyncio.timeout(timeout):
                    await self.ws.send_str(json.dumps(answer, separators=(",", ":")))
                    if image is not None:
                        await self.ws.send_bytes(image)
            except TimeoutError:
                self.detail = f"client took no answer for {timeout:g} s"
                return "slow_reader"
            except (ConnectionError, RuntimeError) as exc:  # the transport went away under us
                self.detail = str(exc)
                return "client"


def _tune_socket(transport: asyncio.Transport | None) -> None:
    if transport is None:
        return
    transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, SEND_BUFFER_BYTES)


async def _close(ws: web.WebSocketResponse, transport: asyncio.Transport | None, code: int, reason: str) -> None:
    """Close with `code`; but when answers are still stuck in the transport
    (a client not reading), cut the connection: the close frame would queue
    behind them and a graceful close would wait for them forever."""
    if transport is not None and (transport.get_write_buffer_size() > 0 or code == 1008):
        transport.abort()
        return
    try:
        async with asyncio.timeout(CLOSE_GRACE_S):
            await ws.close(code=code, message=reason[:120].encode())
    except (TimeoutError, ConnectionError, RuntimeError):
        if transport is not None:
            transport.abort()


async def stream(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    cfg = st.config
    m = st.metrics
    run_frame = choose(st, request)
    if isinstance(run_frame, web.Response):
        return run_frame
    try:
        drop = DropPolicy(request.query.get("drop", "latest"))
    except ValueError:
        return error(400, f"drop must be latest or none, not {request.query['drop']!r}")
    ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False, autoping=True,
                               max_msg_size=max(cfg.max_frame_bytes, cfg.max_body_bytes),
                               writer_limit=SEND_BUFFER_BYTES // 4)
    if not ws.can_prepare(request).ok:
        return error(426, "GET /stream is a WebSocket: open it with a WebSocket client and send each frame as a "
                          "binary message", {"Upgrade": "websocket", "Connection": "Upgrade"})
    rid = request.headers.get("X-Request-ID")
    if rid:
        ws.headers["X-Request-ID"] = rid[:128]
    transport = request.transport  # kept: aiohttp lets go of it once the WebSocket is closed
    await ws.prepare(request)
    _tune_socket(transport)
    peer = request.remote or "unknown"
    session = StreamSession(st, ws, drop, transport, run_frame)
    st.streams.add(ws)
    m.streams_open.inc()
    t0 = time.monotonic()
    reason = "error"
    try:
        reason = await session.run()
        if reason == "client" and st.shutting_down:
            reason = "shutdown"
    finally:
        st.streams.discard(ws)
        m.streams_open.dec()
        m.streams_closed.labels(reason).inc()
        if reason == "slow_reader":
            log.warning("stream from %s disconnected: %s", peer, session.detail)
            await _close(ws, transport, 1008, session.detail)
        elif reason == "error":
            await _close(ws, transport, 1011, "internal error")
        elif not ws.closed:
            await _close(ws, transport, 1000, "")
        o = session.sched.outcome()
        log.info("stream from %s (drop=%s) ended after %.1f s (%s): %d messages, %d answered, %d dropped, "
                 "%d errors", peer, drop.value, time.monotonic() - t0, reason, session.sched.received,
                 o.answered, o.dropped, o.errors)
    return ws


async def close_streams(app: web.Application) -> None:
    """Server shutdown: close every open stream with 1001 (going away)."""
    st = app[STATE]
    st.shutting_down = True
    await asyncio.gather(*(ws.close(code=1001, message=b"server shutting down") for ws in list(st.streams)),
                         return_exceptions=True)
