"""The worker agent: keeps a tunnel to every edge (tunnel_client.py) and, when
an edge is several processes on one port, to every process of it
(coverage.py), admits streams within `--capacity`, probes the upstream's
health and reports it, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import aiohttp

from runtime.cli import StartupError
from tunnel import (
    PeerSettings,
    Welcome,
)

from . import websocket
from .config import AgentConfig
from .coverage import EdgeCoverage
from .dial import client_ssl_context
from .tunnel_client import TunnelClient
from .upstream import UpstreamPool

log = logging.getLogger("worker_agent")

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
        # Per edge URL: which of its processes our tunnels reach (`--processes N` edges).
        self.coverage = {url: EdgeCoverage(config.tunnels_per_edge) for url in config.edges}
        self._tasks: dict[TunnelClient, asyncio.Task[None]] = {}
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = asyncio.Event()
        self.fatal: str | None = None  # set by `fail`
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
            tasks = self._tasks
            for c in self.clients:
                tasks[c] = asyncio.create_task(c.run_forever(), name=c.name)
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
            running = list(tasks.values())
            for t in running:
                t.cancel()
            await asyncio.gather(*running, prober, return_exceptions=True)
            self.upstream.close()
        log.info("agent stopped")

    def stop(self) -> None:
        self.stopping.set()

    def fail(self, reason: str) -> None:
        """Stop for a reason that retrying cannot fix; the CLI exits with it."""
        if self.fatal is None:
            self.fatal = reason
            log.error("%s", reason)
        self.stopping.set()

    # ---------------------------------------------- several edge processes
    def tunnel_welcomed(self, client: TunnelClient, welcome: Welcome) -> bool:
        """Keep this tunnel (True), or end it: its edge process already has
        its `--tunnels-per-edge` from us. Adds tunnels when the edge turns
        out to be several processes."""
        cov = self.coverage[client.url]
        keep = cov.claim(client.index, welcome.process, welcome.processes)
        if keep:
            self._report(client.url)
        for c, t in list(self._tasks.items()):  # slots that stopped (the edge had fewer processes)
            if t.done():
                del self._tasks[c]
                self.clients.remove(c)
        have = {c.index for c in self.clients if c.url == client.url}
        for i in range(cov.wanted):
            if i not in have and not self.stopping.is_set():
                extra = TunnelClient(self, client.url, i)
                self.clients.append(extra)
                self._tasks[extra] = asyncio.create_task(extra.run_forever(), name=extra.name)
        return keep

    def tunnel_ended(self, client: TunnelClient) -> None:
        self.coverage[client.url].release(client.index)
        if not self.stopping.is_set():
            self._report(client.url)

    def duplicate_delay(self, client: TunnelClient) -> float | None:
        """Seconds before `client` dials again after landing on a process it
        holds already; None: this tunnel is not needed any more."""
        return self.coverage[client.url].duplicate_delay(client.index)

    def _report(self, url: str) -> None:
        cov = self.coverage[url]
        before = cov.reported
        line = cov.report(time.monotonic())
        if line is not None and (cov.processes > 1 or before[1] > 1):
            log.info("tunnels to edge %s: %s", url, line)
