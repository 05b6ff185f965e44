"""Soak: edge + N workers + upstreams on loopback under an open-loop load at
80% of their measured capacity, every answer checked against its request,
while RSS, open FDs and the edge's asyncio tasks are sampled every 10 s.

Promise: 0 lost, 0 mismatched, 0 unexpected 5xx; RSS and FD counts flat
(within +/-10% of the first sample after warm-up); the edge's asyncio tasks
at rest after the load no more than before it. Prints a verdict table and
exits 1 if a promise is broken.

    python bench/soak.py --minutes 30 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procstats import fds, flat, heap_trims, metric, rss_mb  # noqa: E402
from tests.harness import System, make_pki  # noqa: E402


class Tally:
    def __init__(self) -> None:
        self.sent = self.ok = self.lost = self.mismatched = self.unexpected_5xx = self.other_status = 0
        self.late_sends = 0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


CLIENT: dict[str, aiohttp.ClientSession] = {}


def client(system: System) -> aiohttp.ClientSession:
    # A bounded pool, as real clients have: an open loop with unbounded
    # connections measures TLS handshakes, not the relay.
    if "s" not in CLIENT:
        CLIENT["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=system.pki.client_ssl(), limit=64))
    return CLIENT["s"]


async def one(system: System, edge: str, rng: random.Random, t: Tally) -> None:
    body = rng.randbytes(rng.randint(1, 16384))
    t.sent += 1
    try:
        async with client(system).post(edge + "/echo", data=body, headers=system.auth()) as r:
            got = await r.read()
            if r.status >= 500:
                t.unexpected_5xx += 1
                t.error(f"HTTP {r.status}")
            elif r.status != 200:
                t.other_status += 1
                t.error(f"HTTP {r.status}")
            elif got != body or r.headers.get("X-Sha256") != hashlib.sha256(body).hexdigest():
                t.mismatched += 1
            else:
                t.ok += 1
    except Exception as exc:  # every failure is counted, none may escape
        t.lost += 1
        t.error(exc.__class__.__name__)


async def capacity(system: System, edge: str, seconds: float, concurrency: int) -> float:
    t = Tally()
    rng = random.Random(1)
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            await one(system, edge, rng, t)

    start = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return t.ok / (time.monotonic() - start)


async def open_loop(system: System, edge: str, rate: float, seconds: float, t: Tally,
                    on_tick) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(2)
    start = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    next_sample = start + 10
    while True:
        due = start + i / rate
        if due - start >= seconds:
            break
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.05:
            t.late_sends += 1
        task = asyncio.create_task(one(system, edge, rng, t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        if time.monotonic() >= next_sample:
            next_sample += 10
            await on_tick()
    await asyncio.gather(*tasks)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    ap.add_argument("--warmup", type=float, default=None, help="seconds excluded from the flatness check "
                    "(default: 20%% of the run, at most 120 s)")
    ap.add_argument("--tolerance", type=float, default=0.10)
    a = ap.parse_args()
    seconds = a.minutes * 60
    warmup = a.warmup if a.warmup is not None else min(120.0, seconds * 0.2)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    system = System(make_pki(work / "pki"), work)
    try:
        edge_proc, edge = await system.edge("edge", None, "--rate-limit", "0")
        procs = {"edge": edge_proc}
        names = []
        for i in range(a.workers):
            up_proc, up = await system.upstream(f"up{i}")
            procs[f"agent{i}"] = system.agent(f"w{i}", edge, up, capacity=16)
            procs[f"up{i}"] = up_proc
            names.append(f"w{i}")
        await system.wait_available(edge, names)
        cap = await capacity(system, edge, 5.0, 32)
        rate = max(1.0, cap * a.load)
        print(f"capacity {cap:.0f} req/s with {a.workers} workers; soaking at {rate:.0f} req/s for {a.minutes:g} min "
              f"(warm-up {warmup:.0f} s)", flush=True)
        samples: dict[str, dict[str, list[float]]] = {n: {"rss": [], "fds": []} for n in procs}

        blocks: list[float] = []

        async def metrics_text() -> str:
            async with system.http().get(edge + "/_edge/metrics", headers=system.auth()) as r:
                return await r.text()

        async def edge_metrics() -> tuple[float | None, float | None]:
            """The edge's asyncio tasks and Python blocks in use."""
            text = await metrics_text()
            return metric(text, "edge_asyncio_tasks"), metric(text, "edge_python_allocated_blocks")

        async def idle_tasks() -> float | None:
            # In-flight requests and open keep-alive connections are tasks too,
            # so the leak check compares the edge at rest, with the load
            # generator's connections closed, before and after the load.
            if "s" in CLIENT:
                await CLIENT.pop("s").close()
            last, _ = await edge_metrics()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                now, _ = await edge_metrics()
                if now == last:
                    break
                last = now
            return last

        idle_before = await idle_tasks()
        t = Tally()
        start = time.monotonic()

        async def on_tick() -> None:
            if time.monotonic() - start < warmup:
                return
            for n, p in procs.items():
                samples[n]["rss"].append(rss_mb(p.pid))
                samples[n]["fds"].append(fds(p.pid))
            v, b = await edge_metrics()
            if b is not None:
                blocks.append(b)
            el = time.monotonic() - start
            print(f"  {el:6.0f} s  sent {t.sent}  ok {t.ok}  lost {t.lost}  mismatched {t.mismatched}  "
                  f"5xx {t.unexpected_5xx}  edge rss {samples['edge']['rss'][-1]:.1f} MB  "
                  f"fds {samples['edge']['fds'][-1]:.0f}  tasks {v}", flush=True)

        await open_loop(system, edge, rate, seconds, t, on_tick)
        await on_tick()
        idle_after = await idle_tasks()
        rows = [
            ("requests sent", f"{t.sent}", "", True),
            ("answered and checked", f"{t.ok}", "", True),
            ("lost", f"{t.lost}", "0", t.lost == 0),
            ("mismatched", f"{t.mismatched}", "0", t.mismatched == 0),
            ("unexpected 5xx", f"{t.unexpected_5xx}", "0", t.unexpected_5xx == 0),
            ("other non-200", f"{t.other_status}", "0", t.other_status == 0),
            ("late sends (>50 ms behind schedule)", f"{t.late_sends}", "(info)", True),
        ]
        for n in procs:
            for key, label in (("rss", "RSS MB"), ("fds", "open FDs")):
                s = samples[n][key]
                ok, change = flat(s, a.tolerance)
                first = f"{s[0]:.1f}" if s else "-"
                last = f"{s[-1]:.1f}" if s else "-"
                rows.append((f"{n} {label} (after warm-up -> end)", f"{first} -> {last} ({change:+.1%})",
                             f"within {a.tolerance:.0%}", ok))
        if len(blocks) >= 2:
            # Info: if RSS grows while this stays flat, the growth is the allocator's
            # high-water mark (bursts of in-flight buffers), not objects kept alive.
            rows.append(("edge Python blocks (after warm-up -> end)",
                         f"{blocks[0]:.0f} -> {blocks[-1]:.0f} ({(blocks[-1] - blocks[0]) / blocks[0]:+.1%})",
                         "(info)", True))
        rows.append(("edge heap trims (malloc_trim)", heap_trims(await metrics_text()), "(info)", True))
        if idle_before is not None and idle_after is not None:
            # A leak only grows; fewer tasks at rest afterwards is fine.
            allowed = idle_before + max(2.0, idle_before * a.tolerance)
            rows.append(("edge asyncio tasks at rest (before -> after)", f"{idle_before:.0f} -> {idle_after:.0f}",
                         f"<= {allowed:.0f}", idle_after <= allowed))
        print()
        print(f"{'check':<44} {'measured':<28} {'promise':<14} verdict")
        for name, measured, promise, ok in rows:
            print(f"{name:<44} {measured:<28} {promise:<14} {'ok' if ok else 'BROKEN'}")
        if t.errors:
            print("errors:", ", ".join(f"{k} x{v}" for k, v in sorted(t.errors.items())))
        elapsed = time.monotonic() - start
        print(f"\n{t.sent} requests in {elapsed:.0f} s ({t.sent / elapsed:.0f} req/s), {os.cpu_count()} CPUs")
        return 0 if all(r[3] for r in rows) else 1
    finally:
        if "s" in CLIENT:
            await CLIENT.pop("s").close()
        await system.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
