"""The edge's end of one worker tunnel: the WebSocket handler that performs
the handshake, registers the worker, runs the tunnel and its active health
checks, and opens streams for the proxy."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from relay.io import StreamChannel, TunnelIO
from tunnel import (
    PROTOCOL_VERSIONS,
    Connection,
    ErrorCode,
    Event,
    GoAwayReceived,
    Heartbeat,
    HelloReceived,
    ProtocolError,
    RequestHead,
    Role,
    StatusReceived,
    StreamError,
    UsageError,
)
from tunnel.handshake import choose_version

from .health import check_delay

if TYPE_CHECKING:
    from .registry import Worker
    from .state import EdgeState

log = logging.getLogger(__name__)


JOIN_BELOW = 16 * 1024  # pieces smaller than a TLS record are joined with their neighbours


def ws_message(frames: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """One unmasked binary WebSocket message (RFC 6455 5.2: a server's) whose
    payload is the frames, as buffers for `writelines`: the header and runs
    of small pieces joined, large pieces as they are."""
    n = 0
    for f in frames:
        n += len(f)
    if n < 126:
        header = bytes((0x82, n))
    elif n < 65536:
        header = bytes((0x82, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x82, 127)) + n.to_bytes(8, "big")
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = [header]
    for f in frames:
        if len(f) < JOIN_BELOW:
            small.append(f)
        else:
            out.append(b"".join(small))
            small = []
            out.append(f)
    if small:
        out.append(b"".join(small))
    return out


class HeadTooLarge(Exception):
    """The request head does not fit in one tunnel frame."""


class EdgeSession:
    def __init__(self, state: EdgeState, request: web.Request, ws: web.WebSocketResponse, token_name: str) -> None:
        self.state = state
        self.request = request
        self.ws = ws
        self.token_name = token_name
        cfg = state.config
        self.conn = Connection(Role.EDGE, cfg.tunnel_settings)
        self.io = TunnelIO(
            self.conn,
            ws.send_bytes,
            self._on_event,
            Heartbeat(cfg.heartbeat_interval, cfg.dead_after),
            self._on_dead,
            write=self._write_frames,
            drain=self._drain,
        )
        self.worker: Worker | None = None
        self.tunnel_index = "0"
        self.peer = request.remote or "?"
        self._hello: asyncio.Future[HelloReceived] = asyncio.get_running_loop().create_future()
        self._draining = False
        # A tunnel of a process-aware agent to one of several edge processes:
        # out of service until the agent confirms it (its first STATUS) rather
        # than ending it as a duplicate (docs/protocol.md, "Several edge processes").
        self._pending = False
        self._check_task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ properties
    @property
    def accepting(self) -> bool:
        return self.io.accepting and not self._draining and not self._pending

    @property
    def open_streams(self) -> int:
        return len(self.io.channels)

    @property
    def rtt(self) -> float | None:
        return self.io.heartbeat.srtt

    # ---------------------------------------------------------------- output
    def _write_frames(self, frames: list[bytes | memoryview]) -> bool:
        """The frames as one binary WebSocket message, straight onto the
        transport: small pieces joined, large payloads passed as they are (no
        copy; a TLS record holds 16 KiB, so only small ones gain from a join).
        aiohttp's writer writes frames whole and synchronously too, so its
        control frames never land inside ours. False when the transport is
        over its high-water mark."""
        transport = self.request.transport
        if transport is None or transport.is_closing() or self.ws.closed:
            raise ConnectionResetError("tunnel connection closed")
        transport.writelines(ws_message(frames))
        return not self.request.protocol.writing_paused

    async def _drain(self) -> None:
        protocol = self.request.protocol
        if protocol.writing_paused:
            await protocol._drain_helper()  # aiohttp's own wait for resume_writing (what send_bytes awaits)

    # -------------------------------------------------------------- running
    async def run(self) -> None:
        cfg = self.state.config
        self.io.start()
        reader = asyncio.create_task(self._read_loop())
        try:
            # asyncio.timeout, not wait_for, here and below: on Python 3.11 wait_for
            # loses a cancellation that arrives as its inner future completes
            # (CPython gh-86296), which once left a health-check loop running
            # after its tunnel had closed.
            async with asyncio.timeout(cfg.handshake_timeout):
                hello = await asyncio.shield(self._hello)
            if not self._admit(hello):
                await self.io.drain_output()
                return
            self.io.flush()
            self._check_task = asyncio.create_task(self._health_checks())
            await reader
        except TimeoutError:
            log.warning("tunnel from %s: no HELLO within %.1f s; closing", self.peer, cfg.handshake_timeout)
        finally:
            reader.cancel()
            if self._check_task:
                self._check_task.cancel()
            await self.io.close(self.io.close_reason or "tunnel closed", retryable=False)
            if self.worker is not None:
                self.state.registry.detach(self.worker, self.tunnel_index, self)
                log.log(logging.DEBUG if self._pending else logging.INFO, "worker %s (pool %s) tunnel %s closed: %s",
                        self.worker.agent_id, self.worker.pool, self.tunnel_index, self.io.close_reason)
            await self.ws.close()
            # Nothing of a closed tunnel should wait for a full garbage
            # collection (churn showed RSS following gen-2 collections).
            self.io.forget_owner()
            self._check_task = None

    def _admit(self, ev: HelloReceived) -> bool:
        hello = ev.hello
        reg = self.state.registry
        if choose_version(hello.versions) is None:
            self.state.metrics.tunnel_refusals.labels("version").inc()
            self.conn.reject(ErrorCode.VERSION_MISMATCH, f"edge speaks versions {list(PROTOCOL_VERSIONS)}")
            return False
        clash = reg.clash(hello.agent_id, hello.instance, self.token_name)
        if clash is not None:
            held = reg.workers[hello.agent_id]
            log.warning("tunnel from %s claims agent id %r (instance %s), but %s (instance %s, pool %s, connected "
                        "%.0f s ago); refused the newcomer: each agent process needs its own --id", self.peer,
                        hello.agent_id, hello.instance or "-", clash, held.instance or "-", held.pool,
                        time.time() - held.connected_at)
            self.state.metrics.tunnel_refusals.labels("duplicate_id").inc()
            self.conn.reject(ErrorCode.DUPLICATE_ID, clash)
            return False
        cfg = self.state.config
        self.tunnel_index = hello.labels.get("tunnel", "0")
        self.conn.accept(cfg.heartbeat_interval, process=cfg.process_index, processes=cfg.processes)
        self._pending = cfg.processes > 1 and hello.process_aware
        previous = reg.workers.get(hello.agent_id)
        # Each of N processes admits its share of the worker's capacity; the
        # agent's own admission stays the truth (REFUSED_STREAM, retried elsewhere).
        capacity = -(-hello.capacity // cfg.processes)
        worker, stale = reg.attach(self, hello.agent_id, hello.pool, capacity, self.tunnel_index,
                                   self.token_name, hello.software, hello.labels, hello.instance, hello.health_path)
        self.worker = worker
        if previous is not None and previous is not worker and previous.pool == worker.pool:
            log.info("worker %s: a new agent process (instance %s) takes over from one that is draining "
                     "(instance %s)", hello.agent_id, hello.instance, previous.instance)
        if stale is not None and stale is not self:
            log.info("worker %s reconnected; replacing its stale tunnel", hello.agent_id)
            stale.abort("replaced by a new tunnel from the same agent")
        if not self._pending:
            self._log_joined()
        return True

    def _log_joined(self) -> None:
        hello = self.conn.hello
        if hello is None:
            return
        cfg = self.state.config
        share = f", {-(-hello.capacity // cfg.processes)} of it at process {cfg.process_index} of " \
                f"{cfg.processes}" if cfg.processes > 1 else ""
        log.info("worker %s joined pool %s (capacity %d%s, checked at %s) from %s", hello.agent_id, hello.pool,
                 hello.capacity, share, self.check_path(), self.peer)

    async def _read_loop(self) -> None:
        ws = self.ws
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.BINARY:
                try:
                    self.io.feed(msg.data)
                except ProtocolError as exc:
                    who = self.worker.agent_id if self.worker else self.peer
                    log.warning("tunnel of %s sent a malformed frame (%s); closing that tunnel", who, exc)
                    self.io.close_reason = f"protocol error: {exc}"
                    await self.io.drain_output()
                    return
            elif msg.type is WSMsgType.TEXT:
                self.io.close_reason = "text message on the tunnel"
                return
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                if not self.io.close_reason:
                    self.io.close_reason = "connection closed by the agent"
                return

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, HelloReceived):
            if not self._hello.done():
                self._hello.set_result(ev)
        elif isinstance(ev, StatusReceived):
            if self._pending and self.worker is not None:
                self._pending = False  # the agent keeps this tunnel: in service from now on
                self._log_joined()
                self.state.registry.wake(self.worker.pool)
            if self.worker is not None:
                was = self.worker.health.agent_healthy
                self.worker.health.record_agent_report(ev.status.healthy, ev.status.detail)
                if was != ev.status.healthy:
                    log.info("worker %s reports upstream %s %s", self.worker.agent_id,
                             "healthy" if ev.status.healthy else "UNHEALTHY", ev.status.detail)
                self.state.registry.wake(self.worker.pool)
        elif isinstance(ev, GoAwayReceived):
            self._draining = True
            for sid, ch in list(self.io.channels.items()):
                if sid > ev.last_stream_id:
                    self.io.channels.pop(sid, None)
                    ch.fail(StreamError("worker is draining", ErrorCode.REFUSED_STREAM, retryable=True))
            if self.worker is not None:
                # A duplicate (the agent holds this process already) is routine, not news.
                log.log(logging.DEBUG if self._pending else logging.INFO, "worker %s is draining (%s)",
                        self.worker.agent_id, ev.reason or ev.code.name)

    def _on_dead(self, reason: str) -> None:
        self.abort(reason)

    def abort(self, reason: str) -> None:
        """Close the tunnel at once (dead peer, replaced session)."""
        if not self.io.close_reason:
            self.io.close_reason = reason
        if self.worker is not None:
            log.warning("worker %s tunnel %s: %s", self.worker.agent_id, self.tunnel_index, reason)
        # Keep a reference: the loop holds tasks only weakly.
        self._closing = asyncio.get_running_loop().create_task(self.io.close(reason))
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    def goaway(self, reason: str) -> None:
        self._draining = True
        self.conn.goaway(ErrorCode.NO_ERROR, reason)
        self.io.flush()

    # -------------------------------------------------------------- streams
    def open_stream(self, head: RequestHead, end_stream: bool) -> StreamChannel:
        """Send a request head on a new stream. Raises StreamError (retryable)
        if the tunnel cannot take new streams."""
        if not self.accepting:
            raise StreamError("tunnel is not accepting streams", ErrorCode.REFUSED_STREAM, retryable=True)
        try:
            sid = self.conn.open_stream()
        except Exception as exc:
            raise StreamError(str(exc), ErrorCode.REFUSED_STREAM, retryable=True) from None
        ch = self.io.register(sid)
        try:
            self.conn.send_request(sid, head, end_stream)
        except UsageError:
            self.io.reset(sid, ErrorCode.CANCEL, "head too large")
            raise HeadTooLarge(f"request head exceeds the tunnel's frame size of "
                               f"{self.conn.peer_settings.max_frame_size} bytes") from None
        self.io.flush()
        return ch

    def check_path(self) -> str:
        """Where this worker's upstream is checked: the path its agent declared,
        else the edge's fallback `health_path`."""
        declared = self.worker.health_path if self.worker is not None else ""
        return declared or self.state.config.health_path

    async def _health_checks(self) -> None:
        policy = self.state.config.health
        clock = time.monotonic
        # Ends with the tunnel by itself, so that no lost cancellation keeps
        # it (and, through it, the whole session) alive.
        while not self.io.closed.is_set():
            w = self.worker
            if w is not None and self.accepting:
                ok, error = await self.check_once(self.check_path(), policy.check_timeout)
                if not self.accepting:
                    # The tunnel began to drain (or closed) meanwhile: a refusal
                    # on it says nothing of the worker's health.
                    continue
                before, before_error = w.health.checks_healthy, w.health.last_check_error
                w.health.record_check(clock(), ok, error)
                if before != w.health.checks_healthy or (error and error != before_error):
                    log.info("worker %s active check: %s %s", w.agent_id,
                             "healthy" if w.health.checks_healthy else "UNHEALTHY", error)
                    self.state.registry.wake(w.pool)
            # Jittered, so tunnels that connected together do not probe in lockstep.
            await asyncio.sleep(check_delay(policy.check_interval, self.state.registry.rng))

    async def check_once(self, path: str, timeout: float) -> tuple[bool, str]:
        try:
            ch = self.open_stream(RequestHead("GET", path, (("x-edge-health-check", "1"),)), end_stream=True)
        except StreamError as exc:
            return False, str(exc)
        try:
            async with asyncio.timeout(timeout):
                head = await asyncio.shield(ch.head)
                await self.io.read_all(ch)
            self.io.release(ch.stream_id)
            if 200 <= head.status < 300:
                return True, ""
            return False, f"GET {path} -> {head.status}"
        except TimeoutError:
            self.io.reset(ch.stream_id, ErrorCode.CANCEL, "health check timeout")
            return False, f"GET {path}: no answer within {timeout:g} s"
        except StreamError as exc:
            return False, f"GET {path}: {exc}"
