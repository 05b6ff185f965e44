"""Forwarding one tunnel stream to the local upstream over HTTP: streaming
both bodies, mapping upstream failures to answers the edge understands, and
the `upstream` and `agent` Server-Timing entries."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from httpcontract import problem
from httpcontract.timing import entry as timing_entry
from httpcontract.timing import merge as merge_server_timing
from httpcontract.timing import values as timing_values
from relay.headers import end_to_end
from relay.io import StreamChannel, TunnelIO
from tunnel import ErrorCode, RequestHead, ResponseHead, StreamClosedError, StreamError

from .upstream import Response, UpstreamError, UpstreamPool, UpstreamUnreachable

log = logging.getLogger("worker_agent")

REQUEST_DROP = frozenset({"content-length"})
RESPONSE_DROP = frozenset({"content-length", "server-timing"})


def _header(head: RequestHead, name: str) -> str | None:
    for n, v in head.headers:
        if n.lower() == name:
            return v
    return None


def _json_head(status: int, error: str, detail: str, timing: list[str],
               request_id: str | None) -> tuple[ResponseHead, bytes]:
    body = problem.encode(status, error, detail, request_id)
    headers = (("Content-Type", problem.CONTENT_TYPE), ("Content-Length", str(len(body))),
               ("Server-Timing", ", ".join(timing)))
    return ResponseHead(status, headers), body


class Forwarding:
    """One request from a tunnel stream to the upstream and its answer back,
    in named steps; `head_sent` tells how a failure can still be reported."""

    def __init__(self, io: TunnelIO, ch: StreamChannel, head: RequestHead, buffer_limit: int) -> None:
        self.io, self.ch, self.head = io, ch, head
        self.buffer_limit = buffer_limit
        self.t0 = time.monotonic()
        self.t_up = self.t0
        self.head_sent = False

    def request_body(self, end_stream: bool) -> tuple[list[tuple[str, str]], bytes | AsyncIterator[bytes] | None,
                                                      bool]:
        """(headers for the upstream, body, whether the body must be read
        first): small bodies with a Content-Length are read whole, others
        stream with credit given back as the upstream takes them."""
        headers = end_to_end(self.head.headers, REQUEST_DROP)
        length_raw = _header(self.head, "content-length")
        length = int(length_raw) if length_raw and length_raw.isdigit() else None
        if end_stream:
            return headers, None, False
        if length is not None and length <= self.buffer_limit:
            return headers, None, True
        if length is not None:
            headers.append(("Content-Length", str(length)))
        return headers, self.io.chunks(self.ch), False

    def _timing(self, upstream_timing: list[str]) -> str:
        now = time.monotonic()
        return merge_server_timing(upstream_timing, timing_entry("upstream", now - self.t_up),
                                   timing_entry("agent", now - self.t0))

    def send_head(self, status: int, headers: list[tuple[str, str]], end_stream: bool = False) -> None:
        self.io.conn.send_response(self.ch.stream_id, ResponseHead(status, tuple(headers)), end_stream=end_stream)
        self.head_sent = True
        self.io.flush()

    async def answer(self, resp: Response) -> None:
        """The upstream's answer into the stream: read whole when small (so
        `agent` timing is complete), else streamed (timings to the head)."""
        rheaders = resp.headers
        out = end_to_end(rheaders, RESPONSE_DROP)
        if resp.content_length is not None:
            out.append(("Content-Length", str(resp.content_length)))
        no_body = self.head.method == "HEAD" or resp.status in (204, 304)
        if no_body or (resp.content_length is not None and resp.content_length <= self.buffer_limit):
            body = b"" if no_body else await resp.read()
            out.append(("Server-Timing", self._timing(timing_values(rheaders))))
            self.send_head(resp.status, out, end_stream=not body)
            if body:
                await self.io.send_body(self.ch, body, end_stream=True)
            return
        out.append(("Server-Timing", self._timing(timing_values(rheaders))))
        self.send_head(resp.status, out)
        async for chunk in resp.chunks():
            await self.io.send_body(self.ch, chunk)
        await self.io.send_body(self.ch, b"", end_stream=True)

    async def fail(self, exc: BaseException) -> None:
        """The upstream failed or timed out: a 502/504 in the one error shape
        while the head is not sent yet, else a reset of the stream."""
        what = "did not answer in time" if isinstance(exc, TimeoutError) else f"failed: {exc.__class__.__name__} {exc}"
        log.warning("upstream %s %s %s", self.head.method, self.head.target, what)
        sid = self.ch.stream_id
        if self.head_sent or not self.io.conn.is_open(sid):
            self.io.reset(sid, ErrorCode.INTERNAL_ERROR, f"upstream {what}")
            return
        status = 504 if isinstance(exc, TimeoutError) else 502
        rhead, body = _json_head(status, "upstream_timeout" if status == 504 else "upstream_failed",
                                 f"the worker's upstream {what}", [timing_entry("agent", time.monotonic() - self.t0)],
                                 _header(self.head, "x-request-id"))
        try:
            self.io.conn.send_response(sid, rhead)
            self.io.flush()
            await self.io.send_body(self.ch, body, end_stream=True)
            self.io.release(sid)
        except (StreamError, StreamClosedError):
            pass


async def forward(io: TunnelIO, ch: StreamChannel, head: RequestHead, end_stream: bool, upstream: UpstreamPool,
                  buffer_limit: int, timeout: float) -> None:
    """Run one request against the upstream and answer it on the stream.
    `timeout` bounds the whole exchange, from the request to the last byte
    of the answer taken from the upstream."""
    f = Forwarding(io, ch, head, buffer_limit)
    resp: Response | None = None
    try:
        async with asyncio.timeout(timeout):
            headers, data, read_first = f.request_body(end_stream)
            if read_first:
                data = await io.read_all(ch)
            f.t_up = time.monotonic()
            resp = await upstream.request(head.method, head.target, headers, data)
            await f.answer(resp)
        io.release(ch.stream_id)
    except (StreamError, StreamClosedError):
        pass  # the edge cancelled: the finally below closes the upstream connection mid-answer
    except UpstreamUnreachable as exc:
        # Nothing reached the upstream: the edge may retry on another worker.
        io.reset(ch.stream_id, ErrorCode.REFUSED_STREAM, f"upstream unreachable: {exc.os_error}")
    except (TimeoutError, UpstreamError, ValueError) as exc:
        await f.fail(exc)
    except asyncio.CancelledError:
        io.reset(ch.stream_id, ErrorCode.CANCEL, "agent shutting down")
        raise
    finally:
        if resp is not None:
            resp.release()  # back to the pool after a whole answer, else the connection is closed
