"""Detection and transformation benchmark: each model in-process (decode +
preprocess, forward pass, postprocess, encode) and through the HTTP server
directly (POST /detect, POST /transform?mode=... on loopback, closed loop,
keep-alive) at a few concurrencies. Prints tables; asserts nothing.

    python bench/vision.py [--seconds 4] [--concurrency 1,4] [--repeats 50] [--edge]

With --edge, every route is also measured through a real edge and worker
agent on loopback (HTTPS to the edge, the WSS tunnel, the agent's HTTP to
the server), as a client of the relay sees it.

Needs the files of `make weights`. Photos: scikit-image's chelsea (451x300)
for the detectors, astronaut (512x512) for the segmenter.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ssl  # noqa: E402

import aiohttp  # noqa: E402

from bench.inference import pct, start  # noqa: E402
from inference.detectors import resolve_detector  # noqa: E402
from inference.segmenter import composite, encode, full_mask, resolve_segmenter  # noqa: E402
from inference.weights import WeightsSettings  # noqa: E402
from tests.harness import System, make_pki  # noqa: E402


def jpeg(name: str) -> bytes:
    import skimage.data
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def inprocess(repeats: int, threads: int) -> list[tuple[str, dict[str, float]]]:
    directory = WeightsSettings().path()
    rows = []
    for name, photo in (("ssd-mobilenet-v2", "chelsea"), ("blazeface", "astronaut")):
        det = resolve_detector(name, directory).load(threads)
        body = jpeg(photo)
        prep_s, fwd_s, post_s = [], [], []
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            p = det.prepare(body, 40_000_000)
            t1 = time.perf_counter()
            row = det.predict(p.array[None])[0]
            t2 = time.perf_counter()
            det.decode(row, p.geometry, det.spec.min_score, 100)
            t3 = time.perf_counter()
            if i >= 3:
                prep_s.append(t1 - t0)
                fwd_s.append(t2 - t1)
                post_s.append(t3 - t2)
        rows.append((name, {"prep": statistics.median(prep_s) * 1e3, "fwd": statistics.median(fwd_s) * 1e3,
                            "post": statistics.median(post_s) * 1e3, "enc": 0.0}))
    seg = resolve_segmenter("selfie-segmentation", directory).load(threads)
    body = jpeg("astronaut")
    for mode in ("blur", "replace", "cutout"):
        prep_s, fwd_s, post_s, enc_s = [], [], [], []
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            p = seg.prepare(body, 40_000_000)
            t1 = time.perf_counter()
            mask_row = seg.predict(p.array[None])[0]
            t2 = time.perf_counter()
            out = composite(p.image, full_mask(mask_row, p.width, p.height), mode)
            t3 = time.perf_counter()
            encode(out, "png" if mode == "cutout" else "jpeg")
            t4 = time.perf_counter()
            if i >= 3:
                prep_s.append(t1 - t0)
                fwd_s.append(t2 - t1)
                post_s.append(t3 - t2)
                enc_s.append(t4 - t3)
        rows.append((f"selfie-segmentation {mode}", {
            "prep": statistics.median(prep_s) * 1e3, "fwd": statistics.median(fwd_s) * 1e3,
            "post": statistics.median(post_s) * 1e3, "enc": statistics.median(enc_s) * 1e3}))
    return rows


async def load(url: str, body: bytes, concurrency: int, seconds: float, headers: dict[str, str] | None = None,
               tls: ssl.SSLContext | None = None) -> tuple[list[float], int, float]:
    lat: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=tls if tls is not None else True)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as s:
        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            async with s.post(url, data=body) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
            lat.append(time.perf_counter() - t)

        for _ in range(concurrency * 2):
            await one()
        lat.clear()
        begin = time.perf_counter()
        end = begin + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                await one()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, errors, time.perf_counter() - begin


async def relay(work: Path, upstream: str) -> tuple[System, str]:
    """An edge and one agent in front of `upstream`, all real processes."""
    system = System(make_pki(work / "pki"), work)
    _, edge = await system.edge("edge", None, "--rate-limit", "0", "--log-level", "warning")
    system.agent("agent", edge, upstream, "--log-level", "warning", capacity=16)
    await system.wait_available(edge, ["agent"])
    if system.session is not None:
        await system.session.close()
        system.session = None
    return system, edge


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="TFLite threads in-process (the server's plan: all cores)")
    p.add_argument("--edge", action="store_true", help="also measure through an edge and a worker agent")
    a = p.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]

    print("In-process (median ms per image):\n")
    print("| model | decode + preprocess | forward | postprocess | encode | pipeline img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in inprocess(a.repeats, a.threads):
        total = r["prep"] + r["fwd"] + r["post"] + r["enc"]
        print(f"| {name} | {r['prep']:.2f} | {r['fwd']:.2f} | {r['post']:.2f} | {r['enc']:.2f} | {1000 / total:.0f} |")

    print("\nServer, direct" + (" and through the edge" if a.edge else "") + " (img/s, p50 ms, p99 ms):\n")
    print("| route | path | " + " | ".join(f"c={c}" for c in levels) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in levels) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for detector in ("ssd-mobilenet-v2", "blazeface"):
            proc, url = start("onnxruntime", work / "cache", work, 8,
                              ["--kinds", "detect,transform", "--detector", detector], name=f"vision-{detector}")
            try:
                targets = [("direct", url, None, None)]
                system = None
                if a.edge:
                    system, edge = asyncio.run(relay(work / detector, url))
                    targets.append(("via edge", edge, system.auth(), system.pki.client_ssl()))
                routes = [(f"POST /detect ({detector})", "/detect", jpeg("chelsea" if detector != "blazeface"
                                                                         else "astronaut"))]
                if detector == "ssd-mobilenet-v2":
                    routes += [(f"POST /transform?mode={m}", f"/transform?mode={m}", jpeg("astronaut"))
                               for m in ("blur", "replace", "cutout")]
                for label, path, body in routes:
                    for where, base, headers, tls in targets:
                        cells = []
                        for c in levels:
                            lat, errors, took = asyncio.run(load(base + path, body, c, a.seconds, headers, tls))
                            ms = sorted(x * 1e3 for x in lat)
                            cells.append(f"{len(lat) / took:.0f}, {pct(ms, 0.5):.2f}, {pct(ms, 0.99):.2f}"
                                         + (f" ({errors} errors)" if errors else ""))
                        print(f"| {label} | {where} | " + " | ".join(cells) + " |", flush=True)
            finally:
                if system is not None:
                    for p_ in reversed(system.procs):
                        p_.stop()
                proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
