"""A WebSocket test server for `loadtest stream`, with known behaviour per
path. Run: python wsserver.py PORT [--tls CERT KEY]. Every WebSocket offers
to speak `inference.v1` and answers its 101 with a Server-Timing header of
the edge's entries (so the client's upgrade hops can be checked).

/delay   ?ms=D: answers binary frame n with {"seq": n} exactly D ms after
         it arrived (each frame on its own timer, so answers overlap);
         &timing=1 adds a "timing" object of the inference phases
/drop    ?every=K&ms=D: like /delay, but every Kth frame (n % K == K-1)
         is answered {"seq": n, "dropped": true} at once
/silent  ?every=K&ms=D: like /delay, but every Kth frame gets no answer
/error   ?every=K: every Kth frame is answered {"seq": n, "error": ...}
/echo    sends each binary frame back as it is (no JSON: matched by order)
/serial  ?ms=C: one worker for the whole process: frames of every
         connection wait in one queue and each costs C ms, so at F fps per
         stream the server keeps up with floor(1000 / (C F)) streams
/close   ?after=N&code=X: closes with code X after N frames
/key     refuses the upgrade with 401 unless Authorization is
         "Bearer test-stream-key"; then like /delay?ms=1
/headers answers every frame {"seq": n, "label": L} where L is the JSON of
         the upgrade request's Authorization, X-Pool, Sec-WebSocket-Protocol
         and Sec-WebSocket-Extensions headers (null when absent)
/healthz "ok" (plain HTTP)
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time

from aiohttp import WSMsgType, web

SERVER_TIMING = "lb;dur=0.2, tunnel;dur=3.5, agent;dur=2.0, tunnel_rtt;dur=0.75, edge;dur=4.1"
KEY = "test-stream-key"
PHASES = {"decode": 1.5, "preprocess": 2.5, "queue": 0.5, "infer": 10.0, "postprocess": 0.25}

_serial: asyncio.Queue[tuple[web.WebSocketResponse, int]] | None = None
_tasks: set[asyncio.Task[None]] = set()  # keeps the serial worker referenced


async def _answer_later(ws: web.WebSocketResponse, answer: dict[str, object], due: float) -> None:
    await asyncio.sleep(max(0.0, due - time.perf_counter()))
    try:
        await ws.send_str(json.dumps(answer))
    except (ConnectionError, RuntimeError):
        pass


async def _serial_worker(ms: float) -> None:
    assert _serial is not None
    while True:
        ws, n = await _serial.get()
        if ws.closed:  # a finished run's backlog costs nothing
            continue
        await asyncio.sleep(ms / 1000)
        try:
            await ws.send_str(json.dumps({"seq": n}))
        except (ConnectionError, RuntimeError):
            pass


async def stream(request: web.Request) -> web.WebSocketResponse:
    global _serial
    kind = request.match_info["kind"]
    q = request.query
    if kind == "key" and request.headers.get("Authorization") != f"Bearer {KEY}":
        raise web.HTTPUnauthorized(text="a valid key is required")
    ws = web.WebSocketResponse(protocols=("inference.v1",), max_msg_size=64 * 1024 * 1024, compress=False)
    ws.headers["Server-Timing"] = SERVER_TIMING
    await ws.prepare(request)
    ms = float(q.get("ms", "1"))
    every = int(q.get("every", "3"))
    if kind == "serial" and _serial is None:
        _serial = asyncio.Queue()
        _tasks.add(asyncio.get_running_loop().create_task(_serial_worker(ms)))
    tasks: set[asyncio.Task[None]] = set()
    n = -1
    async for msg in ws:
        if msg.type != WSMsgType.BINARY:
            continue
        n += 1
        now = time.perf_counter()
        if kind == "echo":
            await ws.send_bytes(msg.data)
            continue
        if kind == "serial":
            assert _serial is not None
            _serial.put_nowait((ws, n))
            continue
        if kind == "close" and n + 1 >= int(q.get("after", "5")):
            await ws.close(code=int(q.get("code", "4321")), message=b"closing on purpose")
            break
        if kind == "error" and n % every == every - 1:
            await ws.send_str(json.dumps({"seq": n, "error": "not an image"}))
            continue
        if kind == "drop" and n % every == every - 1:
            await ws.send_str(json.dumps({"seq": n, "dropped": True}))
            continue
        if kind == "silent" and n % every == every - 1:
            continue
        answer: dict[str, object] = {"seq": n, "label": "tabby"}
        if kind == "headers":
            answer["label"] = json.dumps({h: request.headers.get(h) for h in (
                "Authorization", "X-Pool", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions")}, sort_keys=True)
        if q.get("timing"):
            answer["timing"] = PHASES
        t = asyncio.get_running_loop().create_task(_answer_later(ws, answer, now + ms / 1000))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    for t in tasks:
        t.cancel()
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/{kind}", stream)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    ctx = None
    if len(sys.argv) >= 5 and sys.argv[2] == "--tls":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    # WSSERVER_HOST: another address to listen on (bench/wss_vs_vpn.py: every address of a namespace).
    host = os.environ.get("WSSERVER_HOST", "127.0.0.1")
    web.run_app(make_app(), host=host, port=port, ssl_context=ctx, access_log=None, print=None)
