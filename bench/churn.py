"""Churn: 1,000 agent connect/disconnect cycles against a real edge while
traffic flows: clean close (GOAWAY), abrupt kill (socket aborted), and
half-open (the agent simply stops answering and reading is all it does).

Promises: the edge's asyncio tasks and open FDs return to their baseline and
its RSS stays within 10% of it; no request is routed to a half-open agent
after its heartbeat deadline (dead_after + 0.5 s). Prints a verdict table,
exits 1 if a promise is broken.

    python bench/churn.py --cycles 1000 --parallel 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from bench.procstats import fds, grown, heap_trims, labelled, metric, rss_mb  # noqa: E402
from tests.harness import System, make_pki, wait_for  # noqa: E402
from tunnel import Connection, DataReceived, Hello, RequestReceived, ResponseHead, Role  # noqa: E402

DEAD_AFTER = 3.0
MODES = ("clean", "kill", "halfopen")


class Results:
    def __init__(self) -> None:
        self.cycles = {m: 0 for m in MODES}
        self.failed_connects = 0
        self.late_routed = 0  # requests that reached a half-open agent after its deadline
        self.served = 0


async def fake_agent(url: str, system: System, agent_id: str, life: float, mode: str, res: Results) -> None:
    ctx = system.pki.client_ssl()
    try:
        ws = await connect(url, ssl=ctx, additional_headers={"Authorization": f"Bearer {system.pki.worker_token}"},
                           ping_interval=None, close_timeout=1, compression=None)
    except (OSError, ConnectionClosed, TimeoutError):
        res.failed_connects += 1
        return
    conn = Connection(Role.AGENT)
    conn.send_hello(Hello(agent_id, pool="churn", capacity=4))
    try:
        await ws.send(conn.data_to_send())
        deadline = time.monotonic() + life
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, RequestReceived):
                    conn.send_response(ev.stream_id, ResponseHead(200, (("content-length", "2"),)))
                    conn.send_data(ev.stream_id, b"ok", end_stream=True)
                    res.served += 1
                elif isinstance(ev, DataReceived):
                    conn.acknowledge_received(ev.stream_id, len(ev.data))
            out = conn.data_to_send()
            if out:
                await ws.send(out)
        res.cycles[mode] += 1
        if mode == "clean":
            conn.goaway()
            await ws.send(conn.data_to_send())
            await ws.close()
        elif mode == "kill":
            ws.transport.abort()
        else:
            died = time.monotonic()
            # Keep the socket, answer nothing; only watch what still arrives.
            end = died + DEAD_AFTER + 2.0
            while (left := end - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(ws.recv(), left)
                except (TimeoutError, ConnectionClosed):
                    break
                if time.monotonic() - died > DEAD_AFTER + 0.5 and data[:1] == b"\x03":
                    res.late_routed += 1
            ws.transport.abort()
    except ConnectionClosed:
        res.cycles[mode] += 1


async def anchor(url: str, system: System, stop: asyncio.Event) -> None:
    """One fake agent that stays: the churn pool always has somewhere to go."""
    res = Results()
    while not stop.is_set():
        await fake_agent(url, system, "anchor", 5.0, "clean", res)


async def edge_sample(system: System, edge: str, pid: int) -> tuple[dict[str, float], str]:
    """The edge's figures, and its metrics text for anything else."""
    async with system.http().get(edge + "/_edge/metrics", headers=system.auth()) as r:
        text = await r.text()
    return {"tasks": metric(text, "edge_asyncio_tasks") or 0, "tunnels": metric(text, "edge_tunnels") or 0,
            "blocks": metric(text, "edge_python_allocated_blocks") or 0, "fds": fds(pid), "rss": rss_mb(pid)}, text


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--warmup-cycles", type=int, default=200,
                    help="cycles run before the baseline is taken, so allocator and TLS caches reach their "
                         "working size and only growth beyond it counts")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="churn-"))
    system = System(make_pki(work / "pki"), work)
    stop = asyncio.Event()
    try:
        edge_proc, edge = await system.edge("edge", None, "--rate-limit", "0", "--dead-after", str(DEAD_AFTER))
        url = edge.replace("https://", "wss://") + "/_edge/tunnel"
        anchor_task = asyncio.create_task(anchor(url, system, stop))

        async def anchored() -> bool:
            return "anchor" in await system.workers(edge)

        await wait_for(anchored, 10, "the anchor agent")
        # Warm up with the same kind of churn before the baseline.
        res = Results()
        warm_sem = asyncio.Semaphore(a.parallel)

        async def warm(i: int) -> None:
            async with warm_sem:
                await fake_agent(url, system, f"warm{i}", rng.uniform(0.1, 0.8), MODES[i % 3], res)

        await asyncio.gather(*(warm(i) for i in range(max(6, a.warmup_cycles))))
        await asyncio.sleep(DEAD_AFTER + 1)
        base, text = await edge_sample(system, edge, edge_proc.pid)
        base_tasks = labelled(text, "edge_asyncio_tasks_by_coroutine")
        print(f"baseline: {base}", flush=True)
        print(f"baseline tasks by coroutine: {base_tasks}", flush=True)

        traffic = {"ok": 0, "err": 0}

        async def client() -> None:
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=system.pki.client_ssl(), limit=8))
            try:
                while not stop.is_set():
                    try:
                        async with http.get(edge + "/", headers={**system.auth(), "X-Pool": "churn"}) as r:
                            await r.read()
                            traffic["ok" if r.status == 200 else "err"] += 1
                    except aiohttp.ClientError:
                        traffic["err"] += 1
                    await asyncio.sleep(0.02)
            finally:
                await http.close()

        clients = [asyncio.create_task(client()) for _ in range(2)]
        res = Results()
        sem = asyncio.Semaphore(a.parallel)
        started = time.monotonic()

        async def cycle(i: int) -> None:
            async with sem:
                await fake_agent(url, system, f"churn{i}", rng.uniform(0.1, 0.8), MODES[i % 3], res)
                if i % 100 == 99:
                    s, _ = await edge_sample(system, edge, edge_proc.pid)
                    print(f"  {i + 1} cycles, {time.monotonic() - started:.0f} s, edge RSS {s['rss']:.1f} MB, "
                          f"Python blocks {s['blocks']:.0f}", flush=True)

        await asyncio.gather(*(cycle(i) for i in range(a.cycles)))
        stop.set()
        await asyncio.gather(*clients)
        anchor_task.cancel()
        await asyncio.gather(anchor_task, return_exceptions=True)

        async def settled() -> bool:
            s, _ = await edge_sample(system, edge, edge_proc.pid)
            return s["tunnels"] == 0 and s["tasks"] <= base["tasks"] - base["tunnels"] * 3 + 2

        try:
            await wait_for(settled, DEAD_AFTER + 10, "the edge to settle")
        except AssertionError:
            pass
        after, text = await edge_sample(system, edge, edge_proc.pid)
        after_tasks = labelled(text, "edge_asyncio_tasks_by_coroutine")
        # Tasks of sessions and their tunnels must go with them (a lost
        # cancellation once kept a health-check loop alive).
        tunnel_tasks = sum(n for name, n in after_tasks.items() if name.startswith(("EdgeSession.", "TunnelIO.")))
        # The baseline had the anchor's tunnel open (a handful of tasks and 1 FD); it is gone now.
        rows = [
            ("cycles (clean/kill/half-open)", "/".join(str(res.cycles[m]) for m in MODES), f"{a.cycles}",
             sum(res.cycles.values()) == a.cycles),
            ("failed connects", str(res.failed_connects), "0", res.failed_connects == 0),
            ("edge asyncio tasks", f"{base['tasks']:.0f} -> {after['tasks']:.0f}", "<= baseline",
             after["tasks"] <= base["tasks"]),
            ("edge tasks that grew, by coroutine", grown(base_tasks, after_tasks), "(info)", True),
            ("edge tunnel tasks left once every tunnel closed", f"{tunnel_tasks:.0f}", "0", tunnel_tasks == 0),
            ("edge open FDs", f"{base['fds']:.0f} -> {after['fds']:.0f}", "<= baseline", after["fds"] <= base["fds"]),
            ("edge RSS MB", f"{base['rss']:.1f} -> {after['rss']:.1f}", "within 10%",
             after["rss"] <= base["rss"] * 1.10),
            ("edge heap trims (malloc_trim)", heap_trims(text), "(info)", True),
            ("edge Python blocks in use", f"{base['blocks']:.0f} -> {after['blocks']:.0f}", "(info)", True),
            ("edge tunnels", f"{base['tunnels']:.0f} -> {after['tunnels']:.0f}", "0 at the end", after["tunnels"] == 0),
            ("requests routed to a half-open agent past its deadline", str(res.late_routed), "0", res.late_routed == 0),
            ("traffic during churn (200 / other)", f"{traffic['ok']} / {traffic['err']}", "(info)", True),
        ]
        print(f"\n{'check':<56} {'measured':<22} {'promise':<14} verdict")
        for name, measured, promise, ok in rows:
            print(f"{name:<56} {measured:<22} {promise:<14} {'ok' if ok else 'BROKEN'}")
        print(f"\n{a.cycles} cycles in {time.monotonic() - started:.0f} s, {a.parallel} at a time")
        return 0 if all(r[3] for r in rows) else 1
    finally:
        stop.set()
        await system.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
