"""The edge's request middlewares, outermost first: `request_context` gives
every request its id, turns any `EdgeError` (and any bug) into the one error
shape, never a traceback; `client_auth` checks the client key and its rate
on the routes that need one (admin pages, proxied requests), or, on admin
pages, a signed-in browser's session cookie (browser_session.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from httpcontract.request_id import HEADER as REQUEST_ID_HEADER
from httpcontract.request_id import accept as accept_request_id

from .auth import Credential, presented_key
from .browser_session import COOKIE, CSRF_FIELD, CSRF_HEADER, same_origin
from .errors import EdgeError, error_response
from .heads import resolve_pool
from .inspector import KEY_NAME
from .routing import LOGIN_PATH, Route, classify, is_public_page
from .state import STATE
from .websocket import is_upgrade as websocket_upgrade
from .websocket import subprotocol_key

log = logging.getLogger("edge_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# request[...] keys set here for the handlers
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
ROUTE: web.RequestKey[Route] = web.RequestKey("route", Route)
NORMALIZED_PATH: web.RequestKey[str] = web.RequestKey("normalized_path", str)
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
SESSION = "browser_session"  # the BrowserSession of a signed-in browser, when that is how it authenticated


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
    public = request.app[STATE].config.public_path
    if (public and route is Route.PROXY  # resolve the pool only when some page is public
            and is_public_page(request.method, resolve_pool(request)[1], public)
            and not websocket_upgrade(request)):
        return await handler(request)  # --public-path: a page browsers open without a key (/live)
    if route in (Route.ADMIN, Route.PROXY):
        csrf = None
        if (route is Route.ADMIN and request.method == "POST" and request.content_type in FORM_TYPES
                and request.content_length is not None and request.content_length <= 8192):
            csrf = str((await request.post()).get(CSRF_FIELD) or "")  # the inspector's forms carry it
        refused = authenticate(request, admin=route is Route.ADMIN, csrf=csrf)
        if refused is not None:
            if route is Route.ADMIN and refused.status == 401 and _browser_page(request):
                # A browser opening the inspector: the sign-in form, not a JSON 401.
                return web.Response(status=303, headers={"Location": LOGIN_PATH})
            raise refused
    return await handler(request)


def _browser_page(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


def authenticate(request: web.Request, admin: bool, csrf: str | None = None) -> EdgeError | None:
    """None if the client key is valid (and within its rate), else why not.
    Admin routes also take a browser session cookie (browser_session.py),
    with a CSRF token (`csrf`, from a form, or the X-CSRF-Token header) on
    anything but GET/HEAD."""
    now = time.monotonic()
    key = presented_key(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
    if not key and not admin and websocket_upgrade(request):
        key = subprotocol_key(request)  # browsers cannot set headers on a WebSocket
    if not key and admin and COOKIE in request.cookies:
        return _session_auth(request, now, csrf)
    cred = check_key(request, key, now)
    if isinstance(cred, EdgeError):
        return cred
    if admin and not cred.admin:
        return EdgeError("this key may not read the edge's status (create an admin key with `edge-proxy keys create "
                         "--admin`)", status=403, code="forbidden")
    return _within_rate(request, cred, now)


def check_key(request: web.Request, key: str | None, now: float) -> Credential | EdgeError:
    """The credential of a presented client key, or the error to answer
    (401, or 429 once an address failed too often)."""
    state = request.app[STATE]
    cred = state.client_keys.verify(key)
    if cred is None:
        return _failed(request, now, "wrong" if key else "no", "a valid client API key is required "
                       "(Authorization: Bearer KEY or X-API-Key: KEY)")
    return cred


def _failed(request: web.Request, now: float, what: str, detail: str) -> EdgeError:
    state = request.app[STATE]
    peer = request.remote or "?"
    wait = state.auth_failures.check(peer, now)
    state.metrics.rejections.labels("bad_key").inc()
    if wait > 0:
        log.warning("too many failed authentications from %s", peer)
        return EdgeError("too many failed authentications from this address", status=429,
                         code="too_many_auth_failures", headers={"Retry-After": str(max(1, round(wait)))})
    log.info("rejected request from %s: %s client key", peer, what)
    return EdgeError(detail, status=401, code="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="edge"'})


def _within_rate(request: web.Request, cred: Credential, now: float) -> EdgeError | None:
    state = request.app[STATE]
    request[KEY_NAME] = cred.name
    rate, burst, n = cred.rate, cred.burst, state.config.processes
    if n > 1:  # --processes N: each process keeps its share (edge_proxy/app.py does the same for the default)
        rate = None if rate is None else rate / n
        burst = None if burst is None else max(1.0, burst / n)  # a bucket below one request never admits
    wait = state.limiter.check(cred.name, now, rate, burst)
    if wait > 0:
        state.metrics.rejections.labels("rate_limited").inc()
        return EdgeError(f"rate limit of key {cred.name!r} exceeded", status=429, code="rate_limited",
                         headers={"Retry-After": str(max(1, round(wait + 0.49)))})
    return None


def _session_auth(request: web.Request, now: float, csrf: str | None) -> EdgeError | None:
    state = request.app[STATE]
    session = state.browser_sessions.verify(request.cookies.get(COOKIE), time.time())
    cred = state.client_keys.named(session.name) if session is not None else None
    if session is None or cred is None or not cred.admin:
        return _failed(request, now, "expired or forged session for a", f"not signed in, or the session expired; "
                       f"sign in again at {LOGIN_PATH}")
    if request.method not in ("GET", "HEAD"):
        presented = request.headers.get(CSRF_HEADER) or csrf
        if not same_origin(request.headers.get("Origin"), request.headers.get("Host")) or \
                not state.browser_sessions.csrf_ok(session, presented):
            log.warning("refused a %s to %s with the session of %r: no valid CSRF token or a foreign Origin",
                        request.method, request.path, session.name)
            return EdgeError("this request needs the page's CSRF token and must come from the inspector's own "
                             "pages", status=403, code="csrf")
    request[SESSION] = session
    return _within_rate(request, cred, now)
