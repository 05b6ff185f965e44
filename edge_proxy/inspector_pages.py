"""The inspector's HTTP side (/_edge/): the sign-in form and sign-out, the
page and its static files (package data in edge_proxy/static/, no build
step, nothing from a CDN), the JSON it reads (`/_edge/api/overview`,
`/_edge/api/requests`) and its live updates as Server-Sent Events
(`/_edge/events`). Who may see what is decided before: middleware.client_auth."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .admin import worker_info
from .browser_session import COOKIE, COOKIE_PATH, same_origin
from .errors import EdgeError
from .inspector import DEFAULT_LIMIT
from .middleware import SESSION, check_key
from .routing import LOGIN_PATH

if TYPE_CHECKING:
    from .state import EdgeState

log = logging.getLogger("edge_proxy")

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"inspector.js": "text/javascript", "inspector.css": "text/css"}
EVENTS_INTERVAL = 1.0  # seconds between two updates on /_edge/events
LOGIN_FORM_LIMIT = 8192  # bytes of a sign-in form; a key is ~50
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on form posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _template(name: str, **values: str) -> str:
    text = (STATIC / name).read_text(encoding="utf-8")
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", html.escape(v))
    return text


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS)


def login_form(error: str = "", status: int = 200) -> web.Response:
    return _html(_template("login.html", error=error, hidden="" if error else "hidden"), status)


async def handle_login_route(state: EdgeState, request: web.Request, norm: str) -> web.StreamResponse:
    """/_edge/login and /_edge/static/*: no credentials needed."""
    if norm.startswith("/_edge/static/"):
        name = norm.rsplit("/", 1)[1]
        if name not in STATIC_TYPES or request.method not in ("GET", "HEAD"):
            raise EdgeError("no such edge endpoint", status=404, code="not_found")
        return web.Response(body=(STATIC / name).read_bytes(), content_type=STATIC_TYPES[name],
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
    if request.method == "GET":
        return login_form()
    if request.method != "POST":
        raise EdgeError("use GET for the form, POST to sign in", status=405, code="method_not_allowed")
    return await _sign_in(state, request)


async def _sign_in(state: EdgeState, request: web.Request) -> web.Response:
    if not same_origin(request.headers.get("Origin"), request.headers.get("Host")):
        log.warning("refused an inspector sign-in posted from another site (Origin %r)",
                    request.headers.get("Origin"))
        return login_form("Sign-in refused: the form was posted from another site.", 403)
    if request.content_length is None or request.content_length > LOGIN_FORM_LIMIT:
        return login_form("Sign-in refused: the form is missing or too large.", 400)
    form = await request.post()
    key = str(form.get("key") or "").strip()
    now = time.monotonic()
    cred = check_key(request, key, now)
    if isinstance(cred, EdgeError):
        if cred.status == 429:
            return login_form("Too many failed sign-ins from this address; wait a minute.", 429)
        return login_form("That is not a valid client key of this edge.", 401)
    if not cred.admin:
        log.info("inspector sign-in refused for key %r from %s: not an admin key", cred.name, request.remote)
        return login_form(f"Key {cred.name!r} is not an admin key; create one with "
                          "`edge-proxy keys create --admin`.", 403)
    cookie, _ = state.browser_sessions.issue(cred.name, time.time())
    log.info("inspector: key %r signed in from %s", cred.name, request.remote)
    resp = web.Response(status=303, headers={"Location": "/_edge/", **SECURITY_HEADERS})
    resp.set_cookie(COOKIE, cookie, max_age=int(state.browser_sessions.ttl), path=COOKIE_PATH, secure=True,
                    httponly=True, samesite="Strict")
    return resp


def _sign_out(state: EdgeState, request: web.Request) -> web.Response:
    session = request.get(SESSION)
    if session is not None:
        state.browser_sessions.revoke(session, time.time())
        log.info("inspector: key %r signed out", session.name)
    resp = web.Response(status=303, headers={"Location": LOGIN_PATH, **SECURITY_HEADERS})
    resp.del_cookie(COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict")
    return resp


async def handle_admin(state: EdgeState, request: web.Request, norm: str) -> web.StreamResponse | None:
    """The inspector's admin paths; None for the others (admin.py's)."""
    if norm == "/_edge/logout":
        if request.method != "POST":
            raise EdgeError("sign out with POST (the page's button)", status=405, code="method_not_allowed")
        return _sign_out(state, request)
    if norm in ("/_edge", "/_edge/"):
        session = request.get(SESSION)
        csrf = state.browser_sessions.csrf_token(session) if session is not None else ""
        return _html(_template("inspector.html", csrf=csrf, user=session.name if session is not None else ""))
    if norm == "/_edge/api/overview":
        return web.json_response(overview(state, time.monotonic(), time.time()))
    if norm == "/_edge/api/requests":
        return requests_json(state, request)
    if norm == "/_edge/events":
        return await events(state, request)
    return None


def overview(state: EdgeState, now: float, wall: float) -> dict[str, object]:
    """Everything the inspector's panels show but the recent requests."""
    reg = state.registry
    workers = [worker_info(w, now, state.config.health_path) for w in reg.workers.values()]
    names = reg.pool_names()
    names += sorted(p for p in state.inspector.pools if p not in names)  # "_unknown", pools whose workers left
    pools = []
    for name in names:
        members = [w for w in workers if w["pool"] == name]
        pool = reg.pools.get(name)
        windows = state.inspector.windows(name, now)

        def total(field: str, members: list[dict[str, object]] = members) -> int:
            return sum(int(str(w[field])) for w in members)

        pools.append({
            "name": name, "known": pool is not None,
            "workers": len(members), "available": sum(1 for w in members if w["available"]),
            "capacity": total("capacity"), "effective_capacity": total("effective_capacity"),
            "in_flight": total("in_flight"), "queue": len(pool.waiters) if pool is not None else 0,
            "ejections": total("ejections"), "ejected_now": sum(1 for w in members if w["health"] == "ejected"),
            "minute": windows[0].as_json() if windows else None,
            "hour": windows[1].as_json() if windows else None,
        })
    recent = state.inspector.recent
    return {
        "edge": {"uptime_s": round(wall - state.started, 1), "in_flight": state.in_flight,
                 "draining": state.draining, "tunnels": len(state.sessions),
                 "direct": sum(1 for w in reg.workers.values() if w.kind == "direct"),
                 # The inspector is per process (--processes N): which one answered.
                 "process": state.config.process_index, "processes": state.config.processes},
        "recorder": {"capacity": recent.capacity if recent is not None else 0,
                     "kept": len(recent) if recent is not None else 0},
        "pools": pools,
        "workers": workers,
        "websockets": [s.as_json(now, wall) for s in state.inspector.sockets.values()],
    }


def requests_json(state: EdgeState, request: web.Request) -> web.Response:
    """The recent requests, newest first, filtered by `status` (503, 5xx,
    errors), `pool`, `worker`; `id` for one request; `after` = a seq."""
    recent = state.inspector.recent
    q = request.query
    if recent is None:
        return web.json_response({"requests": [], "last_seq": 0, "recorder": "off (--inspector-requests 0)"})
    if "id" in q:
        rec = recent.find(q["id"])
        if rec is None:
            raise EdgeError(f"request {q['id']!r} is not among the last {recent.capacity} kept", status=404,
                            code="not_found")
        return web.json_response(rec.as_json())
    try:
        after = int(q.get("after", "0"))
        limit = max(1, min(int(q.get("limit", str(DEFAULT_LIMIT))), recent.capacity))
    except ValueError:
        raise EdgeError("after and limit are integers", status=400, code="bad_request") from None
    found = recent.query(q.get("status", ""), q.get("pool", ""), q.get("worker", ""), after, limit)
    return web.json_response({"requests": [r.as_json() for r in found], "last_seq": recent.last_seq})


async def events(state: EdgeState, request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every EVENTS_INTERVAL an `update` with the overview
    and the requests recorded since the last one (oldest first). Ends when the
    edge drains or the browser's session ends (it then signs in again)."""
    try:
        after = int(request.query.get("after", "0"))
    except ValueError:
        raise EdgeError("after is an integer", status=400, code="bad_request") from None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    session = request.get(SESSION)
    while not state.draining:
        if session is not None and state.browser_sessions.verify(request.cookies.get(COOKIE), time.time()) is None:
            await resp.write(b"event: signed-out\ndata: {}\n\n")
            break
        data = overview(state, time.monotonic(), time.time())
        recent = state.inspector.recent
        if recent is not None:
            new = recent.query(after=after, limit=DEFAULT_LIMIT)
            data["requests"] = [r.as_json() for r in reversed(new)]
            after = recent.last_seq
        data["last_seq"] = after
        await resp.write(b"event: update\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
        await asyncio.sleep(EVENTS_INTERVAL)
    return resp
