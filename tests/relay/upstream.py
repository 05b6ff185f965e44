"""A small upstream for relay tests: echo, sizes, delays, hangs, SSE, a
concurrency meter, a switchable health path (/healthz, or UPSTREAM_HEALTH_PATH),
WebSockets at /ws, and load shedding like the inference server's (503 +
Retry-After beyond N in flight). Run: python upstream.py PORT [HOST]."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys

from aiohttp import WSMsgType, web

ws_state: dict = {"open": 0, "closes": [], "big_sent": 0}
state = {"in_flight": 0, "max_in_flight": 0, "served": 0, "healthy": True, "fail": False, "delay_ms": 0.0,
         "shed_beyond": 0, "active": 0, "shed": 0}
# Where health is answered; a KServe/Triton-style server says /v2/health/ready (and 404 at /healthz).
HEALTH_PATH = os.environ.get("UPSTREAM_HEALTH_PATH") or "/healthz"
CONTROL = (HEALTH_PATH, "/stats", "/set-", "/sse-release", "/ws-stats")


@web.middleware
async def misbehave(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Modes set with /set-fail/on, /set-delay/MS and /set-shed/N, for fault tests."""
    if request.path.startswith(CONTROL):
        return await handler(request)
    if state["shed_beyond"] and state["active"] >= state["shed_beyond"]:
        # As inference/server.py does when its queue is full: busy, not broken.
        state["shed"] += 1
        return web.json_response({"error": "server busy; retry shortly"}, status=503, headers={"Retry-After": "1"})
    state["active"] += 1
    try:
        if state["delay_ms"]:
            await asyncio.sleep(float(state["delay_ms"]) / 1000)
        if state["fail"]:
            return web.Response(status=500, text="failing on purpose")
        return await handler(request)
    finally:
        state["active"] -= 1
sse_release = asyncio.Event()


async def root(request: web.Request) -> web.Response:
    state["served"] += 1
    return web.Response(text=f"hello from {socket.gethostname()} pid {os.getpid()}\n"
                             f"peer {request.remote}\nhost {request.headers.get('Host')}\n",
                        headers={"X-Upstream-Pid": str(os.getpid())})


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    state["served"] += 1
    return web.Response(body=body, headers={"X-Sha256": hashlib.sha256(body).hexdigest(),
                                            "X-Upstream-Pid": str(os.getpid()),
                                            "X-Seen-Forwarded-For": request.headers.get("X-Forwarded-For", ""),
                                            "X-Seen-Authorization": request.headers.get("Authorization", ""),
                                            "X-Seen-Request-Id": request.headers.get("X-Request-ID", ""),
                                            "Server-Timing": "app;dur=0.5"})


async def size(request: web.Request) -> web.Response:
    n = int(request.match_info["n"])
    return web.Response(body=bytes(i % 251 for i in range(n)))


async def work(request: web.Request) -> web.Response:
    state["in_flight"] += 1
    state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
    try:
        await asyncio.sleep(float(request.query.get("ms", "50")) / 1000)
        await request.read()
        state["served"] += 1
        return web.Response(text=str(os.getpid()), headers={"X-Upstream-Pid": str(os.getpid())})
    finally:
        state["in_flight"] -= 1


async def stats(request: web.Request) -> web.Response:
    return web.json_response({**state, "pid": os.getpid()})


async def hang(request: web.Request) -> web.Response:
    state["in_flight"] += 1
    state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
    try:
        await asyncio.sleep(3600)
    finally:
        state["in_flight"] -= 1
    return web.Response()


async def status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text="as asked")


async def sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b"data: first\n\n")
    sse_release.clear()
    await sse_release.wait()
    await resp.write(b"data: second\n\n")
    await resp.write_eof()
    return resp


async def release(request: web.Request) -> web.Response:
    sse_release.set()
    return web.Response(text="released")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(status=200 if state["healthy"] else 503, text="ok" if state["healthy"] else "down")


async def set_health(request: web.Request) -> web.Response:
    state["healthy"] = request.match_info["value"] == "up"
    return web.Response(text="set")


async def set_fail(request: web.Request) -> web.Response:
    state["fail"] = request.match_info["value"] == "on"
    return web.Response(text="set")


async def set_shed(request: web.Request) -> web.Response:
    state["shed_beyond"] = int(request.match_info["n"])  # 0 = never shed
    return web.Response(text="set")


async def set_delay(request: web.Request) -> web.Response:
    state["delay_ms"] = float(request.match_info["ms"])
    return web.Response(text="set")


async def drop_unless(request: web.Request) -> web.Response:
    """Answers only in the process named by its pid; every other one closes
    the connection without a byte of answer (a worker lost mid-request)."""
    await request.read()
    if request.match_info["pid"] != str(os.getpid()):
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError
    return web.Response(text=str(os.getpid()), headers={"X-Upstream-Pid": str(os.getpid())})


async def crash(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Length": "1000000"})
    await resp.prepare(request)
    await resp.write(b"x" * 1000)
    os._exit(3)


async def ws_echo(request: web.Request) -> web.StreamResponse:
    """A WebSocket echo: text and binary back as they came; commands (text):
    "close:CODE:REASON" closes with that code, "big:N" sends N bytes,
    "seen" answers the subprotocols and headers of the handshake as JSON,
    "slow:MS" sleeps that long before each next read; "ping:DATA" pings the client.
    Records how the last connection ended at /ws-stats."""
    ws = web.WebSocketResponse(protocols=("inference.v1", "echo.v2"), max_msg_size=64 * 1024 * 1024,
                               autoping=True, compress=False)
    await ws.prepare(request)
    ws_state["open"] += 1
    slow = 0.0
    try:
        async for msg in ws:
            if slow:
                await asyncio.sleep(slow)
            if msg.type is WSMsgType.TEXT:
                text = msg.data
                if text.startswith("close:"):
                    _, code, reason = text.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                if text.startswith("big:"):
                    await ws.send_bytes(bytes(i % 251 for i in range(int(text[4:]))))
                    ws_state["big_sent"] += 1
                elif text == "seen":
                    await ws.send_str(json.dumps({
                        "protocols": request.headers.get("Sec-WebSocket-Protocol", ""),
                        "chosen": ws.ws_protocol,
                        "headers": {k: v for k, v in request.headers.items()},
                        "extensions": request.headers.get("Sec-WebSocket-Extensions", ""),
                    }))
                elif text.startswith("slow:"):
                    slow = float(text[5:]) / 1000
                elif text.startswith("ping:"):
                    await ws.ping(text[5:].encode())
                elif text == "crash":
                    os._exit(4)
                else:
                    await ws.send_str(text)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    finally:
        ws_state["open"] -= 1
        ws_state["closes"].append([ws.close_code, ws_state.get("last_reason", "")])
    return ws


async def ws_close_reason(request: web.Request) -> web.Response:
    return web.json_response(ws_state)


async def ws_refuse(request: web.Request) -> web.Response:
    return web.Response(status=403, text="no websockets here")


def make_app() -> web.Application:
    app = web.Application(client_max_size=1 << 31, middlewares=[misbehave])
    app.router.add_get("/", root)
    app.router.add_post("/echo", echo)
    app.router.add_put("/echo", echo)
    app.router.add_get("/bytes/{n}", size)
    app.router.add_route("*", "/work", work)
    app.router.add_get("/stats", stats)
    app.router.add_get("/hang", hang)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/sse", sse)
    app.router.add_get("/sse-release", release)
    app.router.add_get(HEALTH_PATH, healthz)
    app.router.add_get("/set-health/{value}", set_health)
    app.router.add_get("/crash", crash)
    app.router.add_route("*", "/drop-unless/{pid}", drop_unless)
    app.router.add_get("/set-fail/{value}", set_fail)
    app.router.add_get("/set-delay/{ms}", set_delay)
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/ws-stats", ws_close_reason)
    app.router.add_get("/ws-refuse", ws_refuse)
    app.router.add_get("/set-shed/{n}", set_shed)
    return app


if __name__ == "__main__":
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    web.run_app(make_app(), host=host, port=int(sys.argv[1]), access_log=None, print=None,
                handler_cancellation=True)
