"""One attempt of a proxied request on a direct worker: the edge's own HTTP
round trip to it over its keep-alive pool (direct.py), with the same rules
as a tunnel attempt (proxy.py): a connection refused (or not made in time)
never reached the worker and goes elsewhere; a connection lost before the
answer is retried elsewhere for idempotent methods only; no head within
--upstream-timeout is 504 `upstream_timeout`; a broken answer is 502
`worker_failed`. Server-Timing gets `lb`, `upstream` (request sent -> head
back: the VPN leg plus the worker) and `edge`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from httpcontract.timing import entry as timing_entry
from httpcontract.timing import merge as merge_server_timing
from httpcontract.timing import values as timing_values
from relay.headers import end_to_end
from tunnel import RequestHead

from .errors import error_response
from .heads import RESPONSE_DROP, undecodable_header
from .inspector import WORKER
from .outcome import IDEMPOTENT, NO_BODY_STATUSES, Outcome, RetryElsewhere, Waiting
from .overload import is_load_signal
from .upload import BodyStalled, BodyTooLarge, RequestBody

if TYPE_CHECKING:
    from .direct import DirectSession
    from .state import EdgeState

log = logging.getLogger("edge_proxy.proxy")

Result = tuple[web.StreamResponse, "Outcome | None", "float | None"]  # as proxy.Result
Headers = tuple[tuple[str, str], ...]


class _Body:
    """The client's body as aiohttp's client sends it, remembering why it
    stopped (aiohttp reports any failure of a body as a connection error).
    A client that cuts its upload off is counted and logged here, once, as
    for a tunnel (upload.py), whether or not the handler is still waiting."""

    def __init__(self, state: EdgeState, body: RequestBody, request_id: str, session: DirectSession) -> None:
        self.state, self.body, self.request_id, self.session = state, body, request_id, session
        self.failure: BodyStalled | BodyTooLarge | None = None
        self.client_gone = False
        self.finished = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.body.chunks():
                yield chunk
        except (BodyStalled, BodyTooLarge) as exc:
            self.failure = exc
            raise
        except OSError as exc:  # ConnectionResetError and kin: the client is gone
            self._aborted(str(exc) or exc.__class__.__name__)
            raise
        self.finished = True

    def cancelled(self) -> None:
        """The handler was cancelled (its client's connection closed) while
        the body was still due: an abort too, whoever noticed it first."""
        if not self.finished and not self.client_gone and self.failure is None:
            self._aborted("connection closed")

    def _aborted(self, cause: str) -> None:
        self.client_gone = True
        self.state.metrics.upload_aborts.labels(self.session.spec.pool).inc()
        log.info("request %s: the client aborted its upload to worker %s after %d bytes (%s)", self.request_id,
                 self.session.spec.id, self.body.read, cause)


def _headers_of(resp: aiohttp.ClientResponse) -> Headers:
    # As the agent hands them over: text, with bytes that are not UTF-8 kept
    # as surrogate escapes (heads.undecodable_header finds those).
    return tuple((n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in resp.raw_headers)


async def exchange(state: EdgeState, request: web.Request, request_id: str, session: DirectSession,
                   head: RequestHead, has_body: bool, body: RequestBody, lb: float, started: float) -> Result:
    """One attempt on one direct worker; raises RetryElsewhere when the
    worker certainly (or, for idempotent methods, possibly) never saw it."""
    cfg = state.config
    worker_id = session.spec.id
    request[WORKER] = worker_id  # for the inspector; the last attempt's worker wins
    headers = [(n, v) for n, v in head.headers if n.lower() != "transfer-encoding"]  # aiohttp chunks by itself
    upload = _Body(state, body, request_id, session) if has_body else None
    with session.using():
        t_sent = time.monotonic()
        slot = Waiting()
        try:
            async with asyncio.timeout(cfg.upstream_timeout) as deadline:
                with session.waiting(slot, deadline):
                    resp = await session.client.request(
                        head.method, session.url(head.target), headers=headers, allow_redirects=False,
                        data=upload.chunks() if upload is not None else None)
        except asyncio.CancelledError:
            if upload is not None:
                upload.cancelled()
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            why = f"cannot connect: {exc}"
            session.unreachable(why)
            log.info("request %s: direct worker %s did not take it (%s); retrying elsewhere", request_id, worker_id,
                     why)
            raise RetryElsewhere() from None
        except TimeoutError:
            if slot.abandoned:  # the worker went silent while this request waited (e.g. its VPN path died)
                if request.method in IDEMPOTENT and (not has_body or body.replayable):
                    log.info("request %s: direct worker %s went silent before answering (%s); retrying elsewhere",
                             request_id, worker_id, slot.abandoned)
                    raise RetryElsewhere() from None
                return (error_response(502, "worker_failed", f"worker {worker_id} stopped answering before it "
                                       f"answered this request: {slot.abandoned}", request_id), Outcome.FAILED, None)
            return (error_response(504, "upstream_timeout", f"worker {worker_id} sent no response within "
                                   f"{cfg.upstream_timeout:g} s", request_id), Outcome.FAILED, None)
        except aiohttp.ClientError as exc:
            if upload is not None and upload.client_gone:
                raise asyncio.CancelledError() from None  # nobody to answer; says nothing of the worker
            if upload is not None and isinstance(upload.failure, BodyStalled):
                state.metrics.rejections.labels("body_stalled").inc()
                return (error_response(408, "body_timeout", f"the request body stalled for "
                                       f"{cfg.client_body_timeout:g} s", request_id, close=True), None, None)
            if upload is not None and isinstance(upload.failure, BodyTooLarge):
                state.metrics.rejections.labels("body_too_large").inc()
                return (error_response(413, "body_too_large", f"request body exceeds the limit of {cfg.max_body} "
                                       "bytes", request_id, close=True), None, None)
            lost = isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, aiohttp.ClientResponseError)
            if lost and request.method in IDEMPOTENT and (not has_body or body.replayable):
                log.info("request %s: connection to direct worker %s lost before its answer (%s); retrying "
                         "elsewhere", request_id, worker_id, exc)
                raise RetryElsewhere() from None
            log.warning("request %s to direct worker %s failed: %s", request_id, worker_id, exc)
            return (error_response(502, "worker_failed", f"worker {worker_id} failed: {exc}", request_id),
                    Outcome.FAILED, None)
        try:
            result = await _answer(state, request, request_id, session, resp, lb, started, time.monotonic() - t_sent)
        except BaseException:
            resp.close()  # the client went away: the worker sees its request cancelled
            raise
        resp.release()  # back to the pool when the answer was read whole, else closed
        return result


async def _answer(state: EdgeState, request: web.Request, request_id: str, session: DirectSession,
                  resp: aiohttp.ClientResponse, lb: float, started: float, upstream: float) -> Result:
    """The worker's answer to the client: buffered when small (so that `edge`
    is complete and a "busy" answer stays unsent, for a retry elsewhere),
    else streamed."""
    cfg = state.config
    rheaders = _headers_of(resp)
    status = resp.status
    if is_load_signal(status, rheaders):
        # A refusal comes back fast: as a latency sample it would make a busy
        # worker look like the fastest one.
        outcome, sample = Outcome.SHED, None
    else:
        outcome, sample = (Outcome.OK if status < 500 else Outcome.FAILED), upstream
    headers = end_to_end(rheaders, RESPONSE_DROP)
    if (bad := undecodable_header(headers)) is not None:
        log.warning("request %s: dropping response header %r from worker %s: not UTF-8", request_id, bad,
                    session.spec.id)
        headers = [(n, v) for n, v in headers if undecodable_header([(n, v)]) is None]
    extra = [timing_entry("lb", lb), timing_entry("upstream", upstream)]
    expects_body = request.method != "HEAD" and status not in NO_BODY_STATUSES and status >= 200
    length = resp.content_length
    if not expects_body or (length is not None and length <= cfg.buffer_response):
        try:
            data = await _read_all(resp, cfg.idle_timeout) if expects_body else b""
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("request %s: response from worker %s broke off: %s", request_id, session.spec.id,
                        exc or "timeout")
            return (error_response(502, "worker_failed", f"the response from worker {session.spec.id} broke off",
                                   request_id), Outcome.FAILED, None)
        out = web.Response(status=status, body=data, headers=headers)
        extra.append(timing_entry("edge", time.monotonic() - started))
        out.headers["Server-Timing"] = merge_server_timing(timing_values(rheaders), *extra)
        if request.method == "HEAD" and length is not None:
            out.headers["Content-Length"] = str(length)
        return out, outcome, sample
    sresp = web.StreamResponse(status=status, headers=headers)
    extra.append(timing_entry("edge", time.monotonic() - started))
    sresp.headers["Server-Timing"] = merge_server_timing(timing_values(rheaders), *extra)
    if length is not None:
        sresp.content_length = length
    await sresp.prepare(request)
    try:
        while True:
            async with asyncio.timeout(cfg.idle_timeout):
                chunk = await resp.content.readany()
            if not chunk:
                break
            await sresp.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already: cut the connection so that the client
        # sees a truncated response.
        log.warning("request %s: response from worker %s broke off: %s", request_id, session.spec.id,
                    exc or "timeout")
        if request.transport is not None:
            request.transport.abort()
        return sresp, Outcome.FAILED, None
    await sresp.write_eof()
    return sresp, outcome, sample


async def _read_all(resp: aiohttp.ClientResponse, idle: float) -> bytes:
    parts: list[bytes] = []
    while True:
        async with asyncio.timeout(idle):
            chunk = await resp.content.readany()
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
