"""Proxying one client request through a worker tunnel: pool choice, slot
admission, the request head the worker sees, streaming both bodies under
flow control, timeouts, one safe retry (after a refused stream, or after the
upstream said it is busy), and the Server-Timing entries `lb`, `tunnel` and
`edge`."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from httpcontract.timing import entry as timing_entry
from httpcontract.timing import merge as merge_server_timing
from relay.headers import end_to_end
from relay.io import StreamChannel, TunnelIO
from tunnel import ErrorCode, RequestHead, ResponseHead, StreamError

from .errors import error_response
from .inspector import WORKER
from .overload import is_load_signal
from .registry import NoWorkerAvailable
from .session import EdgeSession, HeadTooLarge

if TYPE_CHECKING:
    from .registry import Worker
    from .state import EdgeState

log = logging.getLogger(__name__)

POOL_PREFIX = re.compile(r"^/pools/([A-Za-z0-9][A-Za-z0-9._:-]{0,127})(/.*)?$")
CHUNK = 64 * 1024
# Headers the edge owns: whatever a client sends under these names is dropped
# and, where it applies, set by the edge itself.
EDGE_OWNED = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "x-real-ip",
        "authorization",  # client credentials never travel to workers
        "x-api-key",
        "x-edge-health-check",
        "host",
        "content-length",
        "expect",  # answered by the edge itself (100-continue); the body then streams normally
    }
)
RESPONSE_DROP = frozenset({"content-length", "server-timing", "date", "server"})
NO_BODY_STATUSES = {204, 304}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
    pass


class RetryElsewhere(Exception):
    """The worker never processed the request: safe to try another."""


class Outcome(enum.Enum):
    """What one attempt says about the worker, for outlier detection and the
    adaptive limit; None where it says nothing (the client's fault)."""

    OK = "ok"
    FAILED = "failed"  # 5xx, timeout, broken response: counts towards ejection
    SHED = "shed"  # 503 + Retry-After or 429: busy, not broken (overload.is_load_signal)


def resolve_pool(request: web.Request) -> tuple[str, str]:
    """(pool name, target path for the worker) from `/pools/<name>/...` or `X-Pool`."""
    raw = request.raw_path
    m = POOL_PREFIX.match(raw.split("?", 1)[0])
    if m:
        rest = m.group(2) or "/"
        query = raw[len(raw.split("?", 1)[0]) :]
        return m.group(1), rest + query
    return request.headers.get("X-Pool", "default"), raw


class RequestBody:
    """The client's body, read once, with the first `replay_limit` bytes kept so
    that a request refused by a worker can be replayed to another."""

    def __init__(self, request: web.Request, max_body: int, replay_limit: int, stall_timeout: float) -> None:
        self.request = request
        self.stall_timeout = stall_timeout
        self.max_body = max_body
        self.replay_limit = replay_limit
        self.kept: list[bytes] = []
        self.read = 0
        self.replayable = True
        self.finished = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for c in self.kept:
            yield c
        while not self.finished:
            try:
                # asyncio.timeout, not wait_for: wait_for wraps every read in a new Task.
                async with asyncio.timeout(self.stall_timeout):
                    chunk = await self.request.content.readany()
            except TimeoutError:
                raise BodyStalled() from None
            if not chunk:
                self.finished = True
                return
            self.read += len(chunk)
            if self.read > self.max_body:
                raise BodyTooLarge()
            if self.replayable:
                if self.read <= self.replay_limit:
                    self.kept.append(chunk)
                else:
                    self.replayable = False
                    self.kept.clear()
            yield chunk


def undecodable_header(headers: list[tuple[str, str]]) -> str | None:
    """The name of the first header whose value is not valid UTF-8 (aiohttp
    keeps such bytes as surrogate escapes, which no HTTP client can send on)."""
    for name, value in headers:
        # isascii() is the fast common case; only non-ASCII values are scanned.
        if not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value):
            return name
    return None


def request_head(request: web.Request, target: str, request_id: str) -> RequestHead:
    headers = end_to_end(request.headers.items(), EDGE_OWNED)
    host = request.headers.get("Host", "")
    headers.append(("Host", host))
    headers.append(("X-Forwarded-For", request.remote or ""))
    headers.append(("X-Forwarded-Proto", request.scheme))
    if host:
        headers.append(("X-Forwarded-Host", host))
    headers = [(n, v) for n, v in headers if n.lower() != "x-request-id"]
    headers.append(("X-Request-ID", request_id))
    if request.content_length is not None:
        headers.append(("Content-Length", str(request.content_length)))
    elif request.body_exists:
        headers.append(("Transfer-Encoding", "chunked"))
    return RequestHead(request.method, target, tuple(headers))


async def handle(state: EdgeState, request: web.Request, pool_name: str, target: str, request_id: str,
                 started: float) -> web.StreamResponse:
    cfg = state.config
    reg = state.registry
    if pool_name not in reg.pools:
        known = ", ".join(reg.pool_names()) or "none"
        return error_response(404, "unknown_pool", f"no pool named {pool_name!r}; known pools: {known}", request_id)
    if request.content_length is not None and request.content_length > cfg.max_body:
        state.metrics.rejections.labels("body_too_large").inc()
        return error_response(413, "body_too_large", f"request body of {request.content_length} bytes exceeds the "
                              f"limit of {cfg.max_body}", request_id, close=True)
    bad = undecodable_header(list(request.headers.items()))
    if bad is not None:
        return error_response(400, "bad_header", f"header {bad!r} has bytes that are not UTF-8", request_id)
    head = request_head(request, target, request_id)
    has_body = request.body_exists
    body = RequestBody(request, cfg.max_body, cfg.replay_buffer, cfg.client_body_timeout)
    refused_by: Worker | None = None  # set after the first attempt was refused: one retry, elsewhere
    shed: web.StreamResponse | None = None  # the first worker's "busy" answer, passed on if nobody has room
    while True:
        t_lb = time.monotonic()
        if refused_by is None:
            try:
                lease = await reg.acquire(pool_name, cfg.queue_timeout)
            except NoWorkerAvailable as exc:
                state.metrics.rejections.labels("no_worker").inc()
                return error_response(503, "no_worker", str(exc), request_id,
                                      headers={"Retry-After": str(max(1, round(exc.retry_after)))})
        else:
            # The retry goes to another worker with a free slot now, or nowhere.
            retry_lease = reg.try_acquire(pool_name, exclude=refused_by)
            if shed is not None:
                state.metrics.shed.labels(pool_name, "returned" if retry_lease is None else "retried").inc()
                if retry_lease is None:
                    # Nobody else has room: the upstream's own 503/429 with
                    # its Retry-After is the truth, not a 502.
                    return shed
                state.metrics.retries.labels(pool_name).inc()
            if retry_lease is None:
                return error_response(502, "worker_unavailable", f"worker {refused_by.agent_id} refused the request "
                                      "and no other worker could take it", request_id)
            lease = retry_lease
        lb = time.monotonic() - t_lb
        state.metrics.queue_wait.labels(pool_name).observe(lb)
        session = lease.worker.live_session()
        outcome: Outcome | None = None
        latency: float | None = None
        try:
            if not isinstance(session, EdgeSession):  # None: its last tunnel just closed
                raise RetryElsewhere()
            resp, outcome, latency = await _exchange(state, request, request_id, session, head, has_body, body, lb,
                                                     started)
            if outcome is Outcome.SHED:
                # The upstream declared the request unprocessed: try once on
                # another worker with room now, if the body can be sent again.
                if refused_by is None and not resp.prepared and (not has_body or body.replayable):
                    refused_by, shed = lease.worker, resp
                    continue
                state.metrics.shed.labels(pool_name, "returned").inc()
            return resp
        except RetryElsewhere:
            if refused_by is None and (not has_body or body.replayable):
                refused_by = lease.worker
                state.metrics.retries.labels(pool_name).inc()
                continue
            if shed is not None:
                return shed  # the retry after a "busy" answer was refused: pass the busy answer on
            return error_response(502, "worker_unavailable", "the worker refused the request and it could "
                                  "not be retried", request_id)
        finally:
            busy = outcome is Outcome.SHED
            lease.release(None if outcome is None or busy else outcome is Outcome.OK, latency, shed=busy)


async def _exchange(state: EdgeState, request: web.Request, request_id: str, session: EdgeSession, head: RequestHead,
                    has_body: bool, body: RequestBody, lb: float,
                    started: float) -> tuple[web.StreamResponse, Outcome | None, float | None]:
    """One attempt on one worker. Returns (response, outcome, latency sample).
    A "busy" answer comes back buffered (unprepared) when it fits
    --buffer-response, so that the caller may still retry elsewhere."""
    cfg = state.config
    worker_id = session.worker.agent_id if session.worker else "?"
    pool = session.worker.pool if session.worker else "-"
    request[WORKER] = worker_id  # for the inspector; the last attempt's worker wins
    try:
        ch = session.open_stream(head, end_stream=not has_body)
    except StreamError:
        raise RetryElsewhere() from None
    except HeadTooLarge as exc:
        return error_response(431, "headers_too_large", str(exc), request_id), None, None
    t_sent = time.monotonic()
    io = session.io
    pump = asyncio.create_task(_pump_body(io, ch, body)) if has_body else None
    if pump is not None:
        # The upload can end (client gone) after this handler was cancelled
        # and stopped looking at it: its end is collected here whatever happens.
        pump.add_done_callback(lambda t: _upload_ended(state, t, request_id, worker_id, pool, body))
    try:
        try:
            rhead = await _await_head(ch, pump, cfg.upstream_timeout)
        except StreamError as exc:
            replayable = not has_body or body.replayable
            # Refused streams never reached the upstream; a lost tunnel may
            # have, so only idempotent requests are retried after one.
            lost = io.closed.is_set() and request.method in IDEMPOTENT
            if replayable and (exc.retryable or lost):
                log.info("request %s: worker %s did not take it (%s); retrying elsewhere", request_id, worker_id, exc)
                raise RetryElsewhere() from None
            log.warning("request %s to worker %s failed: %s", request_id, worker_id, exc)
            return error_response(502, "worker_failed", f"worker {worker_id} failed: {exc}", request_id), Outcome.FAILED, None
        except TimeoutError:
            io.reset(ch.stream_id, ErrorCode.CANCEL, "upstream timeout")
            return error_response(504, "upstream_timeout", f"worker {worker_id} sent no response within "
                                  f"{cfg.upstream_timeout:g} s", request_id), Outcome.FAILED, None
        except BodyStalled:
            io.reset(ch.stream_id, ErrorCode.CANCEL, "request body stalled")
            state.metrics.rejections.labels("body_stalled").inc()
            return error_response(408, "body_timeout", f"the request body stalled for {cfg.client_body_timeout:g} s",
                                  request_id, close=True), None, None
        except BodyTooLarge:
            io.reset(ch.stream_id, ErrorCode.CANCEL, "request body too large")
            state.metrics.rejections.labels("body_too_large").inc()
            return error_response(413, "body_too_large", f"request body exceeds the limit of {cfg.max_body} bytes",
                                  request_id, close=True), None, None
        tunnel = time.monotonic() - t_sent
        if is_load_signal(rhead.status, rhead.headers):
            outcome = Outcome.SHED
        else:
            outcome = Outcome.OK if rhead.status < 500 else Outcome.FAILED
        # A refusal comes back fast: as a latency sample it would make a
        # busy worker look like the fastest one.
        sample = None if outcome is Outcome.SHED else tunnel
        worker_timing = [v for n, v in rhead.headers if n.lower() == "server-timing"]
        headers = end_to_end(rhead.headers, RESPONSE_DROP)
        if (bad := undecodable_header(headers)) is not None:
            log.warning("request %s: dropping response header %r from worker %s: not UTF-8", request_id, bad,
                        worker_id)
            headers = [(n, v) for n, v in headers if undecodable_header([(n, v)]) is None]
        content_length = _content_length(rhead.headers)
        rtt = session.rtt
        extra = [timing_entry("lb", lb), timing_entry("tunnel", tunnel)]
        if rtt is not None:
            extra.append(timing_entry("tunnel_rtt", rtt))
        expects_body = request.method != "HEAD" and rhead.status not in NO_BODY_STATUSES and rhead.status >= 200
        if not expects_body or (content_length is not None and content_length <= cfg.buffer_response):
            try:
                data = await _read_all(io, ch, cfg.idle_timeout, content_length if expects_body else 0)
            except (StreamError, TimeoutError) as exc:
                io.reset(ch.stream_id, ErrorCode.CANCEL, "response broke off")
                log.warning("request %s: response from worker %s broke off: %s", request_id, worker_id,
                            exc or "timeout")
                return error_response(502, "worker_failed", f"the response from worker {worker_id} broke off",
                                      request_id), Outcome.FAILED, None
            io.release(ch.stream_id)
            if outcome is Outcome.SHED and pump is not None and not pump.done():
                await _settle_pump(io, ch, pump, body)
            extra.append(timing_entry("edge", time.monotonic() - started))
            resp = web.Response(status=rhead.status, body=data, headers=_multidict(headers))
            resp.headers["Server-Timing"] = merge_server_timing(worker_timing, *extra)
            if request.method == "HEAD" and content_length is not None:
                resp.headers["Content-Length"] = str(content_length)
            return resp, outcome, sample
        # Streamed: SSE, chunked or large bodies are flushed as they arrive.
        extra.append(timing_entry("edge", time.monotonic() - started))
        sresp = web.StreamResponse(status=rhead.status, headers=_multidict(headers))
        sresp.headers["Server-Timing"] = merge_server_timing(worker_timing, *extra)
        if content_length is not None:
            sresp.content_length = content_length
        await sresp.prepare(request)
        try:
            while True:
                async with asyncio.timeout(cfg.idle_timeout):
                    chunk = await ch.read()
                if chunk is None:
                    break
                await sresp.write(chunk)
                io.acknowledge(ch, len(chunk))
        except (StreamError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is to
            # cut the connection so the client sees a truncated response.
            log.warning("request %s: response from worker %s broke off: %s", request_id, worker_id, exc or "timeout")
            io.reset(ch.stream_id, ErrorCode.CANCEL, "response broke off")
            if request.transport is not None:
                request.transport.abort()
            return sresp, Outcome.FAILED, None
        io.release(ch.stream_id)
        await sresp.write_eof()
        return sresp, outcome, sample
    except asyncio.CancelledError:
        # The client went away: cancel the stream so the worker cancels the upstream request.
        io.reset(ch.stream_id, ErrorCode.CANCEL, "client disconnected")
        if pump is not None and not pump.done():
            # Gone mid-upload while the pump waited on the tunnel, not on the
            # client (else the pump's own end reports it, see _upload_ended).
            _upload_aborted(state, request_id, worker_id, pool, body, "connection closed")
        raise
    finally:
        if pump is not None and not pump.done():
            # The worker answered before the whole body was sent (an early
            # error), or we gave up: stop uploading and close the stream.
            pump.cancel()
            if ch.stream_id in io.channels or io.conn.is_open(ch.stream_id):
                io.reset(ch.stream_id, ErrorCode.CANCEL, "request abandoned")


def _upload_ended(state: EdgeState, pump: asyncio.Task[None], request_id: str, worker_id: str, pool: str,
                  body: RequestBody) -> None:
    """Collect the end of a body upload. A client that cuts its upload off is
    an ordinary event (counted, logged at info), not an asyncio error."""
    if pump.cancelled():
        return
    exc = pump.exception()  # retrieved, so asyncio never reports it as lost
    if exc is None or isinstance(exc, BodyTooLarge | BodyStalled | StreamError):
        return  # a finished upload, or one answered by the handler (413/408/502)
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):  # ConnectionResetError and kin
        _upload_aborted(state, request_id, worker_id, pool, body, str(exc) or exc.__class__.__name__)
        return
    log.warning("request %s: upload to worker %s failed: %r", request_id, worker_id, exc)


def _upload_aborted(state: EdgeState, request_id: str, worker_id: str, pool: str, body: RequestBody,
                    cause: str) -> None:
    state.metrics.upload_aborts.labels(pool).inc()
    log.info("request %s: the client aborted its upload to worker %s after %d bytes (%s)", request_id, worker_id,
             body.read, cause)


async def _settle_pump(io: TunnelIO, ch: StreamChannel, pump: asyncio.Task[None], body: RequestBody) -> None:
    """The upstream answered "busy" before it had the whole body: stop the
    upload, close the stream, and wait for the upload task to end, so that a
    replay elsewhere starts from a complete buffer and nothing is left
    running. A body that failed to read is not replayed."""
    pump.cancel()
    if ch.stream_id in io.channels or io.conn.is_open(ch.stream_id):
        io.reset(ch.stream_id, ErrorCode.CANCEL, "request abandoned: upstream busy")
    await asyncio.wait([pump])
    if not pump.cancelled() and pump.exception() is not None:
        body.replayable = False


async def _pump_body(io: TunnelIO, ch: StreamChannel, body: RequestBody) -> None:
    async for chunk in body.chunks():
        await io.send_body(ch, chunk)
    await io.send_body(ch, b"", end_stream=True)


async def _await_head(ch: StreamChannel, pump: asyncio.Task[None] | None, timeout: float) -> ResponseHead:
    """Wait for the response head while watching the body upload for errors."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    waits: set[asyncio.Future[Any]] = {ch.head}
    if pump is not None:
        waits.add(pump)
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError()
        done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if ch.head in done:
            return ch.head.result()
        if pump is not None and pump in done:
            exc = pump.exception()
            if isinstance(exc, BodyTooLarge | BodyStalled):
                raise exc
            if exc is not None and not isinstance(exc, StreamError):
                # Reading the client's body failed: the client is gone.
                raise asyncio.CancelledError()
            waits.discard(pump)
        if not done:
            raise TimeoutError()


async def _read_all(io: TunnelIO, ch: StreamChannel, idle: float, limit: int | None) -> bytes:
    parts = []
    size = 0
    while True:
        async with asyncio.timeout(idle):
            chunk = await ch.read()
        if chunk is None:
            break
        parts.append(chunk)
        size += len(chunk)
        io.acknowledge(ch, len(chunk))
        if size > (limit or 0):
            raise StreamError("response longer than its Content-Length")
    return b"".join(parts)


def _content_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    for n, v in headers:
        if n.lower() == "content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _multidict(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    return CIMultiDict(headers)
