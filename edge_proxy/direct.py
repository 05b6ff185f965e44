"""Direct workers: servers the edge dials itself over plain HTTP (typically
at an address inside a WireGuard VPN), declared by the operator only
(`--direct`, `--directs FILE`, direct_spec.py). Each is a `DirectSession`
in the same registry as tunnel sessions, so it gets the same balancing,
admission, ejection and drain; it owns a keep-alive connection pool to its
worker and the worker's active health checks. `DirectWorkers` holds the set
and applies a new one (SIGHUP): added ones join, removed ones drain and leave,
changed ones are replaced. The HTTP exchange is direct_http.py, WebSockets
direct_ws.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from yarl import URL

from .direct_spec import DirectSpec, DirectSpecError, load
from .health import WorkerHealth, check_delay
from .outcome import Waiting
from .state import STATE, EdgeState

if TYPE_CHECKING:
    from .registry import Worker

log = logging.getLogger("edge_proxy.direct")

DIRECT_TUNNEL = "direct"  # a direct session's key in Worker.sessions
# The credential name of direct workers: an agent claiming one's id holds
# another credential, so the registry refuses it (registry.clash).
OWNER = "--direct"
# Connections beyond the capacity: one for the health check, one for a
# request that is being retried while its predecessor's connection closes.
SPARE_CONNECTIONS = 2
# aiohttp's client adds these when absent; the worker should see the client's headers only.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def share(capacity: int, processes: int, index: int) -> int:
    """What edge process `index` of `processes` admits of a direct worker's
    capacity: the processes' shares add up to the capacity (a direct worker
    has no admission of its own to refuse an excess), but each admits at
    least one (with fewer slots than processes, up to `processes` at once)."""
    n = max(1, processes)
    return max(1, capacity // n + (1 if index < capacity % n else 0))


class DirectSession:
    """One direct worker as the registry sees it (a registry.TunnelSession):
    its connection pool, its open requests and its health-check loop."""

    kind = "direct"

    def __init__(self, spec: DirectSpec, state: EdgeState) -> None:
        self.spec = spec
        self.state = state
        cfg = state.config
        connector = aiohttp.TCPConnector(limit=share(spec.capacity, cfg.processes, cfg.process_index) + SPARE_CONNECTIONS,
                                         keepalive_timeout=cfg.direct_keepalive)
        self.client = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=cfg.direct_connect_timeout),
            auto_decompress=False,  # bytes pass through as the worker encoded them
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.worker: Worker | None = None
        self.active = 0  # requests and WebSockets in flight on it
        self._draining = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._checks: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        # Requests waiting for their response head, ended when the worker goes silent (_abandon_waiting).
        self._waiting: dict[Waiting, asyncio.Timeout] = {}
        self._silent = False  # the last failed check or connect got no answer at all (not a status)

    # ------------------------------------------------ registry.TunnelSession
    @property
    def accepting(self) -> bool:
        return not self._draining and not self._closed

    @property
    def open_streams(self) -> int:
        return self.active

    @property
    def rtt(self) -> float | None:
        return None  # no heartbeat: the VPN leg's time is in each answer's `upstream` entry

    def abort(self, reason: str) -> None:
        self._draining = True
        if not self._closed:
            self._closed = True
            if self._checks is not None:
                self._checks.cancel()
            self._closing = asyncio.get_running_loop().create_task(self.client.close())

    def goaway(self, reason: str) -> None:
        """No new requests; the open ones finish."""
        self._draining = True

    # ---------------------------------------------------------------- use
    def url(self, target: str) -> URL:
        """The worker's URL for a request target as the client sent it (path and query, already encoded)."""
        return URL(self.spec.url + target, encoded=True)

    @contextmanager
    def using(self) -> Iterator[None]:
        """Count one request (or WebSocket) in flight on this worker."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    @contextmanager
    def waiting(self, slot: Waiting, deadline: asyncio.Timeout) -> Iterator[None]:
        """A request waiting for the worker's response head: if the worker goes silent meanwhile
        (checks unanswered, the VPN path gone), its deadline is brought forward to now."""
        self._waiting[slot] = deadline
        try:
            yield
        finally:
            self._waiting.pop(slot, None)

    def _abandon_waiting(self, why: str) -> None:
        """The worker stopped answering: a request still waiting for its head would otherwise hang
        until --upstream-timeout (a tunnel's requests end with the tunnel; these end here)."""
        now = asyncio.get_running_loop().time()
        for slot, deadline in list(self._waiting.items()):
            if deadline.expired():
                continue  # its own timeout fired in this loop iteration: it ends by itself
            slot.abandoned = why
            deadline.reschedule(now)

    async def close(self, grace: float) -> None:
        """Wait up to `grace` for the open requests, then close the pool."""
        self._draining = True
        if self._checks is not None:
            self._checks.cancel()
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            log.warning("direct worker %s: %d request(s) still open after %.0f s; closing its connections",
                        self.spec.id, self.active, grace)
        self._closed = True
        await self.client.close()

    # ------------------------------------------------------- health checks
    def check_path(self) -> str:
        return self.spec.health or self.state.config.health_path

    def start(self, worker: Worker) -> None:
        self.worker = worker
        self._checks = asyncio.get_running_loop().create_task(self._health_checks(), name="direct-health")

    def unreachable(self, error: str) -> None:
        """Real traffic could not connect: as telling as a failed check, and sooner."""
        self._silent = True
        self.state.metrics.direct_connect_failures.labels(self.spec.pool).inc()
        self._record(False, error)

    def _record(self, ok: bool, error: str) -> None:
        w = self.worker
        if w is None or self._draining:
            return
        h = w.health
        first = h.last_check is None
        before, before_error = h.checks_healthy, h.last_check_error
        h.record_check(time.monotonic(), ok, error)
        if first:
            if h.checks_healthy:
                log.info("direct worker %s (pool %s, %s) is up", w.agent_id, w.pool, self.spec.url)
            else:
                log.warning("direct worker %s (pool %s, %s) is not answering: %s; it takes no requests until a "
                            "check at %s passes", w.agent_id, w.pool, self.spec.url, error, self.check_path())
        elif before != h.checks_healthy or (error and error != before_error):
            log.info("direct worker %s active check: %s %s", w.agent_id,
                     "healthy" if h.checks_healthy else "UNHEALTHY", error)
        if before and not h.checks_healthy and self._silent and self._waiting:
            log.warning("direct worker %s went silent (%s): ending %d request(s) still waiting for its answer",
                        w.agent_id, error, len(self._waiting))
            self._abandon_waiting(error)
        self.state.registry.wake(w.pool)

    async def _health_checks(self) -> None:
        policy = self.state.config.health
        while not self._draining:
            ok, error = await self.check_once(self.check_path(), policy.check_timeout)
            self._record(ok, error)
            # Jittered, so workers declared together do not probe in lockstep.
            await asyncio.sleep(check_delay(policy.check_interval, self.state.registry.rng))

    async def check_once(self, path: str, timeout: float) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(timeout):
                async with self.client.get(self.url(path), headers={"X-Edge-Health-Check": "1"},
                                           allow_redirects=False) as r:
                    await r.read()
        except TimeoutError:
            self._silent = True
            return False, f"GET {path}: no answer within {timeout:g} s"
        except aiohttp.ClientConnectorError as exc:
            self._silent = True
            return False, f"GET {path}: cannot connect to {self.spec.url}: {exc.os_error.strerror or exc}"
        except aiohttp.ClientError as exc:
            self._silent = False
            return False, f"GET {path}: {type(exc).__name__} {exc}"
        except (OSError, ValueError, RuntimeError) as exc:  # never end the check loop: a silent one would
            self._silent = False
            return False, f"GET {path}: {exc!r}"  # leave the worker in its last state for good
        self._silent = False  # an answer, even a 503: the worker is there (busy or draining), not gone
        if 200 <= r.status < 300:
            return True, ""
        return False, f"GET {path} -> {r.status}"


class DirectWorkers:
    """The edge's direct workers, by id; `apply` moves to a new set."""

    def __init__(self, state: EdgeState) -> None:
        self.state = state
        self.sessions: dict[str, DirectSession] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def apply(self, specs: list[DirectSpec]) -> dict[str, list[str]]:
        """Move to `specs`; returns the ids added, removed, replaced, unchanged."""
        new = {s.id: s for s in specs}
        done: dict[str, list[str]] = {"added": [], "removed": [], "replaced": [], "unchanged": []}
        for ident in [i for i in self.sessions if i not in new]:
            self._retire(self.sessions.pop(ident), "removed from the configuration")
            done["removed"].append(ident)
        for ident, spec in new.items():
            old = self.sessions.get(ident)
            if old is not None and old.spec == spec:
                done["unchanged"].append(ident)
                continue
            held = self.state.registry.workers.get(ident)
            if held is not None and held.kind != DirectSession.kind:
                log.warning("direct worker %s not added: a tunnel agent holds that id; give it another id=NAME",
                            ident)
                continue
            self._add(spec, old)
            done["replaced" if old is not None else "added"].append(ident)
        return done

    def _add(self, spec: DirectSpec, old: DirectSession | None) -> None:
        reg = self.state.registry
        session = DirectSession(spec, self.state)
        if old is not None:
            self._retire(old, "replaced by a changed declaration")
        # With --processes N each process dials the worker itself: each admits
        # its share, as for tunnel workers (a direct worker has no admission
        # of its own to refuse the excess).
        cfg = self.state.config
        capacity = share(spec.capacity, cfg.processes, cfg.process_index)
        worker, _ = reg.attach(session, spec.id, spec.pool, capacity, DIRECT_TUNNEL, OWNER, software="direct",
                               health_path=spec.health)
        worker.kind, worker.url = DirectSession.kind, spec.url
        same_endpoint = old is not None and old.worker is not None and (old.spec.url, old.spec.health, old.spec.pool) \
            == (spec.url, spec.health, spec.pool)
        if same_endpoint and old is not None and old.worker is not None:
            # Only its capacity or id changed: what its checks and answers
            # said still holds (a failing or ejected worker stays out).
            worker.health = old.worker.health
        else:
            # Admitted on proof: no request goes to it before a check passes,
            # so a worker down at start costs nothing but its absence.
            worker.health = WorkerHealth(reg.policy, checks_healthy=False)
        self.sessions[spec.id] = session
        session.start(worker)
        of = f", {capacity} of it at process {cfg.process_index} of {cfg.processes}" if cfg.processes > 1 else ""
        if spec.capacity < cfg.processes and cfg.process_index == 0:
            log.warning("direct worker %s: capacity %d is below --processes %d; each process admits 1, so up to %d "
                        "requests may reach it at once", spec.id, spec.capacity, cfg.processes, cfg.processes)
        log.info("direct worker %s joins pool %s at %s (capacity %d%s, checked at %s)", spec.id, spec.pool, spec.url,
                 spec.capacity, of, session.check_path())

    def _retire(self, session: DirectSession, why: str) -> None:
        session.goaway(why)
        w = session.worker
        if w is not None:
            self.state.registry.detach(w, DIRECT_TUNNEL, session)
        log.info("direct worker %s (%s) leaves pool %s: %s; %d request(s) finishing", session.spec.id,
                 session.spec.url, session.spec.pool, why, session.active)
        task = asyncio.get_running_loop().create_task(session.close(self.state.config.grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def reload(self) -> None:
        """SIGHUP: re-read --directs; a bad file changes nothing."""
        cfg = self.state.config
        try:
            specs = load(cfg.direct, cfg.directs)
        except DirectSpecError as exc:
            log.error("SIGHUP: direct workers not reloaded, keeping the %d in use: %s", len(self.sessions), exc)
            return
        done = self.apply(specs)
        log.info("SIGHUP: direct workers reloaded from %s: %s", cfg.directs or "the command line",
                 "; ".join(f"{k} {', '.join(v)}" for k, v in done.items() if v and k != "unchanged")
                 or "no change", )

    async def close(self) -> None:
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for s in sessions:
            s.abort("edge stopped")
        await asyncio.gather(*(s.client.close() for s in sessions), *self._retiring, return_exceptions=True)


DIRECTS = web.AppKey("directs", DirectWorkers)


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: the declared direct workers live as long as the app."""
    state = app[STATE]
    workers = DirectWorkers(state)
    app[DIRECTS] = workers
    workers.apply(load(state.config.direct, state.config.directs))
    yield
    await workers.close()
