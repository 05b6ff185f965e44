"""One tunnel to one edge, reconnected for as long as the agent runs: the
handshake, admission of each stream to the agent's capacity, forwarding
(HTTP or WebSocket), backoff on failures and on refusals, drain. The
WebSocket itself (TLS, token, proxy; how it is read) is dial.py. `AgentHost`
is what it needs of the agent."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Protocol

import aiohttp
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.io import StreamChannel, TunnelIO
from tunnel import (
    Connection,
    ErrorCode,
    Event,
    GoAwayReceived,
    Heartbeat,
    Hello,
    PeerSettings,
    ProtocolError,
    RequestReceived,
    Role,
    State,
    StreamReset,
    Welcome,
    WelcomeReceived,
    WorkerStatus,
)

from . import __version__, dial, websocket, wsconn
from .backoff import AuthFailures, Backoff
from .config import AgentConfig
from .forward import forward
from .upstream import UpstreamPool

log = logging.getLogger("worker_agent")

# An edge that accepted us this long ago counts as a success for backoff.
STABLE_AFTER = 5.0


class AgentHost(Protocol):
    """The agent as its tunnels see it (worker_agent.agent.Agent)."""

    config: AgentConfig
    instance: str
    settings: PeerSettings
    ssl_context: ssl.SSLContext
    stopping: asyncio.Event
    http: aiohttp.ClientSession
    upstream: UpstreamPool
    upstream_healthy: bool | None
    upstream_detail: str

    def admit(self, is_check: bool) -> bool: ...

    def done(self, is_check: bool) -> None: ...

    def fail(self, reason: str) -> None: ...

    def tunnel_welcomed(self, client: TunnelClient, welcome: Welcome) -> bool: ...

    def tunnel_ended(self, client: TunnelClient) -> None: ...

    def duplicate_delay(self, client: TunnelClient) -> float | None: ...


class EdgeRefused(Exception):
    """The edge answered our HELLO with a GOAWAY: it will not take this tunnel."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


class DuplicateProcess(Exception):
    """The tunnel landed on an edge process we hold enough tunnels to already."""


class TunnelClient:
    """One tunnel to one edge, reconnected for as long as the agent runs."""

    def __init__(self, agent: AgentHost, url: str, index: int) -> None:
        self.agent = agent
        self.url = url
        self.index = index
        self.io: TunnelIO | None = None
        self.ws: ClientConnection | wsconn.WSConnection | None = None
        self.connected = asyncio.Event()
        self._welcome: asyncio.Future[WelcomeReceived] | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._slots: dict[int, bool] = {}  # stream id -> is a health check, for streams holding a slot
        self._edge_draining = False
        self.auth_failures = AuthFailures(agent.config.max_auth_failures)

    @property
    def name(self) -> str:
        return f"{self.url}#{self.index}"

    async def run_forever(self) -> None:
        backoff = Backoff()
        last_error = ""
        cfg = self.agent.config
        while not self.agent.stopping.is_set():
            started = time.monotonic()
            refused = token_refused = False
            try:
                await self._session()
                error = "edge closed the tunnel" if not self._edge_draining else "edge is draining"
            except DuplicateProcess:
                # Expected with a several-process edge: dial again, no backoff, no log.
                self.connected.clear()
                dup_delay = self.agent.duplicate_delay(self)
                if dup_delay is None:
                    break
                await self._wait(dup_delay)
                continue
            except EdgeRefused as exc:
                refused = True
                if exc.code is ErrorCode.DUPLICATE_ID:
                    error = (f"edge refused agent id {cfg.agent_id!r}: {exc.reason}; give each agent its own --id "
                             "(AGENT_ID)")
                else:
                    error = f"edge refused the tunnel ({exc.code.name}): {exc.reason}"
            except InvalidStatus as exc:
                status = exc.response.status_code
                error = f"edge refused the tunnel with HTTP {status}"
                token_refused = status == 401
            except ssl.SSLCertVerificationError as exc:
                error = f"edge certificate not trusted ({exc.verify_message}): pass its CA with --ca"
            except (OSError, ConnectionClosed, TimeoutError, ProtocolError) as exc:
                error = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            finally:
                self.connected.clear()
            if self.agent.stopping.is_set():
                break
            if token_refused:
                delay = self._token_refused()
                if delay is None:
                    break
                await self._wait(delay)
                continue
            self.auth_failures.reset()
            if time.monotonic() - started > STABLE_AFTER and not refused:
                backoff.reset()
            delay = backoff.next_delay(refused)
            if refused and error != last_error:
                # One line per clash; the later refusals are the same story.
                log.error("tunnel %s: %s; not taking its place, retrying in %.1f s and then less often", self.name,
                          error, delay)
            elif not refused and (error != last_error or backoff.failures <= 1):
                log.warning("tunnel %s: %s; reconnecting in %.2f s", self.name, error, delay)
            last_error = error
            await self._wait(delay)

    async def _wait(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self.agent.stopping.wait(), delay)
        except TimeoutError:
            pass

    def _token_refused(self) -> float | None:
        """The edge said 401 to our token: log (ever less often) and return
        the wait before the next attempt (doubling), or None: give up."""
        cfg = self.agent.config
        v = self.auth_failures.record()
        what = (f"edge refused the worker token with HTTP 401 ({v.attempt} attempt(s) in a row): the token from "
                f"{cfg.token_source or '--token'} is not one the edge accepts (`edge-proxy tokens create` on the "
                "edge prints a valid one)")
        if v.give_up:
            self.agent.fail(f"tunnel {self.name}: {what}; giving up after --max-auth-failures "
                            f"{cfg.max_auth_failures}")
            return None
        if v.log:
            log.error("tunnel %s: %s; retrying in %.0f s, logging again at attempt %d%s", self.name, what, v.delay,
                      2 * v.attempt, "" if cfg.max_auth_failures else " (--max-auth-failures N to give up)")
        return v.delay

    async def _connect(self) -> ClientConnection | wsconn.WSConnection:
        return await dial.connect(self.agent.config, self.agent.settings, self.url, self.agent.ssl_context)

    async def _session(self) -> None:
        cfg = self.agent.config
        settings = self.agent.settings
        ws = await self._connect()
        try:
            self.ws = ws
            self._edge_draining = False
            conn = Connection(Role.AGENT, settings)
            hb = Heartbeat(cfg.heartbeat_interval, cfg.dead_after)
            if isinstance(ws, wsconn.WSConnection):
                io = TunnelIO(conn, ws.send, self._on_event, hb, self._on_dead, write=ws.write_frames,
                              drain=ws.drain)
            else:
                io = TunnelIO(conn, ws.send, self._on_event, hb, self._on_dead)
            self.io = io
            self._welcome = asyncio.get_running_loop().create_future()
            labels = dict(cfg.labels)
            labels["tunnel"] = str(self.index)
            conn.send_hello(Hello(cfg.agent_id, cfg.pool, cfg.capacity, f"worker-agent/{__version__}", labels,
                                  instance=self.agent.instance, health_path=cfg.health_path, process_aware=True))
            io.start()
            try:
                if isinstance(ws, wsconn.WSConnection):
                    reader = asyncio.create_task(dial.read_own(ws, io, self.name, self._reconnect_due))
                else:
                    reader = asyncio.create_task(dial.read_loop(ws, io, self.name, self._reconnect_due))
                waits: set[asyncio.Future[Any]] = {reader, self._welcome}
                done, _ = await asyncio.wait(waits, timeout=10,
                                             return_when=asyncio.FIRST_COMPLETED)
                if self._welcome not in done:
                    if reader in done:
                        refusal = conn.goaway_received
                        if refusal is not None and refusal.code is not ErrorCode.NO_ERROR:
                            reader.cancel()
                            raise EdgeRefused(refusal.code, refusal.reason)
                        reader.result()  # raise why it ended
                        raise ConnectionError(io.close_reason or "edge closed the tunnel during the handshake")
                    raise TimeoutError("no WELCOME from the edge within 10 s")
                welcome = self._welcome.result().welcome
                if not self.agent.tunnel_welcomed(self, welcome):
                    # A several-process edge sent us to a process we hold already:
                    # end it before it carries anything (the edge sends nothing to
                    # it until our first STATUS, which it never gets).
                    conn.goaway(ErrorCode.NO_ERROR, "duplicate process")
                    io.flush()
                    await io.drain_output()
                    reader.cancel()
                    raise DuplicateProcess()
                where = f", edge process {welcome.process} of {welcome.processes}" if welcome.processes > 1 else ""
                log.info("tunnel %s up (pool %s, capacity %d%s)", self.name, cfg.pool, cfg.capacity, where)
                self.connected.set()
                self.send_status()
                await reader
            finally:
                self.agent.tunnel_ended(self)
                await self._stop_streams(io)
        finally:
            await ws.close()

    def _reconnect_due(self) -> bool:
        """The edge is draining and all our streams are done: reconnect (to the restarted edge)."""
        return self._edge_draining and not (self.io is not None and self.io.channels)

    def _on_event(self, ev: Event) -> None:
        io = self.io
        assert io is not None
        if isinstance(ev, WelcomeReceived):
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(ev)
        elif isinstance(ev, RequestReceived):
            is_check = False
            for n, _ in ev.head.headers:  # a plain loop: this runs on every request
                if n.lower() == "x-edge-health-check":
                    is_check = True
                    break
            if not self.agent.admit(is_check):
                io.reset(ev.stream_id, ErrorCode.REFUSED_STREAM, "worker at capacity or draining")
                return
            self._slots[ev.stream_id] = is_check
            ch = io.register(ev.stream_id)
            if ev.end_stream:
                ch.body.put_nowait(None)
            task = asyncio.create_task(self._serve(io, ch, ev))
            self._tasks[ev.stream_id] = task
        elif isinstance(ev, StreamReset):
            # The edge gave up on it (client gone, timeout): cancel the upstream request.
            running = self._tasks.pop(ev.stream_id, None)
            if running is not None:
                running.cancel()
            # Free the slot now: the edge considers it free already and may
            # send the next request in the same read.
            self._release_slot(ev.stream_id)
        elif isinstance(ev, GoAwayReceived):
            self._edge_draining = True
            if io.conn.welcome is not None:  # a GOAWAY in place of WELCOME is a refusal, reported by run_forever
                log.info("tunnel %s: edge is draining (%s)", self.name, ev.reason or ev.code.name)

    async def _serve(self, io: TunnelIO, ch: StreamChannel, ev: RequestReceived) -> None:
        cfg = self.agent.config
        try:
            if websocket.wants_upgrade(ev.head):
                await websocket.serve(io, ch, ev.head, self.agent.http, cfg.upstream.rstrip("/"), cfg.ws_max_message,
                                      cfg.upstream_timeout)
            else:
                await forward(io, ch, ev.head, ev.end_stream, self.agent.upstream, cfg.buffer_response,
                              cfg.upstream_timeout)
        except Exception:
            log.exception("stream %d failed", ch.stream_id)
            io.reset(ch.stream_id, ErrorCode.INTERNAL_ERROR, "agent error")
        finally:
            self._tasks.pop(ch.stream_id, None)
            self._release_slot(ch.stream_id)
            if self._edge_draining and not io.channels and self.ws is not None:
                await io.drain_output()  # the last response must leave before the close
                await self.ws.close()

    def _release_slot(self, stream_id: int) -> None:
        is_check = self._slots.pop(stream_id, None)
        if is_check is not None:
            self.agent.done(is_check)

    def _on_dead(self, reason: str) -> None:
        log.warning("tunnel %s: %s; dropping it", self.name, reason)
        if self.ws is not None:
            self.ws.transport.abort()

    def send_status(self) -> None:
        io = self.io
        if io is None or io.conn.state is not State.OPEN or not self.connected.is_set():
            return
        healthy, detail = self.agent.upstream_healthy, self.agent.upstream_detail
        io.conn.send_status(WorkerStatus(healthy is not False, detail))
        io.flush()

    def goaway(self) -> None:
        io = self.io
        if io is not None and io.conn.state is State.OPEN:
            io.conn.goaway(ErrorCode.NO_ERROR, "agent shutting down")
            io.flush()

    async def _stop_streams(self, io: TunnelIO) -> None:
        await io.close(io.close_reason or "tunnel closed")
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.io = None


