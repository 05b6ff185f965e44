"""WebSocket streams at the agent: a request head carrying `Upgrade: websocket`
is opened as a real WebSocket to the upstream at the same path; the stream is
answered 101 (with the upstream's subprotocol and the `upstream`/`agent`
Server-Timing) or with the upstream's refusal status, then relays messages
both ways (relay/websocket.py) until either side closes."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from multidict import CIMultiDict

from httpcontract import problem
from httpcontract.timing import entries as timing_entries
from httpcontract.timing import entry as timing_entry
from relay.headers import end_to_end
from relay.io import StreamChannel, TunnelIO
from relay.websocket import WsRelay
from tunnel import ErrorCode, RequestHead, ResponseHead, StreamClosedError, StreamError

log = logging.getLogger("worker_agent")

# aiohttp makes the handshake; these come from it, never from the edge.
DROP = frozenset({"content-length", "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
                  "sec-websocket-extensions"})
CLOSE_TIMEOUT = 5.0
# Open relays of this process, closed with 1001 when a drain's grace is over.
OPEN: set[WsRelay] = set()


def wants_upgrade(head: RequestHead) -> bool:
    if head.method != "GET":
        return False
    for n, v in head.headers:  # a plain loop: this runs on every request
        if n.lower() == "upgrade" and "websocket" in v.lower():
            return True
    return False


def _protocols(head: RequestHead) -> list[str]:
    out: list[str] = []
    for n, v in head.headers:
        if n.lower() == "sec-websocket-protocol":
            out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


async def _answer_error(io: TunnelIO, ch: StreamChannel, status: int, error: str, detail: str, t0: float,
                        request_id: str | None = None, extra: tuple[tuple[str, str], ...] = ()) -> None:
    body = problem.encode(status, error, detail, request_id)
    head = ResponseHead(status, (("Content-Type", problem.CONTENT_TYPE), ("Content-Length", str(len(body))),
                                 ("Server-Timing", timing_entry("agent", time.monotonic() - t0)), *extra))
    try:
        io.conn.send_response(ch.stream_id, head)
        io.flush()
        await io.send_body(ch, body, end_stream=True)
        io.release(ch.stream_id)
    except (StreamError, StreamClosedError):
        pass


async def serve(io: TunnelIO, ch: StreamChannel, head: RequestHead, http: aiohttp.ClientSession, upstream: str,
                max_message: int, timeout: float) -> None:
    t0 = time.monotonic()
    sid = ch.stream_id
    headers = end_to_end(head.headers, DROP)
    rid = next((v for n, v in head.headers if n.lower() == "x-request-id"), None)
    try:
        async with asyncio.timeout(timeout):
            ws = await http.ws_connect(
                upstream + head.target, protocols=_protocols(head), headers=CIMultiDict(headers), compress=0,
                autoping=False, autoclose=False, max_msg_size=max_message, heartbeat=None,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT))
    except aiohttp.WSServerHandshakeError as exc:
        # The upstream refused (404, 403, ...): the client gets that status as plain HTTP.
        status = exc.status if 200 <= exc.status <= 599 and exc.status != 101 else 502
        log.info("upstream refused the WebSocket upgrade of %s: %s %s", head.target, exc.status, exc.message)
        # Retry-After passes: an upstream's 503 + Retry-After is load, not failure, at the edge.
        retry = exc.headers.get("Retry-After") if exc.headers is not None else None
        await _answer_error(io, ch, status, "upgrade_refused",
                            f"the worker's upstream answered the upgrade with {exc.status}: {exc.message}", t0, rid,
                            (("Retry-After", retry),) if retry else ())
        return
    except aiohttp.ClientConnectorError as exc:
        log.warning("upstream unreachable for WebSocket %s: %s", head.target, exc.os_error)
        await _answer_error(io, ch, 502, "upstream_failed", f"the worker's upstream is unreachable: {exc.os_error}", t0,
                            rid)
        return
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        what = "did not answer in time" if isinstance(exc, TimeoutError) else f"failed: {exc.__class__.__name__} {exc}"
        log.warning("upstream WebSocket %s %s", head.target, what)
        status = 504 if isinstance(exc, TimeoutError) else 502
        await _answer_error(io, ch, status, "upstream_timeout" if status == 504 else "upstream_failed",
                            f"the worker's upstream {what}", t0, rid)
        return
    try:
        now = time.monotonic()
        out = [("Server-Timing", timing_entries([("upstream", now - t0), ("agent", now - t0)]))]
        if ws.protocol:
            out.append(("Sec-WebSocket-Protocol", ws.protocol))
        try:
            io.conn.send_response(sid, ResponseHead(101, tuple(out)))
        except StreamClosedError:
            return  # the edge gave up meanwhile
        io.flush()
        relay = WsRelay(ws, io, ch, max_message=max_message, lost_code=1011, lost_reason="upstream connection lost",
                        tunnel_lost_reason="edge connection lost", close_timeout=CLOSE_TIMEOUT)
        OPEN.add(relay)
        try:
            await relay.run()
        finally:
            OPEN.discard(relay)
    except asyncio.CancelledError:
        if io.conn.is_open(sid):
            io.reset(sid, ErrorCode.CANCEL, "agent shutting down")
        raise
    finally:
        if not ws.closed:
            await ws.close(code=1001, message=b"tunnel stream closed")


async def close_all(idle: asyncio.Event, code: int, reason: str) -> None:
    """Close every open WebSocket with `code` at both ends (the agent's drain
    after its grace period), then give the closes time to complete: `idle`
    is set once the last stream is done."""
    relays = list(OPEN)
    if not relays:
        return
    log.info("closing %d open WebSocket(s) with %d (%s)", len(relays), code, reason)
    await asyncio.gather(*(r.shutdown(code, reason) for r in relays), return_exceptions=True)
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await idle.wait()
    except TimeoutError:
        pass
