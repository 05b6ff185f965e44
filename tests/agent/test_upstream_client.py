"""The agent's HTTP/1.1 client (worker_agent/upstream.py) against real
servers on loopback: an aiohttp server for the ordinary cases, and a raw
asyncio server for the answers aiohttp never gives (close-delimited bodies,
interim 1xx, HTTP/1.0, broken answers, a kept-alive connection closed
under the next request)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from worker_agent.upstream import UpstreamError, UpstreamPool, UpstreamUnreachable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def aio() -> AsyncIterator[tuple[str, dict[str, list[object]]]]:
    """An aiohttp upstream; `seen` records what it received."""
    seen: dict[str, list[object]] = {"peers": [], "headers": [], "bodies": []}

    async def record(request: web.Request) -> None:
        seen["peers"].append(request.transport.get_extra_info("peername") if request.transport else None)
        seen["headers"].append(dict(request.headers))

    async def echo(request: web.Request) -> web.Response:
        await record(request)
        body = await request.read()
        seen["bodies"].append(body)
        return web.Response(body=body, headers={"X-Len": str(len(body))})

    async def chunked(request: web.Request) -> web.StreamResponse:
        await record(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def refuse(request: web.Request) -> web.Response:
        await record(request)  # answers before reading the body
        return web.Response(status=413, text="too big")

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(2)  # far beyond the client's timeout; short enough for the fixture's cleanup
        return web.Response()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/chunked", chunked)
    app.router.add_post("/refuse", refuse)
    app.router.add_get("/hang", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def raw_server(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def body_of(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        await asyncio.sleep(0)
        yield c


async def test_whole_bodies_and_keep_alive_reuse(aio: tuple[str, dict[str, list[object]]]) -> None:
    url, seen = aio
    pool = UpstreamPool(url)
    try:
        for body in (b"first", b"x" * 200_000, b""):
            resp = await pool.request("POST", "/echo", [("X-Test", "1")], body)
            assert resp.status == 200
            assert await resp.read() == body
            assert resp.content_length == len(body)
        assert pool.opened == 1
        assert len(set(seen["peers"])) == 1  # one connection carried all three
        assert seen["headers"][0]["Content-Length"] == "5"  # type: ignore[index]
        assert seen["headers"][0]["Host"] == url.removeprefix("http://")  # type: ignore[index]
    finally:
        pool.close()


async def test_streamed_request_bodies_chunked_or_with_length(aio: tuple[str, dict[str, list[object]]]) -> None:
    url, seen = aio
    pool = UpstreamPool(url)
    try:
        parts = [b"a" * 70_000, b"b" * 10, b"c" * 300_000]
        resp = await pool.request("PUT", "/echo", [], body_of(parts))
        assert await resp.read() == b"".join(parts)
        assert seen["headers"][-1].get("Transfer-Encoding") == "chunked"  # type: ignore[attr-defined]
        n = sum(map(len, parts))
        resp = await pool.request("PUT", "/echo", [("Content-Length", str(n))], body_of(parts))
        assert await resp.read() == b"".join(parts)
        assert seen["headers"][-1].get("Content-Length") == str(n)  # type: ignore[attr-defined]
        assert pool.opened == 1
    finally:
        pool.close()


async def test_chunked_answer_is_read_whole_and_the_connection_reused(
        aio: tuple[str, dict[str, list[object]]]) -> None:
    url, _ = aio
    pool = UpstreamPool(url)
    try:
        for _ in range(2):
            resp = await pool.request("GET", "/chunked", [])
            assert resp.content_length is None
            assert any(n.lower() == "transfer-encoding" for n, _ in resp.headers)
            assert [c async for c in resp.chunks()] and True
        resp = await pool.request("GET", "/chunked", [])
        assert await resp.read() == b"one,two,three"
        assert pool.opened == 1
    finally:
        pool.close()


async def test_head_answer_has_no_body_and_keeps_the_connection(aio: tuple[str, dict[str, list[object]]]) -> None:
    url, _ = aio
    pool = UpstreamPool(url)
    try:
        resp = await pool.request("HEAD", "/echo", [])
        assert resp.status == 200 and await resp.read() == b""
        resp = await pool.request("POST", "/echo", [], b"after head")
        assert await resp.read() == b"after head"
        assert pool.opened == 1
    finally:
        pool.close()


async def test_expect_100_continue_with_aiohttp(aio: tuple[str, dict[str, list[object]]]) -> None:
    url, seen = aio
    pool = UpstreamPool(url)
    try:
        resp = await pool.request("POST", "/echo", [("Expect", "100-continue")], b"z" * 50_000)
        assert resp.status == 200
        assert await resp.read() == b"z" * 50_000
        assert seen["headers"][-1].get("Expect") == "100-continue"  # type: ignore[attr-defined]
    finally:
        pool.close()


async def test_interim_answers_are_skipped_and_a_final_answer_stops_the_body() -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            got.append(head)
            if b"/refuse" in head:
                writer.write(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
                await writer.drain()
                break
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            got.append(await reader.readexactly(4))
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Final: 1\r\n\r\nok")
            await writer.drain()
        writer.close()

    server, url = await raw_server(handler)
    pool = UpstreamPool(url)
    try:
        resp = await pool.request("POST", "/go", [("Expect", "100-continue"), ("Content-Length", "4")], b"body")
        assert (resp.status, await resp.read()) == (201, b"ok")
        assert ("X-Final", "1") in resp.headers and all(n != "Link" for n, _ in resp.headers)
        assert got[1] == b"body"
        resp = await pool.request("POST", "/refuse", [("Expect", "100-continue"), ("Content-Length", "4")],
                                  body_of([b"body"]))
        assert (resp.status, await resp.read()) == (417, b"no")
    finally:
        pool.close()
        server.close()


async def test_close_delimited_answer_and_connection_reuse_rules() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close",  # then closes
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nc1",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nh0",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nk1",  # kept alive
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            try:
                await read_head(reader)
            except asyncio.IncompleteReadError:
                break
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"Content-Length" not in answer or b"close" in answer or b"HTTP/1.0" in answer:
                break
        writer.close()

    server, url = await raw_server(handler)
    pool = UpstreamPool(url)
    try:
        expected = [b"until the close", b"c1", b"h0", b"k1"]
        for i, body in enumerate(expected):
            resp = await pool.request("GET", "/", [])
            assert await resp.read() == body
            assert pool.opened == i + 1  # none of the first three could be reused
        assert pool.idle == 1  # the last one is kept
    finally:
        pool.close()
        server.close()


async def test_unreachable_broken_and_garbage_answers() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if b"/huge-head" in head:
            writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 4000 + b"\r\n")
            for _ in range(20):
                writer.write(b"X-Pad: " + b"p" * 4000 + b"\r\n")
            writer.write(b"Content-Length: 0\r\n\r\n")
        elif b"/short" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        elif b"/garbage" in head:
            writer.write(b"SPDY/9 nonsense\r\n\r\n")
        writer.close()  # /silent: closes without a byte

    server, url = await raw_server(handler)
    port = url.rsplit(":", 1)[1]
    pool = UpstreamPool(url)
    try:
        resp = await pool.request("GET", "/short", [])
        with pytest.raises(UpstreamError):
            await resp.read()
        with pytest.raises(UpstreamError):
            await pool.request("GET", "/garbage", [])
        with pytest.raises(UpstreamError):
            await pool.request("GET", "/silent", [])
        with pytest.raises(UpstreamError):  # would not fit in a tunnel frame
            await pool.request("GET", "/huge-head", [])
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
    dead = UpstreamPool(f"http://127.0.0.1:{port}")  # nothing listens there now
    with pytest.raises(UpstreamUnreachable):
        await dead.request("GET", "/", [])


async def test_a_kept_alive_connection_closed_under_the_next_request() -> None:
    """The upstream closes an idle connection just as it is reused: a request
    that can be sent again goes on a new connection, a streamed one fails."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        try:
            await read_head(reader)  # the next request: closed without an answer
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server, url = await raw_server(handler)
    pool = UpstreamPool(url)
    try:
        assert await (await pool.request("GET", "/", [])).read() == b"ok"
        assert await (await pool.request("POST", "/", [], b"again")).read() == b"ok"
        assert pool.opened == 2  # the stale one, then a new one
        with pytest.raises(UpstreamError):
            await pool.request("POST", "/", [], body_of([b"once"]))
    finally:
        pool.close()
        server.close()


async def test_early_answer_and_timeout_close_the_connection(aio: tuple[str, dict[str, list[object]]]) -> None:
    url, _ = aio
    pool = UpstreamPool(url)
    try:
        big = [b"q" * 65536] * 64
        resp = await pool.request("POST", "/refuse", [("Content-Length", str(65536 * 64))], body_of(big))
        assert resp.status == 413
        await resp.read()
        assert pool.idle == 0  # the rest of the body was never sent: not reusable
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await pool.request("GET", "/hang", [])
        assert pool.idle == 0
        assert await (await pool.request("POST", "/echo", [], b"fine")).read() == b"fine"
    finally:
        pool.close()


def test_only_plain_http_upstreams() -> None:
    with pytest.raises(ValueError):
        UpstreamPool("https://127.0.0.1:8443")
