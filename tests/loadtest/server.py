"""A test server for the load tester, with known per-phase delays and the
matching Server-Timing, a classifier stand-in, a one-time stall and error
answers. Run: python server.py PORT [--tls CERT KEY].

/chain      sleeps each hop of the timing contract in turn (edge -> worker
            -> inference phases), measures each sleep, and reports them as
            the edge, agent and inference server would (a scale query
            multiplies the delays)
/photo      POST image bytes -> the inference server's JSON; label = the
            first 8 hex digits of the body's SHA-256 (?bad=1: not JSON)
/co         ?key=K&stall_at=N&stall_ms=M: the Nth request of key K blocks
            the whole process for M ms (a GC pause, a stuck event loop);
            stall_after=S instead: the first request S seconds after key K's first
/echo-headers ?key=K: remembers each request's headers; /seen?key=K lists them
/count      ?key=K: how many /co requests key K has had
/flaky      ?key=K&every=N: every Nth request of key K answers 503
/status/N   answers N with the edge's JSON error shape
/trivial    "ok"; /healthz "ok"
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import sys
import time

from aiohttp import web

# (segment, ms), from the outermost hop inwards: what the request spends where.
CHAIN = (("lb", 1.0), ("edge_internal", 1.0), ("net_edge_worker", 3.0), ("agent_internal", 1.0),
         ("agent_overhead", 2.0), ("decode", 2.0), ("preprocess", 3.0), ("queue", 4.0), ("infer", 10.0),
         ("postprocess", 1.0), ("app_other", 1.0))
INFERENCE = ("decode", "preprocess", "queue", "infer", "postprocess")

counters: dict[str, int] = {}
firsts: dict[str, float] = {}
stalled: set[str] = set()
seen: dict[str, list[dict[str, str]]] = {}


def entry(name: str, ms: float) -> str:
    return f"{name};dur={ms:.3f}"


async def chain(request: web.Request) -> web.Response:
    scale = float(request.query.get("scale", "1"))
    spent: dict[str, float] = {}
    for name, ms in CHAIN:
        t = time.perf_counter()
        await asyncio.sleep(ms * scale / 1000)
        spent[name] = (time.perf_counter() - t) * 1000
    app = sum(spent[n] for n in INFERENCE) + spent["app_other"]
    upstream = app + spent["agent_overhead"]
    agent = upstream + spent["agent_internal"]
    tunnel = agent + spent["net_edge_worker"]
    edge = tunnel + spent["edge_internal"] + spent["lb"]
    timing = [entry(n, spent[n]) for n in INFERENCE]
    timing += [entry("app", app), entry("upstream", upstream), entry("agent", agent), entry("lb", spent["lb"]),
               entry("tunnel", tunnel), entry("tunnel_rtt", 0.25), entry("edge", edge)]
    # Split over two headers, with a desc containing a comma, as real proxies may.
    headers = [("Server-Timing", ", ".join(timing[:6])), ("Server-Timing", 'cache;desc="miss, cold"'),
               ("Server-Timing", ", ".join(timing[6:]))]
    resp = web.Response(text="chain\n")
    for k, v in headers:
        resp.headers.add(k, v)
    return resp


async def photo(request: web.Request) -> web.Response:
    body = await request.read()
    if request.query.get("bad"):
        return web.Response(text="<html>not json</html>", content_type="text/html")
    t = time.perf_counter()
    await asyncio.sleep(float(request.query.get("ms", "2")) / 1000)
    infer = (time.perf_counter() - t) * 1000
    label = hashlib.sha256(body).hexdigest()[:8]
    answer = {"inference": f"Predicted = {label}, Confidence = 0.900", "message": "success", "label": label,
              "class_id": 1, "confidence": 0.9, "top5": [], "model": "test", "backend": "test"}
    timing = ", ".join([entry("decode", 0.1), entry("preprocess", 0.1), entry("queue", 0.0), entry("infer", infer),
                        entry("postprocess", 0.1), entry("app", infer + 0.3)])
    return web.Response(text=json.dumps(answer), content_type="application/json",
                        headers={"Server-Timing": timing})


async def co(request: web.Request) -> web.Response:
    key = request.query.get("key", "")
    n = counters[key] = counters.get(key, 0) + 1
    first = firsts.setdefault(key, time.monotonic())
    after = request.query.get("stall_after")
    if after is not None:
        due = time.monotonic() - first >= float(after) and key not in stalled
    else:
        due = n == int(request.query.get("stall_at", "0"))
    if due:
        stalled.add(key)
        time.sleep(float(request.query.get("stall_ms", "1000")) / 1000)  # noqa: ASYNC251 -- blocks everything, on purpose
    return web.Response(text="ok")


async def echo_headers(request: web.Request) -> web.Response:
    seen.setdefault(request.query.get("key", ""), []).append(dict(request.headers))
    return web.Response(text="ok")


async def seen_headers(request: web.Request) -> web.Response:
    return web.json_response(seen.get(request.query.get("key", ""), []))


async def count(request: web.Request) -> web.Response:
    return web.Response(text=str(counters.get(request.query.get("key", ""), 0)))


async def flaky(request: web.Request) -> web.Response:
    key = "flaky:" + request.query.get("key", "")
    n = counters[key] = counters.get(key, 0) + 1
    if n % int(request.query.get("every", "5")) == 0:
        return web.json_response({"error": "test", "detail": "flaky on purpose"}, status=503)
    return web.Response(text="ok")


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.json_response({"error": "test", "detail": f"answering {code} on purpose"}, status=code)


async def trivial(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/chain", chain)
    app.router.add_post("/photo", photo)
    app.router.add_get("/co", co)
    app.router.add_get("/flaky", flaky)
    app.router.add_get("/count", count)
    app.router.add_route("*", "/echo-headers", echo_headers)
    app.router.add_get("/seen", seen_headers)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/trivial", trivial)
    app.router.add_get("/healthz", trivial)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    ctx = None
    if len(sys.argv) >= 5 and sys.argv[2] == "--tls":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    web.run_app(make_app(), host="127.0.0.1", port=port, ssl_context=ctx, access_log=None, print=None)
