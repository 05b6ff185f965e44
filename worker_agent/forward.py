"""Forwarding one tunnel stream to the local upstream over HTTP: streaming
both bodies, mapping upstream failures to answers the edge understands, and
the `upstream` and `agent` Server-Timing entries."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp

from httpcontract import problem
from httpcontract.timing import entry as timing_entry
from httpcontract.timing import merge as merge_server_timing
from relay.headers import end_to_end
from relay.io import StreamChannel, TunnelIO
from tunnel import ErrorCode, RequestHead, ResponseHead, StreamClosedError, StreamError

log = logging.getLogger("worker_agent")

REQUEST_DROP = frozenset({"content-length"})
RESPONSE_DROP = frozenset({"content-length", "server-timing"})


def _header(head: RequestHead, name: str) -> str | None:
    for n, v in head.headers:
        if n.lower() == name:
            return v
    return None


async def _read_body(io: TunnelIO, ch: StreamChannel) -> bytes:
    parts = []
    while (chunk := await ch.read()) is not None:
        parts.append(chunk)
        io.acknowledge(ch, len(chunk))
    return b"".join(parts)


async def _stream_body(io: TunnelIO, ch: StreamChannel) -> AsyncIterator[bytes]:
    while (chunk := await ch.read()) is not None:
        yield chunk
        # Credit goes back only once the upstream took the bytes: backpressure.
        io.acknowledge(ch, len(chunk))


def _json_head(status: int, error: str, detail: str, timing: list[str],
               request_id: str | None) -> tuple[ResponseHead, bytes]:
    body = problem.encode(status, error, detail, request_id)
    headers = (("Content-Type", problem.CONTENT_TYPE), ("Content-Length", str(len(body))),
               ("Server-Timing", ", ".join(timing)))
    return ResponseHead(status, headers), body


async def forward(io: TunnelIO, ch: StreamChannel, head: RequestHead, end_stream: bool, http: aiohttp.ClientSession,
                  upstream: str, buffer_limit: int, timeout: float) -> None:
    """Run one request against the upstream and answer it on the stream."""
    t0 = time.monotonic()
    sid = ch.stream_id
    head_sent = False
    try:
        headers = end_to_end(head.headers, REQUEST_DROP)
        length_raw = _header(head, "content-length")
        length = int(length_raw) if length_raw and length_raw.isdigit() else None
        data: bytes | AsyncIterator[bytes] | None
        if end_stream:
            data = None
        elif length is not None and length <= buffer_limit:
            data = await _read_body(io, ch)
        else:
            data = _stream_body(io, ch)
            if length is not None:
                headers.append(("Content-Length", str(length)))
        t_up = time.monotonic()
        async with http.request(head.method, upstream + head.target, headers=headers, data=data,
                                allow_redirects=False, auto_decompress=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            rheaders = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in resp.raw_headers]
            timing = [v for n, v in rheaders if n.lower() == "server-timing"]
            out = end_to_end(rheaders, RESPONSE_DROP)
            rlen = resp.content_length
            no_body = head.method == "HEAD" or resp.status in (204, 304)
            if no_body or (rlen is not None and rlen <= buffer_limit):
                body = b"" if no_body else await resp.read()
                now = time.monotonic()
                if rlen is not None:
                    out.append(("Content-Length", str(rlen)))
                out.append(("Server-Timing", merge_server_timing(
                    timing, timing_entry("upstream", now - t_up), timing_entry("agent", now - t0))))
                io.conn.send_response(sid, ResponseHead(resp.status, tuple(out)), end_stream=not body)
                head_sent = True
                io.flush()
                if body:
                    await io.send_body(ch, body, end_stream=True)
            else:
                # Streamed (SSE, chunked, large): timings cover the time to the head.
                now = time.monotonic()
                if rlen is not None:
                    out.append(("Content-Length", str(rlen)))
                out.append(("Server-Timing", merge_server_timing(
                    timing, timing_entry("upstream", now - t_up), timing_entry("agent", now - t0))))
                io.conn.send_response(sid, ResponseHead(resp.status, tuple(out)))
                head_sent = True
                io.flush()
                async for chunk in resp.content.iter_any():
                    await io.send_body(ch, chunk)
                await io.send_body(ch, b"", end_stream=True)
        io.release(sid)
    except (StreamError, StreamClosedError):
        pass  # the edge cancelled: leaving the `async with` cancelled the upstream request
    except aiohttp.ClientConnectorError as exc:
        # Nothing reached the upstream: the edge may retry on another worker.
        io.reset(sid, ErrorCode.REFUSED_STREAM, f"upstream unreachable: {exc.os_error}")
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        what = "did not answer in time" if isinstance(exc, TimeoutError) else f"failed: {exc.__class__.__name__} {exc}"
        log.warning("upstream %s %s %s", head.method, head.target, what)
        if head_sent or not io.conn.is_open(sid):
            io.reset(sid, ErrorCode.INTERNAL_ERROR, f"upstream {what}")
        else:
            status = 504 if isinstance(exc, TimeoutError) else 502
            rhead, body = _json_head(status, "upstream_timeout" if status == 504 else "upstream_failed",
                                     f"the worker's upstream {what}", [timing_entry("agent", time.monotonic() - t0)],
                                     _header(head, "x-request-id"))
            try:
                io.conn.send_response(sid, rhead)
                io.flush()
                await io.send_body(ch, body, end_stream=True)
                io.release(sid)
            except (StreamError, StreamClosedError):
                pass
    except asyncio.CancelledError:
        io.reset(sid, ErrorCode.CANCEL, "agent shutting down")
        raise
