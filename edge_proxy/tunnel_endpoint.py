"""`/_edge/tunnel`: where worker agents dial in. Checks the worker token (and
the client certificate when required), then hands the WebSocket to an
`EdgeSession` for the tunnel's whole life."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from .auth import presented_key
from .errors import error_response
from .session import EdgeSession
from .state import EdgeState

log = logging.getLogger("edge_proxy")


async def tunnel_endpoint(state: EdgeState, request: web.Request, rid: str) -> web.StreamResponse:
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
