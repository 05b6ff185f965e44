"""Inference benchmark: per backend, the model in-process (the floor) against
the HTTP server at concurrency 1/4/8/16 with batching on and off. Prints a
table; asserts nothing.

  raw        decode + preprocess + forward in-process, batch 1 and batch 8
  server     POST /photo on loopback, closed loop, keep-alive

Targets (issue #3): server p50 at concurrency 1 <= raw pipeline p50 + 1.5 ms;
server throughput at saturation >= 90% of the raw in-process throughput at
the same batch size.

    python bench/inference.py [--backends opencv-dnn,onnxruntime,tensorflow] [--seconds 4] [--raw-only]

Compare mode (issue #21): server variants side by side against the model's
in-process ceiling (onnxruntime, its default threads, batch 8 on preprocessed
tensors), interleaved over rounds (A/B/A/B) so that other load on the machine
falls on every variant alike. Per variant: p50 at c=1, img/s and p99 at c=16.
A variant is NAME=ARGS (extra `serve` flags) or NAME=@DIR ARGS to run the
server from another source tree (e.g. `git archive` of an older commit).
Targets: saturation >= 85% of the ceiling; c=1 p50 <= in-process decode +
preprocess + batch-1 forward + 1.0 ms.

    python bench/inference.py --variant 'before=@/tmp/old' --variant 'default=' \
        --variant 'decode2=--decode-threads 2' --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from httpcontract.timing import parse as parse_server_timing  # noqa: E402
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
                    hops = parse_server_timing(r.headers.getall("Server-Timing", []))
                    if "app" in hops:
                        app.append(hops["app"] / 1000)
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


def start(backend: str, cache: Path, log_dir: Path, max_batch: int, extra: list[str] | None = None,
          source: str | None = None, name: str | None = None) -> tuple[Proc, str]:
    """A server; with `source`, run from that source tree (-P: the bench's
    working directory does not shadow it)."""
    import urllib.request
    port = free_port()
    chosen = ["--backend", backend] if backend else []
    head = [PY, "-P", "-m", "inference"] if source else [PY, "-m", "inference"]
    proc = Proc(name or f"{backend}-b{max_batch}", [*head, "serve", "--port", str(port), *chosen, "--cache-dir",
                                                    str(cache), "--max-batch", str(max_batch), *(extra or [])],
                log_dir, env={"PYTHONPATH": source} if source else None)
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


def ceiling(body: bytes, cache: Path, repeats: int) -> dict[str, float]:
    """The model's in-process figures on onnxruntime with its default threads:
    decode + preprocess, batch-1 forward, and the ceiling (batch 8 forward on
    preprocessed tensors, img/s)."""
    r = raw("onnxruntime", body, cache, repeats)
    return {"prep_ms": r["prep_ms"], "fwd1_ms": r["fwd1_ms"], "ceiling": 1000 / r["fwd8_ms"],
            "c1_budget_ms": r["prep_ms"] + r["fwd1_ms"] + 1.0}


def compare(a: argparse.Namespace, body: bytes, work: Path, cache: Path) -> int:
    variants = []
    for spec in a.variant:
        name, _, rest = spec.partition("=")
        words = rest.split()
        source = words.pop(0)[1:] if words and words[0].startswith("@") else None
        variants.append((name, source, words))
    rows: dict[str, list[tuple[float, float, float]]] = {n: [] for n, _, _ in variants}
    refs: list[dict[str, float]] = []
    for rnd in range(a.rounds):
        r = ceiling(body, cache, a.repeats)  # each round: the machine's load changes
        refs.append(r)
        print(f"round {rnd + 1} in-process (onnxruntime, default threads): decode+preprocess {r['prep_ms']:.2f} ms, "
              f"forward batch 1 {r['fwd1_ms']:.2f} ms; ceiling (batch 8, preprocessed) {r['ceiling']:.0f} img/s",
              flush=True)
        for name, source, extra in variants:
            proc, url = start("", cache, work, 8, extra, source, name=f"{name}-{rnd}")
            try:
                lat1, _, _ = asyncio.run(load(url, body, 1, a.seconds))
                lat16, err, elapsed = asyncio.run(load(url, body, 16, a.seconds))
            finally:
                proc.stop()
            row = (pct(lat1, 0.5) * 1e3, len(lat16) / elapsed, pct(lat16, 0.99) * 1e3)
            rows[name].append(row)
            print(f"round {rnd + 1} {name:<14} c=1 p50 {row[0]:6.2f} ms   c=16 {row[1]:5.0f} img/s p99 {row[2]:6.1f} ms"
                  f"{f'  ({err} errors)' if err else ''}", flush=True)
    ref = {k: statistics.mean(r[k] for r in refs) for k in refs[0]}
    print(f"\nin-process, mean of {len(refs)}: decode+preprocess {ref['prep_ms']:.2f} ms, forward batch 1 "
          f"{ref['fwd1_ms']:.2f} ms, ceiling {ref['ceiling']:.0f} img/s")
    print(f"\n| server | c=1 p50 | rps at c=16 | p99 at c=16 | % of in-process ceiling ({ref['ceiling']:.0f} img/s) |")
    print("| --- | --- | --- | --- | --- |")
    for name in rows:
        p50, rps, p99 = (statistics.mean(x[i] for x in rows[name]) for i in range(3))
        print(f"| {name} | {p50:.1f} ms | {rps:.0f} | {p99:.0f} ms | {rps / ref['ceiling']:.0%} |")
    print(f"\ntargets: saturation >= 85% = {0.85 * ref['ceiling']:.0f} img/s; c=1 p50 <= {ref['c1_budget_ms']:.2f} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="opencv-dnn,onnxruntime,tensorflow")
    ap.add_argument("--seconds", type=float, default=4.0, help="per concurrency level")
    ap.add_argument("--repeats", type=int, default=40, help="in-process timings per backend")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--raw-only", action="store_true", help="in-process figures only, no servers")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=[@DIR] ARGS",
                    help="compare mode: a server variant (repeatable)")
    ap.add_argument("--rounds", type=int, default=2, help="compare mode: interleaved rounds")
    a = ap.parse_args()
    body = photo()
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    cache = work / "cache"
    if a.variant:
        return compare(a, body, work, cache)
    levels = [int(c) for c in a.concurrency.split(",")]
    print(f"EfficientNet-Lite0, chelsea.jpg ({len(body)} bytes, 451x300), {os.cpu_count()} CPUs, "
          f"{a.seconds:g} s per level\n", flush=True)
    verdicts = []
    for backend in a.backends.split(","):
        r = raw(backend, body, cache, a.repeats)
        print(f"## {backend}\nin-process: decode+preprocess {r['prep_ms']:.2f} ms, forward batch 1 "
              f"{r['fwd1_ms']:.2f} ms, batch 8 {r['fwd8_ms']:.2f} ms/image; pipeline {r['pipe1_ms']:.2f} ms "
              f"-> {r['rps1']:.0f} img/s at batch 1, {r['rps8']:.0f} img/s at batch 8", flush=True)
        if a.raw_only:
            continue
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
