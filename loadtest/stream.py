"""`loadtest stream`: live streams of frames over WebSockets, like cameras.

Each stream sends binary frames on a fixed schedule (open loop) and matches
the answers to their frames (by `seq`, else by order). The frame ledger
(`ledger`) and the capacity search (`capacity`) are pure; `StreamRun` is the
asyncio shell around them; `frames` makes what is sent.
`streamreport` turns the records into figures.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from yarl import URL

from . import __version__
from .capacity import CapacitySearch
from .client import (
    UsageError,
    _detail,
    _error_kind,
    edge_tunnel_rtt,
    frozen_heap,
    tls_context,
)
from .frames import jpeg_of_size, load_frames
from .ledger import (
    ANSWERED,
    DROPPED,
    ERROR,
    PENDING,
    UNANSWERED,
    Frame,
    FrameLedger,
)
from .schedule import Pacer, arrival_offsets, wait_plan

# What other modules import from here, some of it living in `frames`, `ledger`
# and `capacity` since the split (kept importable from here).
__all__ = ["ANSWERED", "DROPPED", "ERROR", "PENDING", "UNANSWERED", "CapacitySearch", "Frame", "FrameLedger",
           "StreamConfig", "StreamProgress", "StreamRun", "StreamState", "jpeg_of_size", "load_frames"]

perf = time.perf_counter

# Offered to the server; one that ignores subprotocols is not bothered by it.
SUBPROTOCOL = "inference.v1"
MAX_MSG_BYTES = 64 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
# After its last scheduled frame a stream waits this many deadlines for the
# answers still missing; a frame unanswered then is dropped.
DRAIN_DEADLINES = 2.0


@dataclass
class StreamConfig:
    """Everything that defines a stream run; stored in the JSON as `config`."""

    url: str = ""
    api_key: str | None = field(default=None, repr=False)
    ca: str | None = None
    insecure: bool = False
    pool: str | None = None
    fps: float = 30.0
    duration: float | None = None  # seconds of schedule per stream
    frames: int | None = None  # frames per stream
    streams: int = 1
    frame_bytes: int | None = None  # generated JPEG of about this size; None: the images
    images: list[str] | None = None  # files or directories; None and no frame_bytes: the samples
    deadline_ms: float = 1000.0
    late_ms: float = 1.0
    connect_timeout: float = CONNECT_TIMEOUT_S
    label: str | None = None

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = "(set)" if self.api_key else None
        return d


# -- frames ------------------------------------------------------------------------



# The 101 response of the upgrade being made: the trace callback runs inside
# the stream's own task, so a context variable finds where to put it.
_UPGRADE: contextvars.ContextVar[StreamState | None] = contextvars.ContextVar("loadtest_upgrade", default=None)


async def _on_request_end(session: Any, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
    st = _UPGRADE.get()
    if st is not None:
        st.upgrade_status = params.response.status
        st.server_timing = list(params.response.headers.getall("Server-Timing", ()))


class StreamState:
    """One stream's connection and what happened to it."""

    def __init__(self, index: int, offset: float) -> None:
        self.index = index
        self.offset = offset  # its schedule's start, seconds after the run's
        self.ledger = FrameLedger(index)
        self.connect_ms: float | None = None
        self.upgrade_status: int | None = None
        self.server_timing: list[str] = []
        self.subprotocol: str | None = None
        self.error: str | None = None  # kind, e.g. "HTTP 401", "closed"
        self.error_detail: str | None = None
        self.close_code: int | None = None
        self.not_sent = 0  # scheduled frames never sent (the connection had gone)
        self.last_intended = 0.0
        self.ws: aiohttp.ClientWebSocketResponse | None = None


@dataclass
class StreamProgress:
    """What the live display shows; updated by the run, read by cli."""

    sent: int = 0
    answered: int = 0
    dropped: int = 0  # by the server; unanswered frames are known only at the end
    errors: int = 0
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20000))  # (done, latency ms)

    def ended(self, f: Frame, at: float) -> None:
        if f.outcome == ANSWERED:
            self.answered += 1
            self.recent.append((at, (at - f.intended) * 1000))
        elif f.outcome == DROPPED:
            self.dropped += 1
        else:
            self.errors += 1


class StreamRun:
    """N streams at F frames per second: `await execute()`, then read `streams`."""

    def __init__(self, cfg: StreamConfig, stop: asyncio.Event | None = None,
                 frames: list[tuple[str, bytes]] | None = None) -> None:
        if cfg.duration is None and cfg.frames is None:
            raise UsageError("give --duration S or --frames N")
        if cfg.fps <= 0 or cfg.streams < 1:
            raise UsageError("--fps and --streams must be positive")
        self.cfg = cfg
        self.stop = stop or asyncio.Event()
        try:
            url = URL(cfg.url)
        except ValueError as exc:
            raise UsageError(f"--url {cfg.url!r} is not a valid URL: {exc}") from None
        if url.scheme not in ("ws", "wss", "http", "https") or not url.host:
            raise UsageError(f"--url {cfg.url!r}: need a ws:// or wss:// URL with a host")
        self.url = url
        self.frames = frames if frames is not None else load_frames(cfg.images, cfg.frame_bytes)
        self.headers: dict[str, str] = {"User-Agent": f"loadtest/{__version__}"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        if cfg.pool:
            self.headers["X-Pool"] = cfg.pool
        self._ssl = tls_context(cfg.ca, cfg.insecure)
        # Evenly staggered within one frame interval, so N streams do not send in lockstep.
        self.streams = [StreamState(i, i / (cfg.streams * cfg.fps)) for i in range(cfg.streams)]
        self.t0 = 0.0
        self.wall_start = 0.0
        self.span_s = 0.0
        self.tunnel_rtt_ms: dict[str, float] | None = None
        self.interrupted = False
        self.progress = StreamProgress()

    async def execute(self) -> None:
        tc = aiohttp.TraceConfig()
        tc.on_request_end.append(_on_request_end)
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=0)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[tc]) as session:
            self.wall_start = time.time()
            # Connect every stream first: connection set-up is reported apart
            # (connect_ms), not charged to the first frames.
            await asyncio.gather(*(self._connect(session, s) for s in self.streams))
            await self._refusal_detail(session)
            if any(s.ws is not None for s in self.streams) and not self.stop.is_set():
                with frozen_heap():
                    self.t0 = perf()
                    await asyncio.gather(*(self._stream(s) for s in self.streams if s.ws is not None))
                    self.span_s = perf() - self.t0
            self.interrupted = self.stop.is_set()
            for s in self.streams:
                s.ledger.close()
                if s.ws is not None and not s.ws.closed:
                    await s.ws.close()
            if self.cfg.api_key and not self.stop.is_set():
                self.tunnel_rtt_ms = await edge_tunnel_rtt(session, self.url, self.headers, self.cfg.pool)

    def elapsed(self) -> float:
        """Seconds since the first scheduled frame (0 before)."""
        return perf() - self.t0 if self.t0 else 0.0

    async def _refusal_detail(self, session: aiohttp.ClientSession) -> None:
        """aiohttp drops the body of a refused upgrade; the edge's JSON `detail`
        says why. Ask once more, as a plain GET with the same headers, and keep
        the detail if the answer has the same status."""
        refused = [s for s in self.streams if s.error and s.error.startswith("HTTP ")]
        if not refused:
            return
        status = refused[0].upgrade_status
        url = self.url.with_scheme({"ws": "http", "wss": "https"}.get(self.url.scheme, self.url.scheme))
        try:
            async with session.get(url, headers=self.headers, timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status != status:
                    return
                detail = f"{r.reason or ''}: {_detail(await r.content.read(4096))}".strip(": ")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return
        for s in refused:
            if s.upgrade_status == status:
                s.error_detail = detail

    async def _connect(self, session: aiohttp.ClientSession, s: StreamState) -> None:
        _UPGRADE.set(s)
        t = perf()
        try:
            s.ws = await asyncio.wait_for(session.ws_connect(
                self.url, headers=self.headers, protocols=(SUBPROTOCOL,), compress=0,
                max_msg_size=MAX_MSG_BYTES, autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                ssl=self._ssl), self.cfg.connect_timeout)
        except asyncio.CancelledError:
            raise
        except aiohttp.WSServerHandshakeError as exc:
            s.upgrade_status = exc.status
            if exc.status == 101:
                s.error, s.error_detail = "bad upgrade", exc.message or "the WebSocket handshake failed"
            else:
                s.error = f"HTTP {exc.status}"
                s.error_detail = exc.message or ""
        except Exception as exc:  # every failure is a counted stream, never a traceback
            s.error, s.error_detail = _error_kind(exc)
            if s.error == "timeout":
                s.error_detail = f"no WebSocket upgrade within {self.cfg.connect_timeout:g} s"
        else:
            s.connect_ms = (perf() - t) * 1000
            s.subprotocol = s.ws.protocol

    async def _stream(self, s: StreamState) -> None:
        assert s.ws is not None
        reader = asyncio.ensure_future(self._read(s))
        try:
            await self._send(s, reader)
            # Answers for the last frames: until each is in, or DRAIN_DEADLINES
            # deadlines after the last scheduled send, so that an answer a little
            # late is seen as a deadline miss rather than taken for a drop.
            end = s.last_intended + DRAIN_DEADLINES * self.cfg.deadline_ms / 1000
            while s.ledger.waiting and not reader.done() and not self.stop.is_set():
                left = end - (perf() - self.t0)
                if left <= 0:
                    break
                await asyncio.wait([reader], timeout=min(left, 0.05))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _send(self, s: StreamState, reader: asyncio.Future[None]) -> None:
        cfg = self.cfg
        assert s.ws is not None
        pacer = Pacer(arrival_offsets(cfg.fps), end=cfg.duration, count=cfg.frames)
        n_frames = len(self.frames)
        while not self.stop.is_set():
            now = perf() - self.t0 - s.offset
            due, wait = pacer.poll(now)
            for seq, intended in due:
                s.last_intended = s.offset + intended
                if reader.done() or s.ws.closed:
                    s.not_sent += 1
                    continue
                at = perf() - self.t0
                s.ledger.sent(seq, s.offset + intended, at)
                self.progress.sent += 1
                try:
                    await s.ws.send_bytes(self.frames[(seq + s.index) % n_frames][1])
                except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                    s.error = s.error or "closed"
                    s.error_detail = s.error_detail or f"sending failed: {exc}"
            if wait is None:
                return
            await asyncio.sleep(min(wait_plan(wait), 0.1))

    async def _read(self, s: StreamState) -> None:
        assert s.ws is not None
        ws = s.ws
        while True:
            try:
                msg = await ws.receive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken connection ends the stream, counted, never a traceback
                s.error, s.error_detail = "closed", f"connection error: {exc.__class__.__name__}: {exc}"
                return
            at = perf() - self.t0
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                f = s.ledger.answer(msg.data, at)
                if f is not None:
                    self.progress.ended(f, at)
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                s.close_code = ws.close_code
                if msg.type == aiohttp.WSMsgType.ERROR:
                    s.error, s.error_detail = "closed", f"connection error: {ws.exception() or msg.data}"
                else:
                    reason = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE and msg.extra else ""
                    s.error = "closed"
                    s.error_detail = f"the server closed the WebSocket (code {ws.close_code}" + (
                        f" {reason!r})" if reason else ")")
                return
