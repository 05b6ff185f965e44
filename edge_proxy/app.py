"""The edge's aiohttp application: routes, the request middleware (ids,
auth, rate limits, metrics, no tracebacks to clients), the tunnel endpoint,
status pages, and graceful shutdown."""

from __future__ import annotations

import asyncio
import html
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web

from tunnel import allocator

from . import proxy
from .auth import CredentialStore, presented_key
from .config import EdgeConfig
from .errors import error_response
from .metrics import EdgeMetrics
from .ratelimit import RateLimiter
from .registry import Pool, Registry, Worker
from .session import EdgeSession

log = logging.getLogger("edge_proxy")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PUBLIC_PATHS = {"/_edge/health", "/_edge/ready"}
ADMIN_PATHS = {"/_edge/metrics", "/_edge/workers", "/_edge/", "/_edge"}


@dataclass(eq=False)
class EdgeState:
    config: EdgeConfig
    client_keys: CredentialStore
    worker_tokens: CredentialStore
    registry: Registry = field(default_factory=Registry)
    metrics: EdgeMetrics = field(default_factory=EdgeMetrics)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0, 0))
    auth_failures: RateLimiter = field(default_factory=lambda: RateLimiter(1, 60))
    sessions: set[EdgeSession] = field(default_factory=set)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    started: float = field(default_factory=time.time)


STATE = web.AppKey("state", EdgeState)


def normalized_path(raw_path: str) -> str:
    """The path as a server would resolve it: percent-decoded, slashes
    merged, dot segments removed. Used only to classify, never to forward."""
    p = unquote(raw_path.split("?", 1)[0], errors="replace")
    p = re.sub(r"/+", "/", p)
    norm = posixpath.normpath(p) if p not in ("", "/") else "/"
    if p.endswith("/") and norm != "/":
        norm += "/"
    return norm if norm.startswith("/") else "/" + norm


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("X-Request-ID", "")
    return rid if REQUEST_ID.match(rid) else uuid.uuid4().hex


def _authenticate(state: EdgeState, request: web.Request, request_id: str, admin: bool) -> web.Response | None:
    """None if the client key is valid (and within its rate), else the answer."""
    now = time.monotonic()
    key = presented_key(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
    cred = state.client_keys.verify(key)
    if cred is None:
        peer = request.remote or "?"
        wait = state.auth_failures.check(peer, now)
        state.metrics.rejections.labels("bad_key").inc()
        if wait > 0:
            log.warning("too many failed authentications from %s", peer)
            return error_response(429, "too_many_auth_failures", "too many failed authentications from this address",
                                  request_id, headers={"Retry-After": str(max(1, round(wait)))})
        log.info("rejected request from %s: %s client key", peer, "wrong" if key else "no")
        return error_response(401, "unauthorized", "a valid client API key is required (Authorization: Bearer KEY "
                              "or X-API-Key: KEY)", request_id,
                              headers={"WWW-Authenticate": 'Bearer realm="edge"'})
    if admin and not cred.admin:
        return error_response(403, "forbidden", "this key may not read the edge's status", request_id)
    wait = state.limiter.check(cred.name, now, cred.rate, cred.burst)
    if wait > 0:
        state.metrics.rejections.labels("rate_limited").inc()
        return error_response(429, "rate_limited", f"rate limit of key {cred.name!r} exceeded", request_id,
                              headers={"Retry-After": str(max(1, round(wait + 0.49)))})
    return None


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every request lands here: edge endpoints by exact path, else the proxy."""
    state = request.app[STATE]
    started = time.monotonic()
    request_id = _request_id(request)
    path = request.path
    norm = normalized_path(request.raw_path)
    pool = "-"
    status = 500
    try:
        if request.raw_path.startswith("/_edge") and norm in PUBLIC_PATHS and request.method == "GET":
            resp: web.StreamResponse = health(state) if norm == "/_edge/health" else ready(state)
        elif path == "/_edge/tunnel" and request.raw_path.split("?")[0] == "/_edge/tunnel":
            return await tunnel_endpoint(state, request)
        elif norm in ADMIN_PATHS and request.raw_path.startswith("/_edge"):
            resp = _authenticate(state, request, request_id, admin=True) or admin_page(state, norm)
        elif norm == "/_edge" or norm.startswith("/_edge/"):
            # Anything else that resolves under /_edge is the edge's namespace:
            # never proxied, whatever its spelling.
            resp = error_response(404, "not_found", "no such edge endpoint", request_id)
        elif request.method == "CONNECT" or not request.raw_path.startswith("/"):
            resp = error_response(400, "bad_request", "only origin-form requests are proxied", request_id)
        else:
            denied = _authenticate(state, request, request_id, admin=False)
            if denied is not None:
                resp = denied
            else:
                pool, target = proxy.resolve_pool(request)
                state.in_flight += 1
                state.idle.clear()
                try:
                    resp = await proxy.handle(state, request, pool, target, request_id, started)
                finally:
                    state.in_flight -= 1
                    if state.in_flight == 0:
                        state.idle.set()
        status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-ID"] = request_id
        return resp
    except asyncio.CancelledError:
        status = 499  # client closed the connection
        raise
    except Exception:
        log.exception("internal error on %s %s (request %s)", request.method, request.path, request_id)
        return error_response(500, "internal_error", "the edge failed to handle this request", request_id)
    finally:
        if pool != "-":
            state.metrics.requests.labels(pool, str(status)).inc()
            state.metrics.duration.labels(pool).observe(time.monotonic() - started)


def health(state: EdgeState) -> web.Response:
    return web.json_response({"status": "draining" if state.draining else "ok"})


def ready(state: EdgeState) -> web.Response:
    now = time.monotonic()
    pools = {
        name: sum(1 for w in p.workers if w.available(now)) for name, p in state.registry.pools.items()
    }
    ok = not state.draining and any(pools.values())
    return web.json_response({"ready": ok, "healthy_workers": pools}, status=200 if ok else 503)


def worker_info(w: Worker, now: float) -> dict[str, object]:
    rtt = w.rtt()
    return {
        "id": w.agent_id,
        "pool": w.pool,
        "capacity": w.capacity,
        # What shedding left of the capacity (overload.AdaptiveLimit); == capacity when not shedding.
        "effective_capacity": w.limit.effective(now, w.capacity),
        "in_flight": w.in_flight,
        "served": w.served,
        "errors": w.errors,
        "shed": w.shed,
        "health": w.health.state(now) if w.live_session() else "disconnected",
        "available": w.available(now),
        "agent_report": {"healthy": w.health.agent_healthy, "detail": w.health.agent_detail},
        "last_check_error": w.health.last_check_error,
        "ejections": w.health.times_ejected,
        "ejections_capped": w.health.ejections_capped,
        "ewma_latency_ms": round(w.ewma_latency * 1000, 3),
        "tunnel_rtt_ms": None if rtt is None else round(rtt * 1000, 3),
        "tunnels": sorted(w.sessions),
        "software": w.software,
        "labels": w.labels,
        "connected_for_s": round(time.time() - w.connected_at, 1),
    }


def admin_page(state: EdgeState, norm: str) -> web.Response:
    now = time.monotonic()
    if norm == "/_edge/metrics":
        return web.Response(body=state.metrics.render(state.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    workers = [worker_info(w, now) for w in state.registry.workers.values()]
    if norm == "/_edge/workers":
        return web.json_response({"workers": workers, "pools": state.registry.pool_names()})
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(w[k]))}</td>" for k in
                         ("id", "pool", "health", "tunnel_rtt_ms", "in_flight", "capacity", "served", "errors",
                          "ewma_latency_ms")) + "</tr>"
        for w in workers
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edge status</title>
<meta http-equiv="refresh" content="2"><style>body{{font:14px system-ui,sans-serif;margin:2em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head>
<body><h1>Edge status</h1><p>{len(workers)} worker(s), {state.in_flight} request(s) in flight,
up {time.time() - state.started:.0f} s{' &mdash; DRAINING' if state.draining else ''}</p>
<table><tr><th>worker</th><th>pool</th><th>health</th><th>RTT ms</th><th>in flight</th><th>capacity</th>
<th>served</th><th>errors</th><th>EWMA ms</th></tr>{rows}</table></body></html>"""
    return web.Response(text=page, content_type="text/html")


async def tunnel_endpoint(state: EdgeState, request: web.Request) -> web.StreamResponse:
    rid = _request_id(request)
    token = presented_key(request.headers.get("Authorization"), None)
    cred = state.worker_tokens.verify(token)
    if cred is None:
        peer = request.remote or "?"
        if state.auth_failures.check(peer, time.monotonic()) > 0:
            return error_response(429, "too_many_auth_failures", "too many failed authentications", rid)
        log.warning("tunnel from %s refused: %s worker token", peer, "wrong" if token else "no")
        return error_response(401, "unauthorized", "a valid worker token is required", rid,
                              headers={"WWW-Authenticate": 'Bearer realm="edge-tunnel"'})
    if state.config.require_worker_cert:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        if not peercert:
            return error_response(401, "unauthorized", "a worker client certificate is required", rid)
    if state.draining:
        return error_response(503, "draining", "the edge is shutting down", rid, headers={"Retry-After": "1"})
    ws = web.WebSocketResponse(max_msg_size=state.config.tunnel_settings.connection_window + (1 << 20),
                               autoping=True, heartbeat=None, compress=False)
    await ws.prepare(request)
    session = EdgeSession(state, request, ws, cred.name)
    state.sessions.add(session)
    try:
        await session.run()
    finally:
        state.sessions.discard(session)
    return ws


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


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def _heap_trimming(app: web.Application) -> AsyncIterator[None]:
    """Every `malloc_trim_interval` seconds, give freed heap pages back to the
    system: tunnel churn leaves the heap fragmented, and RSS would only grow."""
    state = app[STATE]
    trim = allocator.heap_trimmer()
    interval = state.config.malloc_trim_interval
    if trim is None or interval <= 0:
        yield
        return

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            before = _resident_bytes()
            t0 = time.perf_counter()
            trim()
            state.metrics.heap_trims.observe(time.perf_counter() - t0)
            state.metrics.heap_trimmed.inc(max(0, before - _resident_bytes()))

    task = asyncio.create_task(loop(), name="heap-trim")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _on_shutdown(app: web.Application) -> None:
    for s in list(app[STATE].sessions):
        s.abort("edge shut down")


def make_app(config: EdgeConfig, client_keys: CredentialStore, worker_tokens: CredentialStore) -> web.Application:
    state = EdgeState(config, client_keys, worker_tokens)
    state.registry = Registry(config.health, config.max_queue,
                              on_ejection=lambda w: _ejected(state, w), limit_policy=config.shed_limit,
                              on_ejection_capped=lambda w, first: _ejection_capped(state, w, first),
                              on_limited=_limited)
    state.registry.pools.setdefault("default", Pool("default"))
    state.limiter = RateLimiter(config.rate_limit, config.rate_burst)
    state.auth_failures = RateLimiter(config.auth_failures_per_minute / 60.0, config.auth_failures_per_minute)
    app = web.Application(client_max_size=config.max_body)
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", dispatch)
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_heap_trimming)
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
