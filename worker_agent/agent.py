"""The worker agent: dials OUT to every edge and keeps its tunnels up,
admits streams within `--capacity`, forwards them to the local upstream,
probes the upstream's health and reports it, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.io import StreamChannel, TunnelIO
from runtime.cli import StartupError
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
    WelcomeReceived,
    WorkerStatus,
)

from . import __version__, websocket
from .backoff import Backoff
from .config import AgentConfig
from .forward import forward
from .upstream import UpstreamPool

log = logging.getLogger("worker_agent")

# An edge that accepted us this long ago counts as a success for backoff.
STABLE_AFTER = 5.0


def client_ssl_context(cfg: AgentConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.ca:
        try:
            ctx.load_verify_locations(cfg.ca)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot load CA file {cfg.ca}: {exc}; pass the edge's ca.pem with --ca") from None
    if cfg.client_cert:
        try:
            ctx.load_cert_chain(cfg.client_cert, cfg.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot load client certificate {cfg.client_cert}: {exc}") from None
    if cfg.insecure:
        log.warning("TLS certificate verification of the edge is OFF (--insecure): anyone on the path can "
                    "impersonate the edge and read every request")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class EdgeRefused(Exception):
    """The edge answered our HELLO with a GOAWAY: it will not take this tunnel."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


class TunnelClient:
    """One tunnel to one edge, reconnected for as long as the agent runs."""

    def __init__(self, agent: Agent, url: str, index: int) -> None:
        self.agent = agent
        self.url = url
        self.index = index
        self.io: TunnelIO | None = None
        self.ws: ClientConnection | None = None
        self.connected = asyncio.Event()
        self._welcome: asyncio.Future[WelcomeReceived] | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._slots: dict[int, bool] = {}  # stream id -> is a health check, for streams holding a slot
        self._edge_draining = False

    @property
    def name(self) -> str:
        return f"{self.url}#{self.index}"

    async def run_forever(self) -> None:
        backoff = Backoff()
        last_error = ""
        cfg = self.agent.config
        while not self.agent.stopping.is_set():
            started = time.monotonic()
            refused = False
            try:
                await self._session()
                error = "edge closed the tunnel" if not self._edge_draining else "edge is draining"
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
                if status == 401:
                    error += ": the worker token is wrong (check --token / AGENT_TOKEN)"
            except ssl.SSLCertVerificationError as exc:
                error = f"edge certificate not trusted ({exc.verify_message}): pass its CA with --ca"
            except (OSError, ConnectionClosed, TimeoutError, ProtocolError) as exc:
                error = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            finally:
                self.connected.clear()
            if self.agent.stopping.is_set():
                break
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
            try:
                await asyncio.wait_for(self.agent.stopping.wait(), delay)
            except TimeoutError:
                pass

    async def _session(self) -> None:
        cfg = self.agent.config
        settings = self.agent.settings
        async with connect(
            self.url,
            ssl=self.agent.ssl_context if self.url.startswith("wss:") else None,
            additional_headers={"Authorization": f"Bearer {cfg.token}"},
            max_size=settings.connection_window + (1 << 20),
            max_queue=64,
            ping_interval=None,  # the tunnel has its own heartbeats
            compression=None,
            open_timeout=10,
            close_timeout=1,
            # Honours https_proxy / no_proxy: many networks that block inbound
            # traffic also force outbound HTTPS through a proxy.
            proxy=True,
            user_agent_header=f"worker-agent/{__version__}",
        ) as ws:
            self.ws = ws
            self._edge_draining = False
            conn = Connection(Role.AGENT, settings)
            io = TunnelIO(conn, ws.send, self._on_event, Heartbeat(cfg.heartbeat_interval, cfg.dead_after),
                          self._on_dead)
            self.io = io
            self._welcome = asyncio.get_running_loop().create_future()
            labels = dict(cfg.labels)
            labels["tunnel"] = str(self.index)
            conn.send_hello(Hello(cfg.agent_id, cfg.pool, cfg.capacity, f"worker-agent/{__version__}", labels,
                                  instance=self.agent.instance, health_path=cfg.health_path))
            io.start()
            try:
                reader = asyncio.create_task(self._read_loop(ws, io))
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
                log.info("tunnel %s up (pool %s, capacity %d)", self.name, cfg.pool, cfg.capacity)
                self.connected.set()
                self.send_status()
                await reader
            finally:
                await self._stop_streams(io)

    async def _read_loop(self, ws: ClientConnection, io: TunnelIO) -> None:
        while True:
            try:
                data = await ws.recv()
            except ConnectionClosed:
                if conn_goaway := io.conn.goaway_received:
                    if conn_goaway.code is not ErrorCode.NO_ERROR:
                        raise ConnectionError(f"edge closed the tunnel: {conn_goaway.code.name} "
                                              f"{conn_goaway.reason}") from None
                return
            if isinstance(data, str):
                raise ConnectionError("edge sent a text message")
            try:
                io.feed(data)
            except ProtocolError as exc:
                log.error("tunnel %s: the edge sent a malformed frame: %s", self.name, exc)
                await io.drain_output()
                raise
            if io.conn.state is State.CLOSED:
                return
            if self._edge_draining and not io.channels:
                return  # all our streams are done: reconnect (to the restarted edge)

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


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        if not config.edges:
            raise StartupError("no edge given; pass --edge wss://HOST:PORT/_edge/tunnel")
        if not config.token:
            raise StartupError("no worker token; pass --token or --token-file (create one with "
                             "`edge-proxy tokens create`)")
        for url in config.edges:
            if not url.startswith(("wss://", "ws://")):
                raise StartupError(f"edge URL {url!r} must start with wss:// (or ws:// for plain tests)")
        self.config = config
        # Random per process: the edge tells this process reconnecting from
        # another process that was given the same --id.
        self.instance = secrets.token_hex(8)
        self.settings = PeerSettings()
        self.ssl_context = client_ssl_context(config)
        self.clients = [TunnelClient(self, url, i) for url in config.edges for i in range(config.tunnels_per_edge)]
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = asyncio.Event()
        self.upstream_healthy: bool | None = None
        self.upstream_detail = ""
        self.http: aiohttp.ClientSession  # WebSockets and the health probe
        # Plain requests: a lean keep-alive pool (aiohttp's general client was
        # a quarter of the agent's CPU per request, docs/benchmarks.md).
        try:
            self.upstream = UpstreamPool(config.upstream.rstrip("/"))
        except ValueError as exc:
            raise StartupError(f"--upstream: {exc}") from None

    def admit(self, is_check: bool) -> bool:
        if self.stopping.is_set():
            return False
        if not is_check:
            if self.in_flight >= self.config.capacity:
                return False
            self.in_flight += 1
            self.idle.clear()
        return True

    def done(self, is_check: bool) -> None:
        if not is_check:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def probe_once(self) -> None:
        url = self.config.upstream.rstrip("/") + self.config.health_path
        try:
            async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=max(1.0, self.config.health_interval))) as r:
                await r.read()
                healthy, detail = 200 <= r.status < 300, f"GET {self.config.health_path} -> {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            healthy, detail = False, f"upstream unreachable: {exc.__class__.__name__}"
        if healthy != self.upstream_healthy:
            log.info("upstream %s is %s (%s)", self.config.upstream, "healthy" if healthy else "UNHEALTHY", detail)
            self.upstream_healthy, self.upstream_detail = healthy, detail
            for c in self.clients:
                c.send_status()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await self.probe_once()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
            self.http = http
            await self.probe_once()
            tasks = [asyncio.create_task(c.run_forever(), name=c.name) for c in self.clients]
            prober = asyncio.create_task(self._probe_loop())
            await self.stopping.wait()
            log.info("draining: GOAWAY to every edge, up to %.0f s for %d in-flight request(s)", self.config.grace,
                     self.in_flight)
            for c in self.clients:
                c.goaway()
            try:
                await asyncio.wait_for(self.idle.wait(), self.config.grace)
            except TimeoutError:
                log.warning("%d request(s) still in flight after the grace period", self.in_flight)
                await websocket.close_all(self.idle, 1001, "worker shutting down")
            prober.cancel()
            for c in self.clients:
                if c.ws is not None:
                    await c.ws.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, prober, return_exceptions=True)
            self.upstream.close()
        log.info("agent stopped")

    def stop(self) -> None:
        self.stopping.set()

