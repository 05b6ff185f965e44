"""The edge's aiohttp application: the middlewares (request id and errors,
client auth), one route that sends each kind of request to its module
(`admin`, `inspector_pages`, `tunnel_endpoint`, `proxy`), the recording of
every proxied request (metrics, inspector), graceful drain and shutdown, and
the periodic heap trim. See docs/architecture.md for the concern -> module map."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from runtime import allocator

from . import admin, direct, heads, inspector_pages, proxy, siblings, websocket
from .auth import CredentialStore
from .browser_session import SessionSigner
from .config import EdgeConfig
from .errors import EdgeError
from .inspector import KEY_NAME, WORKER, Inspector
from .metrics import EdgeMetrics
from .middleware import NORMALIZED_PATH, REQUEST_ID, ROUTE, client_auth, request_context
from .ratelimit import RateLimiter
from .registry import Pool, Registry, Worker
from .routing import Route
from .state import STATE, EdgeState
from .tunnel_endpoint import tunnel_endpoint

log = logging.getLogger("edge_proxy")
UNKNOWN_POOL = "_unknown"  # the metrics label of requests for a pool that does not exist


async def route(request: web.Request) -> web.StreamResponse:
    """The one route: the middlewares have classified and authenticated."""
    state = request.app[STATE]
    kind: Route = request[ROUTE]
    if kind is Route.HEALTH:
        return admin.health(state)
    if kind is Route.READY:
        return admin.ready(state)
    if kind is Route.TUNNEL:
        return await tunnel_endpoint(state, request, request[REQUEST_ID])
    if kind is Route.ADMIN:
        page = await inspector_pages.handle_admin(state, request, request[NORMALIZED_PATH])
        if page is None and state.config.processes > 1:  # one picture of every process
            page = await siblings.admin_page(state, request[NORMALIZED_PATH])
        return page if page is not None else admin.admin_page(state, request[NORMALIZED_PATH])
    if kind is Route.LOGIN:
        return await inspector_pages.handle_login_route(state, request, request[NORMALIZED_PATH])
    if kind is Route.RESERVED:
        raise EdgeError("no such edge endpoint", status=404, code="not_found")
    if kind is Route.BAD_TARGET:
        raise EdgeError("only origin-form requests are proxied", status=400, code="bad_request")
    return await proxied(state, request)


async def proxied(state: EdgeState, request: web.Request) -> web.StreamResponse:
    """A request for a worker, counted per pool and in the drain's in-flight count."""
    started = time.monotonic()
    pool, target = heads.resolve_pool(request)
    status = 500
    upgrade = websocket.is_upgrade(request)
    resp: web.StreamResponse | None = None
    state.in_flight += 1
    state.idle.clear()
    try:
        if upgrade:
            resp = await websocket.handle(state, request, pool, target, request[REQUEST_ID], started)
        else:
            resp = await proxy.handle(state, request, pool, target, request[REQUEST_ID], started)
        status = resp.status
        return resp
    except asyncio.CancelledError:
        status = 499  # client closed the connection
        raise
    except EdgeError as exc:
        status = exc.status
        raise
    finally:
        state.in_flight -= 1
        if state.in_flight == 0:
            state.idle.set()
        # The pool name is the client's text: only a pool the edge knows may
        # become a label, or any key holder could create series without end.
        label = pool if pool in state.registry.pools else UNKNOWN_POOL
        now = time.monotonic()
        state.metrics.requests.labels(label, str(status)).inc()
        state.metrics.duration.labels(label).observe(now - started)
        # The one place the inspector learns of a finished request (or WebSocket).
        timing = ", ".join(resp.headers.getall("Server-Timing", [])) if resp is not None else ""
        state.inspector.record(now, time.time(), request_id=request[REQUEST_ID], method=request.method,
                               raw_path=request.raw_path, pool=label, worker=request.get(WORKER, ""),
                               status=status, duration=now - started, key=request.get(KEY_NAME, ""),
                               server_timing=timing, websocket=upgrade)


async def drain(app: web.Application) -> None:
    """Refuse new work, GOAWAY every tunnel, let in-flight requests finish
    (up to the grace period). Must run before the runner's cleanup: once
    aiohttp starts closing connections it stops reading them, tunnels too."""
    state = app[STATE]
    state.draining = True
    for s in list(state.sessions):
        s.goaway("edge shutting down")
    if state.in_flight:
        try:
            await asyncio.wait_for(state.idle.wait(), state.config.grace)
        except TimeoutError:
            log.warning("%d request(s) still in flight after %.0f s of grace", state.in_flight, state.config.grace)
    await websocket.close_all(state, 1001, "edge shutting down")


async def _heap_trimming(app: web.Application) -> AsyncIterator[None]:
    """Every `malloc_trim_interval` seconds, give freed heap pages back to the
    system (runtime/allocator.py says why), with its cost in the metrics."""
    state = app[STATE]
    interval = state.config.malloc_trim_interval
    if allocator.heap_trimmer() is None or interval <= 0:
        yield
        return

    def observe(seconds: float, released: int) -> None:
        state.metrics.heap_trims.observe(seconds)
        state.metrics.heap_trimmed.inc(released)

    task = asyncio.create_task(allocator.trim_periodically(interval, observe), name="heap-trim")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _on_shutdown(app: web.Application) -> None:
    for s in list(app[STATE].sessions):
        s.abort("edge shut down")


def make_app(config: EdgeConfig, client_keys: CredentialStore, worker_tokens: CredentialStore) -> web.Application:
    n = config.processes
    state = EdgeState(config, client_keys, worker_tokens, metrics=EdgeMetrics(multiprocess=n > 1))
    state.registry = Registry(config.health, config.max_queue,
                              on_ejection=lambda w: _ejected(state, w), limit_policy=config.shed_limit,
                              on_ejection_capped=lambda w, first: _ejection_capped(state, w, first),
                              on_limited=_limited)
    state.registry.pools.setdefault("default", Pool("default"))
    state.inspector = Inspector(config.inspector_requests, time.monotonic())
    state.browser_sessions = SessionSigner(config.inspector_session_ttl)
    # With N processes each limits at rate / N: the kernel spreads a client's
    # connections over them, so together they allow about the configured rate.
    state.limiter = RateLimiter(config.rate_limit / n, max(1.0, config.rate_burst / n) if n > 1 else config.rate_burst)
    state.auth_failures = RateLimiter(config.auth_failures_per_minute / 60.0 / n,
                                      max(1.0, config.auth_failures_per_minute / n))
    app = web.Application(client_max_size=config.max_body, middlewares=[request_context, client_auth])
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", route)
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_heap_trimming)
    app.cleanup_ctx.append(direct.lifecycle)
    return app


def _ejected(state: EdgeState, w: Worker) -> None:
    state.metrics.ejections.labels(w.pool).inc()
    log.warning("worker %s ejected for %.0f s after consecutive failures (ejection #%d)", w.agent_id,
                w.health.ejected_until - time.monotonic(), w.health.times_ejected)


def _ejection_capped(state: EdgeState, w: Worker, first: bool) -> None:
    state.metrics.ejections_capped.labels(w.pool).inc()
    if not first:  # once per failing spell, not per streak: a failing worker kept in would flood the log
        return
    now = time.monotonic()
    pool = state.registry.pools.get(w.pool)
    members = pool.workers if pool is not None else [w]
    if not any(m is not w and m.available(now) for m in members):
        why = f"it is the last available worker of pool {w.pool}, which outlier detection never ejects"
    else:
        ejected = sum(1 for m in members if m.health.is_ejected(now))
        why = (f"{ejected} of the {len(members)} workers of pool {w.pool} are ejected already, as many as "
               f"--max-ejection-percent {state.config.health.max_ejection_percent:g} allows")
    log.warning("worker %s keeps failing but is not ejected: %s", w.agent_id, why)


def _limited(w: Worker) -> None:
    log.info("worker %s is shedding load (503 with Retry-After or 429): busy, not failing; the edge lowers its "
             "concurrency to %d of %d and regains it over time", w.agent_id,
             w.limit.effective(time.monotonic(), w.capacity), w.capacity)
