"""The agent's own WebSocket client connection (worker_agent/wsconn.py)
against a real `websockets` server over TLS on loopback: the byte stream of
binary messages of every length encoding (cut anywhere by the reads, and
fragmented ones), pings answered, text refused, an oversized message
closed with 1009, sending with echo, close codes both ways, and a refused
handshake reported as websockets' InvalidStatus."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

from tests.harness import make_pki, wait_for
from worker_agent import wsconn

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 200_000, 3]
MAX = 1 << 20


def payloads() -> list[bytes]:
    return [os.urandom(n) for n in SIZES]


class Server:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.close_codes: list[int | None] = []
        self.pong = asyncio.Event()
        self.go = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else ""
        try:
            if path == "/stream":
                for p in payloads():
                    self.sent.append(p)
                    await ws.send(p)
                    if len(p) == 65536:
                        waiter = await ws.ping(b"hi")
                        await asyncio.wait_for(waiter, 5)
                        self.pong.set()
                frags = [os.urandom(1000), os.urandom(70_000), b"end"]
                self.sent.extend(frags)
                await ws.send(frags)  # one fragmented message
                await ws.close(1000, "done")
            elif path == "/text":
                await ws.send("hello")
                await ws.wait_closed()
            elif path == "/big":
                await ws.send(b"x" * (MAX + 1))
                await ws.wait_closed()
            elif path == "/slow":  # reads nothing until told, then everything
                await self.go.wait()
                async for msg in ws:
                    self.received.append(msg)  # type: ignore[arg-type]
            elif path == "/echo":
                async for msg in ws:
                    assert isinstance(msg, bytes)
                    self.received.append(msg)
                    await ws.send(msg)
        finally:
            self.close_codes.append(ws.close_code)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Server, str, ssl.SSLContext]]:
    pki = make_pki(tmp_path / "pki")
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(pki.cert, pki.key)
    s = Server()

    def refuse(conn: ServerConnection, request: object) -> object:
        if getattr(request, "path", "") == "/refused":
            return conn.respond(401, "bad token\n")
        return None

    async with serve(s.handler, "127.0.0.1", 0, ssl=sctx, process_request=refuse, max_size=None,
                     compression=None, max_queue=1) as srv:
        port = srv.sockets[0].getsockname()[1]
        try:
            yield s, f"wss://localhost:{port}", pki.client_ssl()
        finally:
            s.go.set()  # a handler still waiting must not hold the server's close


async def open_ws(url: str, ctx: ssl.SSLContext) -> wsconn.WSConnection:
    return await wsconn.connect(url, ssl_context=ctx, headers={"Authorization": "Bearer t"}, user_agent="test/1",
                                max_size=MAX, open_timeout=10, close_timeout=1)


async def test_binary_messages_arrive_as_one_byte_stream_pings_answered_close_code_kept(server) -> None:
    s, base, ctx = server
    ws = await open_ws(base + "/stream", ctx)
    got = bytearray()
    ws.start(got.extend)
    await asyncio.wait_for(ws.done, 20)
    assert bytes(got) == b"".join(s.sent)
    assert s.pong.is_set()
    await ws.close()
    exc = ws.closed_exc
    assert exc is not None and exc.rcvd is not None and exc.rcvd.code == 1000 and exc.rcvd.reason == "done"


async def test_sent_messages_are_echoed_whole(server) -> None:
    s, base, ctx = server
    ws = await open_ws(base + "/echo", ctx)
    got = bytearray()
    ws.start(got.extend)
    msgs = [b"a", os.urandom(300_000), b"", os.urandom(70_000)]
    for m in msgs:
        await ws.send(m)
    want = b"".join(msgs)

    async def all_back() -> bool:
        return len(got) >= len(want)

    await wait_for(all_back, 20, "the echo of every message")
    assert bytes(got) == want and s.received == msgs
    await ws.close(1001, "going away")
    await wait_for(_is(lambda: s.close_codes == [1001]), 10, lambda: f"close codes {s.close_codes}")


async def test_a_text_message_ends_reading_with_an_error(server) -> None:
    _, base, ctx = server
    ws = await open_ws(base + "/text", ctx)
    ws.start(lambda data: None)
    with pytest.raises(ConnectionError, match="text message"):
        await asyncio.wait_for(ws.done, 10)
    await ws.close()


async def test_a_message_over_max_size_is_closed_with_1009(server) -> None:
    s, base, ctx = server
    ws = await open_ws(base + "/big", ctx)
    got = bytearray()
    ws.start(got.extend)
    await asyncio.wait_for(ws.done, 10)
    await ws.close()
    assert not got
    await wait_for(_is(lambda: s.close_codes == [1009]), 10, lambda: f"close codes {s.close_codes}")


async def test_a_refused_handshake_raises_invalid_status_with_its_code(server) -> None:
    _, base, ctx = server
    with pytest.raises(InvalidStatus) as info:
        await open_ws(base + "/refused", ctx)
    assert info.value.response.status_code == 401


async def test_an_untrusted_certificate_fails_the_connect(server) -> None:
    _, base, _ = server
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_ws(base + "/echo", ssl.create_default_context())


def _is(cond: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return cond()

    return check


async def test_a_full_transport_makes_writers_wait_until_it_drains(server) -> None:
    s, base, ctx = server
    ws = await open_ws(base + "/slow", ctx)
    ws.start(lambda data: None)
    piece = os.urandom(256 * 1024)
    sent = 0
    while True:  # the server reads nothing: the transport, then the kernel's buffers fill up
        more = ws.write_frames([piece])
        sent += 1
        assert sent < 2000, "the transport never stayed full"
        if not more:
            drained = asyncio.ensure_future(ws.drain())
            await asyncio.wait([drained], timeout=0.3)
            if not drained.done():
                break  # full for good: nobody reads
    s.go.set()
    await asyncio.wait_for(drained, 20)
    await wait_for(_is(lambda: len(s.received) == sent), 20, lambda: f"{len(s.received)} of {sent} messages")
    assert all(m == piece for m in s.received)
    await ws.close()


async def test_a_silent_server_times_the_open_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers the handshake

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError):
            await wsconn.connect(f"ws://127.0.0.1:{port}/", ssl_context=None, headers={}, user_agent=None,
                                 max_size=MAX, open_timeout=0.3, close_timeout=1)
    finally:
        srv.close()
