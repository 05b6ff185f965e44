"""The edge's request middlewares, outermost first: `request_context` gives
every request its id, turns any `EdgeError` (and any bug) into the one error
shape, never a traceback; `client_auth` checks the client key and its rate
on the routes that need one (admin pages, proxied requests)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from httpcontract.request_id import HEADER as REQUEST_ID_HEADER
from httpcontract.request_id import accept as accept_request_id

from .auth import presented_key
from .errors import EdgeError, error_response
from .proxy import resolve_pool
from .routing import Route, classify, is_public_page
from .state import STATE
from .websocket import is_upgrade as websocket_upgrade
from .websocket import subprotocol_key

log = logging.getLogger("edge_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = "request_id"  # request[...] keys set here for the handlers
ROUTE = "route"
NORMALIZED_PATH = "normalized_path"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    route, norm = classify(request.method, request.raw_path)
    request[REQUEST_ID], request[ROUTE], request[NORMALIZED_PATH] = rid, route, norm
    try:
        resp = await handler(request)
    except EdgeError as exc:
        resp = exc.response(rid)
    except web.HTTPException as exc:  # raised by aiohttp itself (e.g. a body over client_max_size)
        resp = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason, rid)
    except Exception:
        log.exception("internal error on %s %s (request %s)", request.method, request.path, rid)
        resp = error_response(500, "internal_error", "the edge failed to handle this request", rid)
    if not resp.prepared:
        resp.headers[REQUEST_ID_HEADER] = rid
    return resp


@web.middleware
async def client_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request[ROUTE]
    if route is Route.PROXY and is_public_page(request.method, resolve_pool(request)[1],
                                               request.app[STATE].config.public_path) \
            and not websocket_upgrade(request):
        return await handler(request)  # --public-path: a page browsers open without a key (/live)
    if route in (Route.ADMIN, Route.PROXY):
        refused = authenticate(request, admin=route is Route.ADMIN)
        if refused is not None:
            raise refused
    return await handler(request)


def authenticate(request: web.Request, admin: bool) -> EdgeError | None:
    """None if the client key is valid (and within its rate), else why not."""
    state = request.app[STATE]
    now = time.monotonic()
    key = presented_key(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
    if not key and not admin and websocket_upgrade(request):
        key = subprotocol_key(request)  # browsers cannot set headers on a WebSocket
    cred = state.client_keys.verify(key)
    if cred is None:
        peer = request.remote or "?"
        wait = state.auth_failures.check(peer, now)
        state.metrics.rejections.labels("bad_key").inc()
        if wait > 0:
            log.warning("too many failed authentications from %s", peer)
            return EdgeError("too many failed authentications from this address", status=429,
                             code="too_many_auth_failures", headers={"Retry-After": str(max(1, round(wait)))})
        log.info("rejected request from %s: %s client key", peer, "wrong" if key else "no")
        return EdgeError("a valid client API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                         status=401, code="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="edge"'})
    if admin and not cred.admin:
        return EdgeError("this key may not read the edge's status", status=403, code="forbidden")
    wait = state.limiter.check(cred.name, now, cred.rate, cred.burst)
    if wait > 0:
        state.metrics.rejections.labels("rate_limited").inc()
        return EdgeError(f"rate limit of key {cred.name!r} exceeded", status=429, code="rate_limited",
                         headers={"Retry-After": str(max(1, round(wait + 0.49)))})
    return None
