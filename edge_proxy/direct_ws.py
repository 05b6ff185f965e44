"""WebSocket passthrough to a direct worker: the edge opens its own
WebSocket to the worker (aiohttp's client, over the worker's pool) and pumps
messages both ways, close codes end to end, under the same idle and drain
rules as through a tunnel (websocket.py does the accounting for both).

An upgrade the worker refuses reaches the client as a problem answer with
the worker's status (and its Retry-After): aiohttp's client keeps no body of
a refused handshake. A 503 + Retry-After or 429 is load, not failure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web

from httpcontract.timing import entry as timing_entry
from relay.websocket import DOWN, UP
from tunnel import RequestHead
from tunnel.wsmessages import Kind, sendable

from .errors import error_response
from .overload import is_load_signal

if TYPE_CHECKING:
    from .direct import DirectSession
    from .state import EdgeState

log = logging.getLogger("edge_proxy.websocket")

# Set by aiohttp's client itself (with the worker's own key and version).
CLIENT_OWNED = frozenset({"upgrade", "connection", "sec-websocket-protocol", "content-length", "transfer-encoding"})
Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def _ignore(direction: str, kind: Kind, size: int) -> None:
    pass


class DirectRelay:
    """The client's WebSocket <-> the worker's, both open. `run()` until both
    are closed; `shutdown()` closes both (drain, idle timeout)."""

    def __init__(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, *,
                 idle_timeout: float, close_timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.on_message: Callable[[str, Kind, int], None] = _ignore
        self.close_code: int | None = None  # the first close code seen, from either side
        self.close_reason = ""
        self.last_activity = time.monotonic()
        self.abort_client: Callable[[], None] | None = None  # drops a client that will not take its close

    def _note_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    async def run(self) -> int:
        pumps = [asyncio.create_task(self._pump(self.client, self.upstream, UP, 1001, "client went away")),
                 asyncio.create_task(self._pump(self.upstream, self.client, DOWN, 1011, "worker connection lost"))]
        tasks = list(pumps)
        if self.idle_timeout > 0:
            tasks.append(asyncio.create_task(self._idle()))
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            rest = [t for t in pumps if not t.done()]
            if rest:  # one side closed: the other has a bounded time to answer
                await asyncio.wait(rest, timeout=self.close_timeout)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self.client.closed or not self.upstream.closed:
                self._note_close(1011, "relay ended")
                await self.shutdown(self.close_code or 1011, self.close_reason)
        return self.close_code or 1006

    async def shutdown(self, code: int, reason: str) -> None:
        self._note_close(code, reason)
        await asyncio.gather(_close(self.upstream, code, reason, self.close_timeout),
                             _close(self.client, code, reason, self.close_timeout, self.abort_client))

    async def _pump(self, src: Socket, dst: Socket, direction: str, lost_code: int, lost_reason: str) -> None:
        while True:
            msg = await src.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self.last_activity = time.monotonic()
                kind = Kind.TEXT if msg.type is WSMsgType.TEXT else Kind.BINARY
                try:
                    if kind is Kind.TEXT:
                        await dst.send_str(msg.data)
                    else:
                        await dst.send_bytes(msg.data)
                except ConnectionError:
                    return  # the other side is gone; its own pump says how
                self.on_message(direction, kind, len(msg.data))
            elif msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                # Relayed, not answered here: the far end answers, as through a tunnel.
                try:
                    await (dst.ping(msg.data) if msg.type is WSMsgType.PING else dst.pong(msg.data))
                except ConnectionError:
                    return
            elif msg.type is WSMsgType.CLOSE:
                # Relay the close with its code, wait for the other side's
                # answer, and pass that back as this side's close answer.
                code, reason = int(msg.data), str(msg.extra or "")
                self._note_close(code, reason)
                await _close(dst, code, reason, self.close_timeout)
                await _close(src, dst.close_code or code, reason, self.close_timeout)
                return
            elif msg.type is WSMsgType.CLOSING:
                return  # the other pump (or a shutdown) is closing this socket
            else:  # CLOSED, ERROR: gone without a close (or a message over the limit: 1009)
                code = getattr(msg.data, "code", None) or lost_code  # a WebSocketError's code (1009: too big)
                self._note_close(code, lost_reason)
                await _close(dst, code, lost_reason, self.close_timeout)
                return

    async def _idle(self) -> None:
        while True:
            remaining = self.last_activity + self.idle_timeout - time.monotonic()
            if remaining <= 0:
                await self.shutdown(1001, "idle timeout")
                return
            await asyncio.sleep(remaining)


async def _close(ws: Socket, code: int, reason: str, timeout: float, abort: Callable[[], None] | None = None) -> None:
    if ws.closed:
        return
    if not sendable(code):
        code = 1000 if code == 1005 else 1011
    try:
        # Bounded: a socket that stopped reading cannot take even a close.
        async with asyncio.timeout(timeout + 1):
            await ws.close(code=code, message=reason.encode("utf-8")[:123])
    except (ConnectionError, RuntimeError):
        pass
    except TimeoutError:
        if abort is not None:
            abort()


Opened = Callable[[web.WebSocketResponse, DirectRelay], Awaitable[None]]


async def handle(state: EdgeState, request: web.Request, session: DirectSession, head: RequestHead,
                 app_protocols: list[str], key_protocols: list[str], lb: float, started: float, request_id: str,
                 opened: Opened) -> tuple[web.StreamResponse, bool | None, bool]:
    """(the answer, ok for outlier detection, shed); `opened` runs the relay
    once both WebSockets are open (websocket.py: metrics, inspector)."""
    cfg = state.config
    worker_id = session.spec.id
    headers = [(n, v) for n, v in head.headers if n.lower() not in CLIENT_OWNED]
    close_timeout = 5.0
    with session.using():
        t_sent = time.monotonic()
        try:
            async with asyncio.timeout(cfg.upstream_timeout):
                up = await session.client.ws_connect(
                    session.url(head.target), headers=headers, protocols=app_protocols, autoclose=False,
                    autoping=False, max_msg_size=cfg.ws_max_message, compress=0, heartbeat=None,
                    timeout=aiohttp.ClientWSTimeout(ws_close=close_timeout))
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status if 400 <= exc.status < 600 else 502
            got = tuple((k, v) for k, v in (exc.headers or {}).items())
            shed = is_load_signal(status, got)
            retry_after = next((v for k, v in got if k.lower() == "retry-after"), None)
            extra = {"Retry-After": retry_after} if retry_after is not None else None
            log.info("websocket %s: direct worker %s refused the upgrade with %d", request_id, worker_id, exc.status)
            return (error_response(status, "upgrade_refused", f"worker {worker_id} refused the WebSocket upgrade "
                                   f"with status {exc.status}", request_id, headers=extra),
                    None if shed else status < 500, shed)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            session.unreachable(f"cannot connect: {exc}")
            return error_response(502, "worker_unavailable", f"worker {worker_id} cannot be reached",
                                  request_id), None, False
        except TimeoutError:
            return (error_response(504, "upstream_timeout", f"worker {worker_id} did not answer the upgrade within "
                                   f"{cfg.upstream_timeout:g} s", request_id), False, False)
        except aiohttp.ClientError as exc:
            log.warning("websocket %s to direct worker %s failed: %s", request_id, worker_id, exc)
            return error_response(502, "worker_failed", f"worker {worker_id} failed: {exc}", request_id), False, False
        upstream = time.monotonic() - t_sent
        try:
            chosen = up.protocol or ""
            if chosen and chosen not in app_protocols:
                await up.close(code=1002)
                return (error_response(502, "bad_subprotocol", f"the upstream chose subprotocol {chosen!r}, which "
                                       "the client did not offer", request_id), False, False)
            answer = chosen or (key_protocols[0] if key_protocols else "")
            ws = web.WebSocketResponse(protocols=(answer,) if answer else (), max_msg_size=cfg.ws_max_message,
                                       compress=False, autoping=False, autoclose=False, heartbeat=None,
                                       timeout=close_timeout)
            ws.headers["Server-Timing"] = ", ".join([timing_entry("lb", lb), timing_entry("upstream", upstream),
                                                     timing_entry("edge", time.monotonic() - started)])
            ws.headers["X-Request-ID"] = request_id
            await ws.prepare(request)
            relay = DirectRelay(ws, up, idle_timeout=cfg.ws_idle_timeout, close_timeout=close_timeout)
            if request.transport is not None:
                relay.abort_client = request.transport.abort
            await opened(ws, relay)
            return ws, True, False
        finally:
            if not up.closed:
                await _close(up, 1011, "relay ended", close_timeout)
