"""The client's request body on its way into the tunnel: read once with the
first bytes kept for a replay (`RequestBody`), sent by a task of its own
under the stream's flow control (`Upload`), whose end is always collected:
a client that cuts its upload off is an ordinary event, counted and logged
at info, never an asyncio error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from relay.io import StreamChannel, TunnelIO
from tunnel import ErrorCode, ResponseHead, StreamError

log = logging.getLogger("edge_proxy.proxy")


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
    pass


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
                    # readchunk, not readany: readany joins whatever is
                    # buffered into a new bytes (a copy of most of a large
                    # body, ~9% of the edge's CPU on 1 MB uploads); the
                    # tunnel takes the parsed pieces as they are.
                    chunk, end_of_http_chunk = await self.request.content.readchunk()
            except TimeoutError:
                raise BodyStalled() from None
            if not chunk:
                if end_of_http_chunk:
                    continue  # a chunk boundary of a chunked body, not its end
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


class Upload:
    """One attempt's body upload into one stream. `on_abort(cause)` is called
    once if the client cut the upload off."""

    def __init__(self, io: TunnelIO, ch: StreamChannel, body: RequestBody, request_id: str, worker_id: str,
                 on_abort: Callable[[str], None]) -> None:
        self.io, self.ch, self.body = io, ch, body
        self.request_id, self.worker_id = request_id, worker_id
        self.on_abort = on_abort
        self.task: asyncio.Task[None] = asyncio.create_task(self._pump())
        # The upload can end (client gone) after the handler was cancelled and
        # stopped looking at it: its end is collected here whatever happens.
        self.task.add_done_callback(self._ended)

    async def _pump(self) -> None:
        async for chunk in self.body.chunks():
            await self.io.send_body(self.ch, chunk)
        await self.io.send_body(self.ch, b"", end_stream=True)

    @property
    def running(self) -> bool:
        return not self.task.done()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved, so asyncio never reports it as lost
        if exc is None or isinstance(exc, BodyTooLarge | BodyStalled | StreamError):
            return  # a finished upload, or one answered by the handler (413/408/502)
        if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):  # ConnectionResetError and kin
            self.on_abort(str(exc) or exc.__class__.__name__)
            return
        log.warning("request %s: upload to worker %s failed: %r", self.request_id, self.worker_id, exc)

    async def settle(self) -> None:
        """The upstream answered "busy" before it had the whole body: stop the
        upload, close the stream, and wait for the task to end, so that a
        replay elsewhere starts from a complete buffer and nothing is left
        running. A body that failed to read is not replayed."""
        self.stop("request abandoned: upstream busy")
        await asyncio.wait([self.task])
        if not self.task.cancelled() and self.task.exception() is not None:
            self.body.replayable = False

    def stop(self, reason: str) -> None:
        """Stop uploading (if still running) and close the stream."""
        if not self.running:
            return
        self.task.cancel()
        if self.ch.stream_id in self.io.channels or self.io.conn.is_open(self.ch.stream_id):
            self.io.reset(self.ch.stream_id, ErrorCode.CANCEL, reason)


async def await_head(ch: StreamChannel, upload: Upload | None, timeout: float) -> ResponseHead:
    """Wait for the response head while watching the body upload for errors:
    BodyTooLarge/BodyStalled pass through, a client gone mid-upload becomes
    CancelledError, TimeoutError after `timeout`."""
    if upload is None:
        # Nothing else to watch (the common GET): no asyncio.wait machinery.
        async with asyncio.timeout(timeout):
            return await ch.head  # a cancelled head future is skipped by whoever would set it
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    waits: set[asyncio.Future[Any]] = {ch.head}
    pump = upload.task if upload is not None else None
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
