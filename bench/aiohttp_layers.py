"""What aiohttp's `web.Application` layer costs per request at the edge's
settings, against its low-level `web.Server`: the same trivial handler over
TLS (uvloop, handler_cancellation on, no access log), loaded by `wrk` at
c=32; CPU per request of this process from os.times(). The Application runs
two pass-through middlewares and a catch-all route, as the edge does.

    python bench/aiohttp_layers.py                 # 3 x 3 s per mode, alternating
    python bench/aiohttp_layers.py --rounds 1 --seconds 2

Prints CPU per request (us) per mode and round; asserts nothing; exits 0
(also when wrk is missing: one line says so)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from runtime import eventloop  # noqa: E402
from tests.harness import make_pki  # noqa: E402

WRK = shutil.which("wrk")


async def hello(request: web.BaseRequest) -> web.Response:
    return web.Response(body=b"hello", headers={"Server-Timing": "edge;dur=0.1"})


@web.middleware
async def passthrough(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    return await handler(request)


async def serve(mode: str, ctx: ssl.SSLContext) -> tuple[web.BaseRunner, int]:
    runner: web.BaseRunner
    if mode == "web.Application":
        app = web.Application(middlewares=[passthrough, passthrough])
        app.router.add_route("*", "/{tail:.*}", hello)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    else:
        runner = web.ServerRunner(web.Server(hello, handler_cancellation=True, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, runner.addresses[0][1]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    a = ap.parse_args()
    if WRK is None:
        print("bench/aiohttp_layers.py: skipped, `wrk` is not installed")
        return 0
    pki = make_pki(Path(tempfile.mkdtemp(prefix="aiohttp-layers-")) / "pki")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)
    results: dict[str, list[float]] = {"web.Application": [], "web.Server": []}
    for _ in range(a.rounds):
        for mode in results:
            runner, port = await serve(mode, ctx)
            t0 = os.times()
            p = await asyncio.create_subprocess_exec(WRK, "-t1", "-c32", f"-d{a.seconds}s",
                                                     f"https://127.0.0.1:{port}/", stdout=asyncio.subprocess.PIPE)
            out = (await p.communicate())[0].decode()
            t1 = os.times()
            await runner.cleanup()
            m = re.search(r"(\d+) requests in", out)
            if m is None:
                print(f"{mode}: wrk failed: {out.strip()}")
                continue
            n = int(m.group(1))
            results[mode].append((t1.user + t1.system - t0.user - t0.system) / n * 1e6)
    for mode, us in results.items():
        print(f"{mode:16} CPU per request: {', '.join(f'{x:.0f}' for x in us)} us")
    return 0


if __name__ == "__main__":
    sys.exit(eventloop.run(main()))
