"""The agent's HTTP/1.1 client to its upstream: a keep-alive connection pool
on asyncio protocols and the `httptools` (llhttp) parser, doing only what
the relay needs and nothing per request that it does not need.

Requests: bodies none, whole (`bytes`) or streamed (an async iterator;
`Content-Length` when the caller gives one, else chunked); `Expect:
100-continue` waits for the interim answer (or a final one) before the
body. Responses: `Content-Length`, chunked, or delimited by the close of
the connection; 1xx interim answers are skipped; HEAD, 204 and 304 have no
body. A connection goes back to the pool only after a complete exchange that
both sides let live (`Connection: close` and HTTP/1.0 without keep-alive
end it, and so does an answer that came before the whole request body).

Failures: `UpstreamUnreachable` when nothing reached the upstream (the
connection could not be made), `UpstreamError` for a broken exchange
(closed early, unparseable answer); timeouts are the caller's
(`asyncio.timeout` around the exchange). A request on a reused connection
that finds it closed before any answer byte is sent again once on a new
connection when its body can be replayed.

WebSockets do not come here: the agent keeps aiohttp's client for them.

Long because the connection's protocol, its parser callbacks and the pool
that decides reuse share one exchange's state: split, the reuse rules
(the thing to get right) would be spread over modules.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

Body = bytes | AsyncIterator[bytes] | None
NO_BODY_STATUSES = (204, 304)
# Methods whose empty request body is announced as such (as aiohttp does).
LENGTH_REQUIRED = frozenset({"POST", "PUT", "PATCH"})
# Pause reading a response body beyond this much unread by the caller.
READ_HIGH_WATER = 1024 * 1024
CONTINUE_WAIT = 1.0  # seconds to wait for "100 Continue" before sending the body anyway
# An answer head must fit in one tunnel frame (64 KiB by default) with room to spare.
MAX_HEAD = 48 * 1024


class UpstreamError(Exception):
    """The exchange with the upstream broke off or made no sense."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made: nothing reached it."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error) or os_error.__class__.__name__)
        self.os_error = os_error


class _StaleConnection(UpstreamError):
    """A reused connection was found closed before any answer byte."""


class Response:
    """One answer: status, headers as (name, value) str pairs (values decoded
    UTF-8 with surrogateescape, as the tunnel carries them), the body via
    `read()` or `chunks()`. `release()` when done (the client does it
    after a complete body)."""

    __slots__ = ("status", "headers", "content_length", "_conn", "_done")

    def __init__(self, conn: _Connection, status: int, headers: list[tuple[str, str]],
                 content_length: int | None) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self._done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            chunk = await conn.read_body()
            if chunk is None:
                self.release()
                return
            yield chunk

    async def read(self) -> bytes:
        conn = self._conn
        parts: list[bytes] = []
        while (chunk := await conn.read_body()) is not None:  # no async generator per answer
            parts.append(chunk)
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Return the connection to the pool if the exchange completed and
        may be followed by another one; close it otherwise. Idempotent."""
        if not self._done:
            self._done = True
            self._conn.finish()


class _Connection(asyncio.Protocol):
    """One TCP connection to the upstream, one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        # One exchange's state, reset by `begin()`.
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[None] | None = None
        self._continue: asyncio.Future[None] | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: Exception | None = None
        self._got_bytes = False
        self._head_only = False
        self._close_delimited = False
        self._keep_alive = False
        self._request_sent = False
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._paused_reading = False

    # ------------------------------------------------------------ transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self._parser is not None and not self._complete:
            if self._close_delimited and self._head is not None and self._head.done():
                self._complete = True  # the body ran until the close, as announced
            elif not self._got_bytes and self.reused:
                self._fail(_StaleConnection("the kept-alive connection was closed by the upstream"))
            else:
                what = "before its answer" if self._head is None or not self._head.done() else "mid-answer"
                self._fail(UpstreamError(f"the upstream closed the connection {what}"))
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamError("the upstream closed the connection"))
            self._drain.exception()

    def eof_received(self) -> bool:
        return False  # close our side too: HTTP/1.1 has no half-closed use here

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            self.close()  # bytes nobody asked for: this connection is out of step
            return
        self._got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self._complete:
                self._fail(UpstreamError(f"unparseable answer from the upstream: {exc}"))
            self.close()
        except UpstreamError as exc:  # raised by a callback below
            self._fail(exc)
            self.close()

    # ------------------------------------------------------ parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD:
            raise UpstreamError(f"the upstream's answer head is over {MAX_HEAD} bytes")
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamError("the upstream switched protocols on a plain request")
            self._headers = []  # interim: the final answer follows
            self._head_bytes = 0
            if self._continue is not None and not self._continue.done():
                self._continue.set_result(None)
            return
        self._status = status
        length = None
        chunked = False
        connection = ""
        for name, value in self._headers:
            low = name.lower()
            if low == "content-length":
                length = int(value) if value.isdigit() else None
            elif low == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif low == "connection":
                connection = value.lower()
        no_body = self._head_only or status in NO_BODY_STATUSES
        if no_body:
            # llhttp cannot know a HEAD answer has no body (and then asks for
            # the close): persistence by the version and Connection alone.
            if self._parser.get_http_version() == "1.0":
                self._keep_alive = "keep-alive" in connection
            else:
                self._keep_alive = "close" not in connection
        else:
            self._keep_alive = self._parser.should_keep_alive()
        self._close_delimited = not no_body and length is None and not chunked
        if self._close_delimited:
            self._keep_alive = False
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._continue is not None and not self._continue.done():
            self._continue.set_result(None)  # a final answer instead of 100: stop waiting
        if self._head_only:
            # llhttp would wait for the announced body a HEAD answer never has.
            self._complete = True
            self._parser = None
            self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._status == 0:
            return  # the end of an interim (1xx) message
        self._complete = True
        self._wake()

    # --------------------------------------------------------------- exchange
    def begin(self, head_only: bool, expect_continue: bool) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._head = loop.create_future()
        self._continue = loop.create_future() if expect_continue else None
        self._status = 0
        self._headers = []
        self._head_bytes = 0
        self._body.clear()
        self._buffered = 0
        self._complete = False
        self._error = None
        self._got_bytes = False
        self._head_only = head_only
        self._close_delimited = False
        self._keep_alive = False
        self._request_sent = False
        return self._head

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved: the caller may be gone
        if self._continue is not None and not self._continue.done():
            self._continue.set_result(None)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def write(self, data: bytes | memoryview) -> None:
        if self.closed or self.transport is None:
            raise self._error or UpstreamError("the upstream closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._paused_writing and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.closed and self._error is not None:
            raise self._error

    async def wait_continue(self, timeout: float) -> None:
        if self._continue is not None and not self._continue.done():
            try:
                async with asyncio.timeout(timeout):
                    await self._continue
            except TimeoutError:
                pass  # RFC 9110 15.2.1: send the body after a reasonable wait

    def response(self) -> Response:
        return Response(self, self._status, self._headers, _content_length(self._headers))

    async def read_body(self) -> bytes | None:
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered -= len(chunk)
                if self._paused_reading and self._buffered <= READ_HIGH_WATER // 2 and self.transport is not None:
                    self._paused_reading = False
                    self.transport.resume_reading()
                return chunk
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamError("the upstream closed the connection mid-answer")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def finish(self) -> None:
        """The caller is done with this exchange: keep the connection if it may carry another."""
        if self._complete and self._keep_alive and self._request_sent and not self.closed and self._error is None:
            self._parser = None
            self._head = self._continue = None
            self.pool._put(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.close()


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value) if value.isdigit() else None
    return None


class UpstreamPool:
    """Keep-alive connections to one upstream (`http://host:port`)."""

    def __init__(self, base_url: str, keepalive: float = 60.0, max_idle: int = 256) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the upstream must be http://HOST[:PORT], not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self.keepalive = keepalive
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self.opened = 0  # connections made, for tests and the curious

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: Body = None) -> Response:
        """Send one request and return its answer's head; the body is read from the Response."""
        conn = self._take_idle()
        try:
            return await self._exchange(conn, method, target, headers, body)
        except _StaleConnection:
            if body is not None and not isinstance(body, bytes):
                raise UpstreamError("the kept-alive connection was closed by the upstream") from None
            return await self._exchange(None, method, target, headers, body)

    async def _exchange(self, conn: _Connection | None, method: str, target: str, headers: list[tuple[str, str]],
                        body: Body) -> Response:
        if conn is None:
            conn = await self._connect()
        expect = False
        lines = [f"{method} {self.prefix}{target} HTTP/1.1\r\n"]
        has_host = has_length = False
        for name, value in headers:
            low = name.lower()
            if low == "host":
                has_host = True
            elif low == "content-length":
                has_length = True
            elif low == "expect":
                expect = value.lower() == "100-continue" and body is not None
            lines.append(f"{name}: {value}\r\n")
        if not has_host:
            lines.append(f"Host: {self.netloc}\r\n")
        chunked = False
        if isinstance(body, bytes):
            if not has_length:
                lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            if not has_length:
                chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
        elif method in LENGTH_REQUIRED and not has_length:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        head_ready = conn.begin(method == "HEAD", expect)
        sender: asyncio.Task[None] | None = None
        try:
            data = "".join(lines).encode("utf-8", "surrogateescape")
            if isinstance(body, bytes) and not expect and len(body) <= 65536:
                conn.write(data + body)
                conn._request_sent = True
            else:
                conn.write(data)
                if body is None:
                    conn._request_sent = True
                elif isinstance(body, bytes) and not expect:
                    conn.write(body)
                    conn._request_sent = True
                else:
                    sender = asyncio.get_running_loop().create_task(self._send_body(conn, body, chunked, expect))
            if sender is None:
                await head_ready
            else:
                await asyncio.wait([head_ready, sender], return_when=asyncio.FIRST_COMPLETED)
                if sender.done() and not head_ready.done():
                    sender.result()  # raise why the body failed
                    await head_ready
                head_ready.result()
                if not sender.done():
                    # An answer before the whole body (an early error): the
                    # rest is not sent and the connection is not reused.
                    sender.cancel()
                    conn._keep_alive = False
        except BaseException:
            if sender is not None and not sender.done():
                sender.cancel()
            conn.close()
            raise
        return conn.response()

    async def _send_body(self, conn: _Connection, body: bytes | AsyncIterator[bytes], chunked: bool,
                         expect: bool) -> None:
        if expect:
            await conn.wait_continue(CONTINUE_WAIT)
            if conn._head is not None and conn._head.done():
                return  # a final answer came instead: the body is not wanted
        if isinstance(body, bytes):
            conn.write(body)
        else:
            async for chunk in body:
                if not chunk:
                    continue
                if chunked:
                    conn.write(b"%x\r\n" % len(chunk))
                    conn.write(chunk)
                    conn.write(b"\r\n")
                else:
                    conn.write(chunk)
                await conn.drain()
            if chunked:
                conn.write(b"0\r\n\r\n")
        conn._request_sent = True

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError as exc:
            raise UpstreamUnreachable(exc) from None
        self.opened += 1
        self._all.add(proto)
        return proto

    def _put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        if len(self._idle) > self.max_idle:
            self._idle.pop(0).close()

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        # Closed idle connections are skipped when taken; no list surgery here.

    @property
    def idle(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
