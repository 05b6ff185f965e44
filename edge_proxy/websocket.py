"""WebSocket passthrough at the edge: a client's upgrade becomes one tunnel
stream whose head carries `Upgrade: websocket`; the worker's agent opens the
WebSocket to its upstream and answers 101 (or the upstream's refusal, which
the client gets as plain HTTP before any upgrade). After the 101 the stream
carries the messages both ways (tunnel/wsmessages.py, relay/websocket.py).

Auth: `Authorization: Bearer KEY` / `X-API-Key`, or, for browsers, a
subprotocol `bearer.KEY` in Sec-WebSocket-Protocol. Every `bearer.*` entry is
stripped before the head goes to the worker: the key never leaves the edge.

The handshake's answer carries the upstream's chosen subprotocol; when the
upstream chose none but the client offered a `bearer.*` entry, the edge
answers with that entry, because browsers fail a handshake that offered
subprotocols and got none back (the key goes back only to the client that
sent it, over the same TLS connection).

An open WebSocket holds one unit of its worker's capacity (the lease) until
it closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from httpcontract.timing import entry as timing_entry
from httpcontract.timing import merge as merge_server_timing
from httpcontract.timing import values as timing_values
from relay.headers import end_to_end
from relay.io import StreamChannel, TunnelIO
from relay.websocket import DOWN, WsRelay
from tunnel import ErrorCode, RequestHead, StreamError
from tunnel.wsmessages import Kind

from . import direct_ws, heads, proxy
from .direct import DirectSession
from .direct_ws import DirectRelay
from .errors import error_response
from .inspector import KEY_NAME, WORKER, LiveSocket
from .overload import is_load_signal
from .session import EdgeSession, HeadTooLarge

if TYPE_CHECKING:
    from .state import EdgeState

log = logging.getLogger(__name__)

KEY_PREFIX = "bearer."
# The agent makes its own handshake with the upstream: the client's handshake
# fields stay here (and no extension is negotiated: no per-message compression).
HANDSHAKE_FIELDS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions"}
)
CLOSE_TIMEOUT = 5.0  # how long either side may take to answer a close
REFUSAL_BODY_LIMIT = 1024 * 1024


def is_upgrade(request: web.Request) -> bool:
    if request.method != "GET":
        return False
    upgrade = request.headers.get("Upgrade")
    if not upgrade:
        return False  # every plain GET: no set built
    tokens = {t.strip().lower() for t in upgrade.split(",")}
    return "websocket" in tokens


def offered_protocols(request: web.Request) -> list[str]:
    out: list[str] = []
    for value in request.headers.getall("Sec-WebSocket-Protocol", []):
        out.extend(p.strip() for p in value.split(",") if p.strip())
    return out


def subprotocol_key(request: web.Request) -> str | None:
    """The client key offered as a `bearer.KEY` subprotocol, if any."""
    for p in offered_protocols(request):
        if p[: len(KEY_PREFIX)].lower() == KEY_PREFIX and len(p) > len(KEY_PREFIX):
            return p[len(KEY_PREFIX) :]
    return None


def _is_key(protocol: str) -> bool:
    return protocol[: len(KEY_PREFIX)].lower() == KEY_PREFIX


def upgrade_head(request: web.Request, target: str, request_id: str, protocols: list[str]) -> RequestHead:
    """The head the worker sees: the HTTP head (no credentials, edge-owned
    forwarding headers) minus the client's handshake, plus the intent."""
    base = heads.request_head(request, target, request_id)
    headers = [(n, v) for n, v in base.headers if n.lower() not in HANDSHAKE_FIELDS]
    headers.append(("Upgrade", "websocket"))
    if protocols:
        headers.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
    return RequestHead("GET", target, tuple(headers))


async def handle(state: EdgeState, request: web.Request, pool_name: str, target: str, request_id: str,
                 started: float) -> web.StreamResponse:
    cfg = state.config
    proxy.check_pool(state, pool_name)
    probe = web.WebSocketResponse()
    if not probe.can_prepare(request).ok:
        return error_response(400, "bad_upgrade", "not a valid WebSocket handshake", request_id)
    proxy.check_headers(request)
    offered = offered_protocols(request)
    app_protocols = [p for p in offered if not _is_key(p)]
    key_protocols = [p for p in offered if _is_key(p)]
    head = upgrade_head(request, target, request_id, app_protocols)
    t_lb = time.monotonic()
    lease = await proxy.acquire(state, pool_name)
    lb = time.monotonic() - t_lb
    state.metrics.queue_wait.labels(pool_name).observe(lb)
    ok: bool | None = None
    shed = False
    try:
        session = lease.worker.live_session()
        worker_id = lease.worker.agent_id
        request[WORKER] = worker_id  # for the inspector
        if isinstance(session, DirectSession):
            async def opened(ws: web.WebSocketResponse, relay: DirectRelay) -> None:
                await _serve_direct(state, request, pool_name, request_id, worker_id, ws, relay)

            resp, ok, shed = await direct_ws.handle(state, request, session, head, app_protocols, key_protocols, lb,
                                                    started, request_id, opened)
            return resp
        if not isinstance(session, EdgeSession):  # None: its last tunnel just closed
            return error_response(502, "worker_unavailable", f"worker {worker_id} is not accepting streams",
                                  request_id)
        try:
            ch = session.open_stream(head, end_stream=False)
        except StreamError:
            return error_response(502, "worker_unavailable", f"worker {worker_id} is not accepting streams",
                                  request_id)
        except HeadTooLarge as exc:
            return error_response(431, "headers_too_large", str(exc), request_id)
        io = session.io
        t_sent = time.monotonic()
        try:
            async with asyncio.timeout(cfg.upstream_timeout):
                rhead = await asyncio.shield(ch.head)
        except StreamError as exc:
            ok = False
            log.warning("websocket %s to worker %s failed: %s", request_id, worker_id, exc)
            return error_response(502, "worker_failed", f"worker {worker_id} failed: {exc}", request_id)
        except TimeoutError:
            ok = False
            io.reset(ch.stream_id, ErrorCode.CANCEL, "upstream timeout")
            return error_response(504, "upstream_timeout", f"worker {worker_id} did not answer the upgrade within "
                                  f"{cfg.upstream_timeout:g} s", request_id)
        except asyncio.CancelledError:
            io.reset(ch.stream_id, ErrorCode.CANCEL, "client disconnected")
            raise
        tunnel = time.monotonic() - t_sent
        worker_timing = timing_values(rhead.headers)
        extra = [timing_entry("lb", lb), timing_entry("tunnel", tunnel)]
        if session.rtt is not None:
            extra.append(timing_entry("tunnel_rtt", session.rtt))
        if rhead.status != 101:
            # The upstream refused the upgrade: plain HTTP, as it answered.
            # A 503 + Retry-After or 429 is load, not failure (as for HTTP).
            shed = is_load_signal(rhead.status, rhead.headers)
            ok = None if shed else rhead.status < 500
            return await _refusal(io, ch, rhead.status, rhead.headers, worker_timing, extra, started, request_id)
        chosen = next((v.strip() for n, v in rhead.headers if n.lower() == "sec-websocket-protocol"), "")
        if chosen and chosen not in app_protocols:
            io.reset(ch.stream_id, ErrorCode.CANCEL, "subprotocol not offered")
            ok = False
            return error_response(502, "bad_subprotocol", f"the upstream chose subprotocol {chosen!r}, which the "
                                  "client did not offer", request_id)
        answer = chosen or (key_protocols[0] if key_protocols else "")
        ws = web.WebSocketResponse(protocols=(answer,) if answer else (), max_msg_size=cfg.ws_max_message,
                                   compress=False, autoping=False, autoclose=False, heartbeat=None,
                                   timeout=CLOSE_TIMEOUT)
        extra.append(timing_entry("edge", time.monotonic() - started))
        ws.headers["Server-Timing"] = merge_server_timing(worker_timing, *extra)
        ws.headers["X-Request-ID"] = request_id
        try:
            await ws.prepare(request)
        except BaseException:
            io.reset(ch.stream_id, ErrorCode.CANCEL, "client handshake failed")
            raise
        ok = True
        live = state.inspector.socket_opened(time.monotonic(), time.time(), request_id, pool_name, worker_id,
                                             request.raw_path, request.get(KEY_NAME, ""))
        try:
            relay = WsRelay(ws, io, ch, max_message=cfg.ws_max_message, lost_code=1001,
                            lost_reason="client went away", tunnel_lost_reason="worker connection lost",
                            idle_timeout=cfg.ws_idle_timeout, close_timeout=CLOSE_TIMEOUT,
                            on_message=_counter(state, pool_name, live))
            transport = request.transport
            if transport is not None:
                relay.abort_socket = transport.abort
            await _relay(state, pool_name, request_id, worker_id, ws, relay)
        finally:
            state.inspector.socket_closed(request_id)
        return ws
    finally:
        lease.release(ok, None, shed=shed)


async def _serve_direct(state: EdgeState, request: web.Request, pool: str, request_id: str, worker_id: str,
                        ws: web.WebSocketResponse, relay: DirectRelay) -> None:
    live = state.inspector.socket_opened(time.monotonic(), time.time(), request_id, pool, worker_id,
                                         request.raw_path, request.get(KEY_NAME, ""))
    relay.on_message = _counter(state, pool, live)
    try:
        await _relay(state, pool, request_id, worker_id, ws, relay)
    finally:
        state.inspector.socket_closed(request_id)


async def _relay(state: EdgeState, pool: str, request_id: str, worker_id: str, ws: web.WebSocketResponse,
                 relay: WsRelay | DirectRelay) -> None:
    m = state.metrics
    m.ws_open.labels(pool).inc()
    state.websockets.add(relay)
    shown = ws.ws_protocol or "-"
    log.info("websocket %s open to worker %s (pool %s, subprotocol %s)", request_id, worker_id, pool,
             "bearer.<key>" if _is_key(shown) else shown)  # never a key in the log
    task = asyncio.create_task(relay.run(), name="ws-relay")
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the connection closes, which is how
        # every WebSocket ends: let the relay finish its close (bounded by its
        # close timeout), and report the session as the 101 it was.
        await asyncio.wait([task])
        if not ws.closed:
            raise
    finally:
        code = relay.close_code or 1006
        state.websockets.discard(relay)
        m.ws_open.labels(pool).dec()
        m.ws_closes.labels(pool, str(code)).inc()
        log.info("websocket %s closed: %d %s", request_id, code, relay.close_reason)


def _counter(state: EdgeState, pool: str, live: LiveSocket) -> Callable[[str, Kind, int], None]:
    m = state.metrics
    to_client = (m.ws_messages.labels(pool, "to_client"), m.ws_bytes.labels(pool, "to_client"))
    to_upstream = (m.ws_messages.labels(pool, "to_upstream"), m.ws_bytes.labels(pool, "to_upstream"))

    def count(direction: str, kind: Kind, size: int) -> None:
        if kind is Kind.TEXT or kind is Kind.BINARY:
            msgs, nbytes = to_client if direction == DOWN else to_upstream
            msgs.inc()
            nbytes.inc(size)
            (live.to_client if direction == DOWN else live.to_upstream).add(time.monotonic())

    return count


async def _refusal(io: TunnelIO, ch: StreamChannel, status: int, headers: tuple[tuple[str, str], ...],
                   worker_timing: list[str], extra: list[str], started: float, request_id: str) -> web.Response:
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                chunk = await ch.read()
            if chunk is None:
                break
            io.acknowledge(ch, len(chunk))
            size += len(chunk)
            if size > REFUSAL_BODY_LIMIT:
                raise StreamError("refusal body too long")
            parts.append(chunk)
    except (StreamError, TimeoutError):
        io.reset(ch.stream_id, ErrorCode.CANCEL, "refusal broke off")
        return error_response(502, "worker_failed", "the worker's refusal of the upgrade broke off", request_id)
    io.release(ch.stream_id)
    out = end_to_end(headers, heads.RESPONSE_DROP)
    out = [(n, v) for n, v in out if heads.undecodable_header([(n, v)]) is None]
    resp = web.Response(status=status, body=b"".join(parts), headers=CIMultiDict(out))
    resp.headers["Server-Timing"] = merge_server_timing(worker_timing, *extra,
                                                        timing_entry("edge", time.monotonic() - started))
    return resp


async def close_all(state: EdgeState, code: int, reason: str) -> None:
    """Close every open WebSocket (edge drain after the grace period)."""
    relays = list(state.websockets)
    if relays:
        log.info("closing %d open WebSocket(s) with %d (%s)", len(relays), code, reason)
        await asyncio.gather(*(r.shutdown(code, reason) for r in relays), return_exceptions=True)
