"""GET /stream (WebSocket, frame by frame) and GET /live on a real inference
server with the real default model, over real loopback connections."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets.asyncio.client
from websockets.exceptions import ConnectionClosed

from tests.harness import wait_for

from .conftest import Server, start_server
from .test_http import CAT_CLASSES, COFFEE_CLASSES

PHASES = ("decode", "preprocess", "queue", "infer", "postprocess", "app")
MAX_FRAME = 256 * 1024  # --max-frame-mb 0.25


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    s = start_server("onnxruntime", tmp_path_factory.mktemp("stream-logs"), model_cache, "--max-batch", "8",
                     "--max-frame-mb", "0.25", "--stream-max-backlog", "16", "--stream-send-timeout", "5")
    try:
        yield s
    finally:
        s.proc.stop()


def ws_url(server: Server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/stream" + query


def tiny_jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


async def answers(ws: aiohttp.ClientWebSocketResponse, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            out.append(json.loads(msg.data))
    return out


async def metric(server: Server, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(server.url + "/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_frames_are_answered_in_order_with_seq_label_and_timing(server: Server,
                                                                     photos: dict[str, bytes]) -> None:
    order = ["chelsea", "coffee"] * 3
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(ws_url(server, "?drop=none"), protocols=("inference.v1",), compress=0) as ws:
        assert ws.protocol == "inference.v1"
        assert "permessage-deflate" not in ws._response.headers.get("Sec-WebSocket-Extensions", "")
        for name in order:
            await ws.send_bytes(photos[name])
        got = await answers(ws, len(order))
    assert [a["seq"] for a in got] == list(range(len(order)))
    for name, a in zip(order, got, strict=True):
        assert a["label"] in (CAT_CLASSES if name == "chelsea" else COFFEE_CLASSES), a
        assert a["model"] == "efficientnet-lite0" and a["backend"] == "onnxruntime"
        assert isinstance(a["class_id"], int) and 0 < a["confidence"] <= 1
        assert len(a["top5"]) == 5 and a["top5"][0]["label"] == a["label"]
        assert set(PHASES) <= set(a["timing"]), a["timing"]
        assert all(a["timing"][p] >= 0 for p in PHASES)
        assert a["timing"]["infer"] > 0 and a["timing"]["app"] >= a["timing"]["infer"]


async def test_drop_latest_skips_stale_frames_and_answers_every_seq_once(server: Server,
                                                                        photos: dict[str, bytes]) -> None:
    n = 40
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(server), compress=0) as ws:
        for _ in range(n):  # a burst: far faster than the model
            await ws.send_bytes(photos["astronaut"])
        got = await answers(ws, n)
    assert [a["seq"] for a in got] == list(range(n))
    dropped = [a["seq"] for a in got if a.get("dropped")]
    labelled = [a["seq"] for a in got if "label" in a]
    assert dropped, "a burst of 40 frames must drop some under drop=latest"
    assert sorted(dropped + labelled) == list(range(n))
    assert labelled[0] == 0 and labelled[-1] == n - 1  # the first runs at once; the newest is never dropped
    assert all(set(a) == {"seq", "dropped"} for a in got if a.get("dropped"))


async def test_drop_none_classifies_every_frame_of_a_burst(server: Server, photos: dict[str, bytes]) -> None:
    n = 20
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(server, "?drop=none"), compress=0) as ws:
        for _ in range(n):
            await ws.send_bytes(photos["coffee"])
        got = await answers(ws, n)
    assert [a["seq"] for a in got] == list(range(n))
    assert all(a["label"] in COFFEE_CLASSES for a in got), got


async def test_bad_frames_get_an_error_and_the_stream_goes_on(server: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(server, "?drop=none"), compress=0) as ws:
        await ws.send_str("hello")
        await ws.send_bytes(b"%PDF-1.4 not an image at all")
        await ws.send_bytes(photos["chelsea"][:2000])  # truncated JPEG
        await ws.send_bytes(b"\xff" * (MAX_FRAME + 1))
        await ws.send_bytes(photos["chelsea"])
        got = await answers(ws, 5)
    assert [a["seq"] for a in got] == [0, 1, 2, 3, 4]
    assert "binary message" in got[0]["error"]
    assert "not an image" in got[1]["error"]
    assert "corrupt or truncated" in got[2]["error"]
    assert f"{MAX_FRAME + 1} bytes exceeds the limit of {MAX_FRAME}" in got[3]["error"]
    assert got[4]["label"] in CAT_CLASSES


async def test_a_message_beyond_every_limit_closes_the_stream_with_1009(server: Server) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(server), compress=0) as ws:
        try:  # the server reads the length in the header and closes before the rest arrives
            await ws.send_bytes(b"\0" * (21 * 1024 * 1024))  # > --max-body-mb 20 and --max-frame-mb
        except ConnectionError:
            pass
        msg = await ws.receive(timeout=30)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
        if msg.type == aiohttp.WSMsgType.CLOSE:
            assert msg.data == 1009, msg

    async def counted() -> bool:
        return await metric(server, 'inference_streams_closed_total{reason="too_big"}') >= 1
    await wait_for(counted, 10, "the closed stream counted as too_big")


async def test_streams_and_photo_share_the_batcher(server: Server, photos: dict[str, bytes]) -> None:
    async def one_stream() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(server, "?drop=none"), compress=0) as ws:
            for _ in range(12):
                await ws.send_bytes(photos["chelsea"])
            return await answers(ws, 12)

    async def photos_posted() -> list[int]:
        async with aiohttp.ClientSession() as s:
            sizes = []
            for _ in range(6):
                async with s.post(server.url + "/photo", data=photos["coffee"]) as r:
                    sizes.append((await r.json())["batch_size"])
            return sizes

    results = await asyncio.gather(*(one_stream() for _ in range(6)), photos_posted())
    streams: list[list[dict[str, Any]]] = results[:-1]  # type: ignore[assignment]
    batch_sizes = [a["batch_size"] for got in streams for a in got]
    assert all(a["label"] in CAT_CLASSES for got in streams for a in got)
    # 6 streams with one frame each in flight: the model runs them together.
    assert max(batch_sizes) >= 2, batch_sizes


async def test_client_that_stops_reading_is_disconnected(server: Server) -> None:
    before = await metric(server, 'inference_streams_closed_total{reason="slow_reader"}')
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    frame = tiny_jpeg()
    sent = 0
    t0 = time.monotonic()
    # max_queue=1: the client library stops reading the socket after one message.
    async with websockets.asyncio.client.connect(ws_url(server), sock=sock, max_queue=1, compression=None) as ws:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(60):
                while True:
                    await ws.send(frame)
                    sent += 1
                    if sent % 50 == 0:
                        await asyncio.sleep(0.01)  # a camera, not a flood
    elapsed = time.monotonic() - t0
    assert sent < 20000, sent

    async def counted() -> bool:
        return await metric(server, 'inference_streams_closed_total{reason="slow_reader"}') >= before + 1
    await wait_for(counted, 10, "the slow reader counted on /metrics")
    assert "disconnected: client not reading" in server.proc.log()
    assert elapsed < 60
    # The server is fine afterwards.
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(server), compress=0) as ws2:
        await ws2.send_bytes(frame)
        assert "label" in (await answers(ws2, 1))[0]


async def test_client_that_stops_reading_and_sending_is_cut_after_the_send_timeout(
        tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> None:
    """With a backlog too large to fill, the send timeout is what ends it."""
    srv = start_server("onnxruntime", tmp_path_factory.mktemp("stall-logs"), model_cache,
                       "--stream-max-backlog", "100000", "--stream-send-timeout", "2")
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
        frame = tiny_jpeg()
        async with websockets.asyncio.client.connect(ws_url(srv, "?drop=none"), sock=sock, max_queue=1,
                                                     compression=None) as ws:
            for _ in range(400):  # ~200 KB of answers: more than every buffer on the way holds
                await ws.send(frame)
            t0 = time.monotonic()
            async with asyncio.timeout(60):
                await ws.wait_closed()  # never reading: only the server can end this
        assert time.monotonic() - t0 < 60
        assert "disconnected: client took no answer for 2 s" in srv.proc.log()
    finally:
        srv.proc.stop()


async def test_sigterm_closes_open_streams_with_1001(tmp_path_factory: pytest.TempPathFactory,
                                                     model_cache: Path, photos: dict[str, bytes]) -> None:
    srv = start_server("onnxruntime", tmp_path_factory.mktemp("term-logs"), model_cache)
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(srv), compress=0) as ws:
            await ws.send_bytes(photos["chelsea"])
            assert "label" in (await answers(ws, 1))[0]
            srv.proc.signal(signal.SIGTERM)
            msg = await ws.receive(timeout=15)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001, msg
        assert srv.proc.p.wait(timeout=15) == 0
        assert "(shutdown): 1 messages, 1 answered" in srv.proc.log()
    finally:
        srv.proc.stop()


async def test_model_and_drop_are_checked_before_the_upgrade(server: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(server, "?model=efficientnet-lite0"), compress=0) as ws:
            await ws.send_bytes(photos["chelsea"])
            assert (await answers(ws, 1))[0]["model"] == "efficientnet-lite0"
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(ws_url(server, "?model=resnet-9000"))
        assert exc.value.status == 404
        async with s.get(server.url + "/stream?model=resnet-9000") as r:
            assert r.status == 404 and "'efficientnet-lite0'" in (await r.json())["detail"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(ws_url(server, "?drop=sometimes"))
        assert exc.value.status == 400
        async with s.get(server.url + "/stream") as r:  # not a WebSocket upgrade
            assert r.status == 426 and "WebSocket" in (await r.json())["detail"]


async def test_stream_metrics(server: Server, photos: dict[str, bytes]) -> None:
    answered = await metric(server, 'inference_stream_frames_total{outcome="answered"}')
    errors = await metric(server, 'inference_stream_frames_total{outcome="error"}')
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(server, "?drop=none"), compress=0) as ws:
        await ws.send_bytes(photos["chelsea"])
        await ws.send_str("not a frame")
        await answers(ws, 2)
        assert await metric(server, "inference_streams_open") >= 1

    async def settled() -> bool:
        return (await metric(server, "inference_streams_open") == 0
                and await metric(server, 'inference_stream_frames_total{outcome="answered"}') >= answered + 1
                and await metric(server, 'inference_stream_frames_total{outcome="error"}') >= errors + 1)
    await wait_for(settled, 10, "stream metrics to count the frames and the closed stream")


async def test_live_page_is_served_self_contained(server: Server) -> None:
    async with aiohttp.ClientSession() as s, s.get(server.url + "/live") as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
    assert "getUserMedia" in html and "inference.v1" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page must not load anything external"
