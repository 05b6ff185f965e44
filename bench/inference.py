"""Inference benchmark: per backend, the model in-process (the floor) against
the HTTP server at concurrency 1/4/8/16 with batching on and off. Prints a
table; asserts nothing.

  raw        decode + preprocess + forward in-process, batch 1 and batch 8
  server     POST /photo on loopback, closed loop, keep-alive

Targets (issue #3): server p50 at concurrency 1 <= raw pipeline p50 + 1.5 ms;
server throughput at saturation >= 90% of the raw in-process throughput at
the same batch size.

    python bench/inference.py [--backends opencv-dnn,onnxruntime,tensorflow] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.harness import PY, Proc, free_port  # noqa: E402


def photo() -> bytes:
    import skimage.data
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def raw(backend: str, body: bytes, cache: Path, repeats: int) -> dict[str, float]:
    """The in-process floor: what `inference-server classify` does per image."""
    import numpy as np

    from inference.imaging import prepare
    from inference.models import resolve
    clf = resolve("efficientnet-lite0", backend, cache_dir=cache).load()
    x = prepare(body, clf.preprocess).array
    for n in (1, 8, 1):
        clf.predict(np.stack([x] * n))  # warm-up, as the server does before it is ready
    prep, fwd1, fwd8 = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        prepare(body, clf.preprocess)
        prep.append(time.perf_counter() - t)
        t = time.perf_counter()
        clf.predict(x[None])
        fwd1.append(time.perf_counter() - t)
    b8 = np.stack([x] * 8)
    for _ in range(max(3, repeats // 4)):
        t = time.perf_counter()
        clf.predict(b8)
        fwd8.append(time.perf_counter() - t)
    p, f1, f8 = statistics.median(prep), statistics.median(fwd1), statistics.median(fwd8)
    return {"prep_ms": p * 1e3, "fwd1_ms": f1 * 1e3, "fwd8_ms": f8 * 1e3 / 8,
            "pipe1_ms": (p + f1) * 1e3, "rps1": 1 / (p + f1), "rps8": 8 / (8 * p + f8)}


async def load(url: str, body: bytes, concurrency: int, seconds: float,
               app: list[float] | None = None) -> tuple[list[float], int, float]:
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            async with s.post(url + "/photo", data=body) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
                if app is not None:
                    m = re.search(r"app;dur=([0-9.]+)", r.headers.get("Server-Timing", ""))
                    if m:
                        app.append(float(m.group(1)) / 1000)
            lat.append(time.perf_counter() - t)

        for _ in range(concurrency * 2):  # warm the connections
            await one()
        lat.clear()
        if app is not None:
            app.clear()
        start = time.perf_counter()
        end = start + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                await one()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, errors, time.perf_counter() - start


def start(backend: str, cache: Path, log_dir: Path, max_batch: int) -> tuple[Proc, str]:
    import urllib.request
    port = free_port()
    proc = Proc(f"{backend}-b{max_batch}", [PY, "-m", "inference", "serve", "--port", str(port), "--backend", backend,
                                             "--cache-dir", str(cache), "--max-batch", str(max_batch),
                                             "--log-level", "warning"], log_dir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"{backend} server exited:\n{proc.log()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise SystemExit(f"{backend} server not ready:\n{proc.log()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="opencv-dnn,onnxruntime,tensorflow")
    ap.add_argument("--seconds", type=float, default=4.0, help="per concurrency level")
    ap.add_argument("--repeats", type=int, default=40, help="in-process timings per backend")
    ap.add_argument("--concurrency", default="1,4,8,16")
    a = ap.parse_args()
    body = photo()
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    cache = work / "cache"
    levels = [int(c) for c in a.concurrency.split(",")]
    print(f"EfficientNet-Lite0, chelsea.jpg ({len(body)} bytes, 451x300), {os.cpu_count()} CPUs, "
          f"{a.seconds:g} s per level\n", flush=True)
    verdicts = []
    for backend in a.backends.split(","):
        r = raw(backend, body, cache, a.repeats)
        print(f"## {backend}\nin-process: decode+preprocess {r['prep_ms']:.2f} ms, forward batch 1 "
              f"{r['fwd1_ms']:.2f} ms, batch 8 {r['fwd8_ms']:.2f} ms/image; pipeline {r['pipe1_ms']:.2f} ms "
              f"-> {r['rps1']:.0f} img/s at batch 1, {r['rps8']:.0f} img/s at batch 8", flush=True)
        print(f"{'batching':<10} {'conc':>4} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        best = {}
        p50_c1 = app_c1 = None
        for max_batch in (1, 8):
            proc, url = start(backend, cache, work, max_batch)
            try:
                for c in levels:
                    app: list[float] = []
                    lat, errors, elapsed = asyncio.run(load(url, body, c, a.seconds, app))
                    rps = len(lat) / elapsed
                    best[max_batch] = max(best.get(max_batch, 0.0), rps)
                    p50 = pct(lat, 0.5) * 1e3
                    if c == 1 and max_batch == 1:
                        p50_c1, app_c1 = p50, pct(app, 0.5) * 1e3
                    label = "off (1)" if max_batch == 1 else f"on ({max_batch})"
                    print(f"{label:<10} {c:>4} {rps:>7.0f} {p50:>8.2f} {pct(lat, 0.99) * 1e3:>8.2f} {errors:>6}",
                          flush=True)
            finally:
                proc.stop()
        assert p50_c1 is not None and app_c1 is not None
        over = p50_c1 - r["pipe1_ms"]
        verdicts.append((backend, f"p50 at c=1 {p50_c1:.2f} ms vs in-process {r['pipe1_ms']:.2f} ms "
                                  f"(+{over:.2f} ms; target <= +1.5)", over <= 1.5))
        inside = app_c1 - r["pipe1_ms"]
        verdicts.append((backend, f"  of which inside the server (Server-Timing app p50 {app_c1:.2f} ms): "
                                  f"{inside:+.2f} ms", True))
        for mb, raw_rps in ((1, r["rps1"]), (8, r["rps8"])):
            share = best[mb] / raw_rps
            verdicts.append((backend, f"saturation, max batch {mb}: {best[mb]:.0f} img/s = {share:.0%} of in-process "
                                      f"{raw_rps:.0f} (target >= 90%)", share >= 0.9))
        print(flush=True)
    print("## verdicts")
    for backend, text, ok in verdicts:
        print(f"{backend:<12} {text:<86} {'ok' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
