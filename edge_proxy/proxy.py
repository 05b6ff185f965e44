"""Proxying one client request through a worker tunnel: checks, slot
admission, one attempt in named steps (open, await the head, judge it, the
answer buffered or streamed), one safe retry (after a refused stream, or
after the upstream said it is busy), and the Server-Timing entries `lb`,
`tunnel` and `edge`. What the worker and the client see of the headers is
heads.py; the body's upload is upload.py."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from httpcontract.timing import entry as timing_entry
from httpcontract.timing import merge as merge_server_timing
from httpcontract.timing import values as timing_values
from relay.headers import end_to_end
from relay.io import StreamChannel, TunnelIO
from tunnel import ErrorCode, RequestHead, ResponseHead, StreamError

from . import direct_http
from .direct import DirectSession
from .errors import EdgeError, error_response
from .heads import RESPONSE_DROP, request_head, undecodable_header
from .inspector import WORKER
from .outcome import IDEMPOTENT, NO_BODY_STATUSES, Outcome, RetryElsewhere
from .overload import is_load_signal
from .registry import NoWorkerAvailable
from .session import EdgeSession, HeadTooLarge
from .upload import BodyStalled, BodyTooLarge, RequestBody, Upload, await_head

if TYPE_CHECKING:
    from .registry import Lease, Worker
    from .state import EdgeState

log = logging.getLogger(__name__)


def check_pool(state: EdgeState, pool_name: str) -> None:
    """EdgeError 404 unless the pool exists (named by the client: never trusted)."""
    if pool_name not in state.registry.pools:
        known = ", ".join(state.registry.pool_names()) or "none"
        raise EdgeError(f"no pool named {pool_name!r}; known pools: {known}", status=404, code="unknown_pool")


def check_headers(request: web.Request) -> None:
    if (bad := undecodable_header(request.headers.items())) is not None:
        raise EdgeError(f"header {bad!r} has bytes that are not UTF-8", status=400, code="bad_header")


async def acquire(state: EdgeState, pool_name: str) -> Lease:
    """A slot on a worker of the pool, or EdgeError 503 (with Retry-After)."""
    try:
        return await state.registry.acquire(pool_name, state.config.queue_timeout)
    except NoWorkerAvailable as exc:
        state.metrics.rejections.labels("no_worker").inc()
        raise EdgeError(str(exc), status=503, code="no_worker",
                        headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None


async def handle(state: EdgeState, request: web.Request, pool_name: str, target: str, request_id: str,
                 started: float) -> web.StreamResponse:
    cfg = state.config
    reg = state.registry
    check_pool(state, pool_name)
    if request.content_length is not None and request.content_length > cfg.max_body:
        state.metrics.rejections.labels("body_too_large").inc()
        return error_response(413, "body_too_large", f"request body of {request.content_length} bytes exceeds the "
                              f"limit of {cfg.max_body}", request_id, close=True)
    check_headers(request)
    head = request_head(request, target, request_id)
    has_body = request.body_exists
    body = RequestBody(request, cfg.max_body, cfg.replay_buffer, cfg.client_body_timeout)
    refused_by: Worker | None = None  # set after the first attempt was refused: one retry, elsewhere
    shed: web.StreamResponse | None = None  # the first worker's "busy" answer, passed on if nobody has room
    while True:
        t_lb = time.monotonic()
        if refused_by is None:
            lease = await acquire(state, pool_name)
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
            if isinstance(session, EdgeSession):
                resp, outcome, latency = await _exchange(state, request, request_id, session, head, has_body, body,
                                                         lb, started)
            elif isinstance(session, DirectSession):
                resp, outcome, latency = await direct_http.exchange(state, request, request_id, session, head,
                                                                    has_body, body, lb, started)
            else:  # None: its last tunnel just closed
                raise RetryElsewhere()
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


@dataclass(slots=True)
class Attempt:
    """One attempt of a request on one worker, and what its steps share."""

    state: EdgeState
    request: web.Request
    request_id: str
    session: EdgeSession
    io: TunnelIO
    ch: StreamChannel
    body: RequestBody
    upload: Upload | None
    lb: float
    started: float
    t_sent: float
    worker_id: str
    pool: str
    t_head: float = 0.0  # when the response head arrived


Result = tuple[web.StreamResponse, "Outcome | None", "float | None"]  # response, outcome, latency sample


async def _exchange(state: EdgeState, request: web.Request, request_id: str, session: EdgeSession, head: RequestHead,
                    has_body: bool, body: RequestBody, lb: float, started: float) -> Result:
    """One attempt on one worker: open the stream, await the head, then the
    body buffered or streamed. A "busy" answer comes back buffered
    (unprepared) when it fits --buffer-response, so that the caller may still
    retry elsewhere. Raises RetryElsewhere when the worker never took it."""
    worker_id = session.worker.agent_id if session.worker else "?"
    pool = session.worker.pool if session.worker else "-"
    request[WORKER] = worker_id  # for the inspector; the last attempt's worker wins
    try:
        ch = session.open_stream(head, end_stream=not has_body)
    except StreamError:
        raise RetryElsewhere() from None
    except HeadTooLarge as exc:
        return error_response(431, "headers_too_large", str(exc), request_id), None, None
    io = session.io
    upload = None
    if has_body:
        upload = Upload(io, ch, body, request_id, worker_id,
                        lambda cause: _upload_aborted(state, request_id, worker_id, pool, body, cause))
    att = Attempt(state, request, request_id, session, io, ch, body, upload, lb, started, time.monotonic(),
                  worker_id, pool)
    try:
        rhead = await _await_head(att, has_body)
        if not isinstance(rhead, ResponseHead):
            return rhead
        att.t_head = time.monotonic()
        if _buffered(att, rhead):
            return await _answer_buffered(att, rhead)
        return await _answer_streamed(att, rhead)
    except asyncio.CancelledError:
        # The client went away: cancel the stream so the worker cancels the upstream request.
        io.reset(ch.stream_id, ErrorCode.CANCEL, "client disconnected")
        if upload is not None and upload.running:
            # Gone mid-upload while the pump waited on the tunnel, not on the
            # client (else the upload's own end reports it).
            _upload_aborted(state, request_id, worker_id, pool, body, "connection closed")
        raise
    finally:
        if upload is not None:
            # The worker answered before the whole body was sent (an early
            # error), or we gave up: stop uploading and close the stream.
            upload.stop("request abandoned")


async def _await_head(att: Attempt, has_body: bool) -> ResponseHead | Result:
    """The response head, or the answer that replaces it (timeout, stalled or
    oversized body, failed worker); RetryElsewhere when it is safe to."""
    cfg, io, ch = att.state.config, att.io, att.ch
    try:
        return await await_head(ch, att.upload, cfg.upstream_timeout)
    except StreamError as exc:
        replayable = not has_body or att.body.replayable
        # Refused streams never reached the upstream; a lost tunnel may
        # have, so only idempotent requests are retried after one.
        lost = io.closed.is_set() and att.request.method in IDEMPOTENT
        if replayable and (exc.retryable or lost):
            log.info("request %s: worker %s did not take it (%s); retrying elsewhere", att.request_id,
                     att.worker_id, exc)
            raise RetryElsewhere() from None
        log.warning("request %s to worker %s failed: %s", att.request_id, att.worker_id, exc)
        return (error_response(502, "worker_failed", f"worker {att.worker_id} failed: {exc}", att.request_id),
                Outcome.FAILED, None)
    except TimeoutError:
        io.reset(ch.stream_id, ErrorCode.CANCEL, "upstream timeout")
        return (error_response(504, "upstream_timeout", f"worker {att.worker_id} sent no response within "
                               f"{cfg.upstream_timeout:g} s", att.request_id), Outcome.FAILED, None)
    except BodyStalled:
        io.reset(ch.stream_id, ErrorCode.CANCEL, "request body stalled")
        att.state.metrics.rejections.labels("body_stalled").inc()
        return (error_response(408, "body_timeout", f"the request body stalled for {cfg.client_body_timeout:g} s",
                               att.request_id, close=True), None, None)
    except BodyTooLarge:
        io.reset(ch.stream_id, ErrorCode.CANCEL, "request body too large")
        att.state.metrics.rejections.labels("body_too_large").inc()
        return (error_response(413, "body_too_large", f"request body exceeds the limit of {cfg.max_body} bytes",
                               att.request_id, close=True), None, None)


def _judge(att: Attempt, rhead: ResponseHead) -> tuple[Outcome, float | None]:
    """What the head says about the worker, and the latency sample it gives."""
    tunnel = att.t_head - att.t_sent
    if is_load_signal(rhead.status, rhead.headers):
        # A refusal comes back fast: as a latency sample it would make a
        # busy worker look like the fastest one.
        return Outcome.SHED, None
    return (Outcome.OK if rhead.status < 500 else Outcome.FAILED), tunnel


def _expects_body(att: Attempt, rhead: ResponseHead) -> bool:
    return att.request.method != "HEAD" and rhead.status not in NO_BODY_STATUSES and rhead.status >= 200


def _buffered(att: Attempt, rhead: ResponseHead) -> bool:
    """Small answers with a Content-Length are read whole, so `edge` timing is complete."""
    length = _content_length(rhead.headers)
    return not _expects_body(att, rhead) or (length is not None and length <= att.state.config.buffer_response)


def _head_out(att: Attempt, rhead: ResponseHead) -> tuple[list[tuple[str, str]], list[str]]:
    """The headers the client gets (end-to-end, decodable) and our timing entries."""
    headers = end_to_end(rhead.headers, RESPONSE_DROP)
    if (bad := undecodable_header(headers)) is not None:
        log.warning("request %s: dropping response header %r from worker %s: not UTF-8", att.request_id, bad,
                    att.worker_id)
        headers = [(n, v) for n, v in headers if undecodable_header([(n, v)]) is None]
    extra = [timing_entry("lb", att.lb), timing_entry("tunnel", att.t_head - att.t_sent)]
    if (rtt := att.session.rtt) is not None:
        extra.append(timing_entry("tunnel_rtt", rtt))
    return headers, extra  # aiohttp makes its own CIMultiDict of them: no copy of ours first


def _stamp_timing(att: Attempt, rhead: ResponseHead, resp: web.StreamResponse, extra: list[str]) -> None:
    extra.append(timing_entry("edge", time.monotonic() - att.started))
    resp.headers["Server-Timing"] = merge_server_timing(timing_values(rhead.headers), *extra)


async def _answer_buffered(att: Attempt, rhead: ResponseHead) -> Result:
    outcome, sample = _judge(att, rhead)
    headers, extra = _head_out(att, rhead)
    length = _content_length(rhead.headers)
    io, ch = att.io, att.ch
    try:
        limit = (length or 0) if _expects_body(att, rhead) else 0
        data = await io.read_all(ch, limit=limit, idle=att.state.config.idle_timeout)
    except (StreamError, TimeoutError) as exc:
        io.reset(ch.stream_id, ErrorCode.CANCEL, "response broke off")
        log.warning("request %s: response from worker %s broke off: %s", att.request_id, att.worker_id,
                    exc or "timeout")
        return (error_response(502, "worker_failed", f"the response from worker {att.worker_id} broke off",
                               att.request_id), Outcome.FAILED, None)
    io.release(ch.stream_id)
    if outcome is Outcome.SHED and att.upload is not None and att.upload.running:
        await att.upload.settle()
    resp = web.Response(status=rhead.status, body=data, headers=headers)
    _stamp_timing(att, rhead, resp, extra)
    if att.request.method == "HEAD" and length is not None:
        resp.headers["Content-Length"] = str(length)
    return resp, outcome, sample


async def _answer_streamed(att: Attempt, rhead: ResponseHead) -> Result:
    """SSE, chunked or large bodies, flushed as they arrive."""
    outcome, sample = _judge(att, rhead)
    headers, extra = _head_out(att, rhead)
    io, ch = att.io, att.ch
    sresp = web.StreamResponse(status=rhead.status, headers=headers)
    _stamp_timing(att, rhead, sresp, extra)
    if (length := _content_length(rhead.headers)) is not None:
        sresp.content_length = length
    await sresp.prepare(att.request)
    try:
        async for chunk in io.chunks(ch, idle=att.state.config.idle_timeout):
            await sresp.write(chunk)
    except (StreamError, TimeoutError) as exc:
        # Headers are gone already: the only honest signal left is to
        # cut the connection so the client sees a truncated response.
        log.warning("request %s: response from worker %s broke off: %s", att.request_id, att.worker_id,
                    exc or "timeout")
        io.reset(ch.stream_id, ErrorCode.CANCEL, "response broke off")
        if att.request.transport is not None:
            att.request.transport.abort()
        return sresp, Outcome.FAILED, None
    io.release(ch.stream_id)
    await sresp.write_eof()
    return sresp, outcome, sample


def _upload_aborted(state: EdgeState, request_id: str, worker_id: str, pool: str, body: RequestBody,
                    cause: str) -> None:
    state.metrics.upload_aborts.labels(pool).inc()
    log.info("request %s: the client aborted its upload to worker %s after %d bytes (%s)", request_id, worker_id,
             body.read, cause)


def _content_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    for n, v in headers:
        if n.lower() == "content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None



