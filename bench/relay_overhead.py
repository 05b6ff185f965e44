"""What the relay adds: the same requests sent directly to a trivial upstream
(plain HTTP) and through edge + agent (HTTPS to the edge, WSS tunnel to the
agent: TLS on both legs), all real processes on loopback, keep-alive clients.

Measures, as in issue #2 section 6: latency at concurrency 1 (GET /, POST
100 KB, POST 1 MB; p50/p99 and what the relay adds), closed-loop throughput
(GET at 16/32/64, the POSTs at 32; ratio to direct), large bodies (upload and
download of --mb MB, MB/s), CPU per request of every process, edge RSS/CPU
during the run, and edge RSS with --idle-agents connected idle agents
(simulated in this process). Prints tables with the issue's targets and a
verdict column; asserts nothing, exits 0.

    python bench/relay_overhead.py                       # defaults: ~2-3 min
    python bench/relay_overhead.py --requests 200 --seconds 1 --mb 5 --idle-agents 20
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from bench.procstats import metric, rss_mb, status_mb  # noqa: E402
from tests.harness import Proc, System, make_pki, wait_for  # noqa: E402
from tunnel import Connection, DataReceived, Hello, RequestReceived, ResponseHead, Role  # noqa: E402

KB = 1024
MB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
TIMEOUT = aiohttp.ClientTimeout(total=300)


# ------------------------------------------------------------ process stats
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (the procstats helpers have RSS and FDs)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds() -> tuple[float, float, float]:
    """(process time, interrupt time, steal time) of all CPUs, from /proc/stat.
    Loopback networking runs partly as softirq, which no process is charged with."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system) / CLK_TCK, (irq + softirq) / CLK_TCK, steal / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    return status_mb(pid, "VmHWM")


class CpuMeter:
    """CPU seconds used by each watched process between two marks."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def mark(self) -> None:
        self._start = {n: cpu_seconds(p) for n, p in self.pids.items()}

    def used(self) -> dict[str, float]:
        return {n: cpu_seconds(p) - self._start[n] for n, p in self.pids.items()}


# ----------------------------------------------------------------- requests
@dataclass(frozen=True)
class Shape:
    name: str
    method: str
    path: str
    body: bytes = b""


@dataclass
class Target:
    name: str  # "direct" or "via edge"
    base: str
    headers: dict[str, str]
    ssl: object  # an SSLContext, or False for plain HTTP

    def session(self, connections: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=connections),  # type: ignore[arg-type]
                                     timeout=TIMEOUT)


@dataclass
class Errors:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


async def request(s: aiohttp.ClientSession, t: Target, shape: Shape, errors: Errors) -> bool:
    try:
        async with s.request(shape.method, t.base + shape.path, data=shape.body or None, headers=t.headers) as r:
            await r.read()
            if r.status != 200:
                errors.add(f"{t.name} {shape.name}: HTTP {r.status}")
                return False
            return True
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors.add(f"{t.name} {shape.name}: {exc.__class__.__name__}")
        return False


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    # Nearest rank: the smallest value with at least q of the samples at or below it.
    return sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))]


@dataclass
class Latency:
    p50: float
    p99: float
    cpu_ms_per_req: dict[str, float]


async def latency(targets: list[Target], shape: Shape, n: int, cpu: CpuMeter, errors: Errors) -> dict[str, Latency]:
    """p50/p99 in ms at concurrency 1. Direct and relayed requests alternate
    in blocks so that background load drifts hit both alike."""
    sessions = {t.name: t.session(1) for t in targets}
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu_used: dict[str, dict[str, float]] = {t.name: dict.fromkeys(cpu.pids, 0.0) for t in targets}
    try:
        warm = max(10, n // 10)
        for t in targets:
            for _ in range(warm):
                await request(sessions[t.name], t, shape, errors)
        block = 50
        done = 0
        while done < n:
            k = min(block, n - done)
            for t in targets:
                s = sessions[t.name]
                cpu.mark()
                for _ in range(k):
                    t0 = time.perf_counter()
                    if await request(s, t, shape, errors):
                        samples[t.name].append((time.perf_counter() - t0) * 1000)
                for proc, used in cpu.used().items():
                    cpu_used[t.name][proc] += used
            done += k
    finally:
        for s in sessions.values():
            await s.close()
    out = {}
    for name, ms in samples.items():
        ms.sort()
        per_req = {proc: v * 1000 / max(1, len(ms)) for proc, v in cpu_used[name].items()}
        out[name] = Latency(percentile(ms, 0.50), percentile(ms, 0.99), per_req)
    return out


@dataclass
class Throughput:
    rps: float
    cpu_ms_per_req: dict[str, float]


async def throughput(t: Target, shape: Shape, concurrency: int, seconds: float, cpu: CpuMeter,
                     errors: Errors) -> Throughput:
    """Closed loop: `concurrency` clients each send the next request as soon
    as the previous answer is read. Counts completions in a window after a
    short warm-up (connections and TLS sessions made)."""
    s = t.session(concurrency)
    counting = False
    ok = 0
    stop = False

    async def client() -> None:
        nonlocal ok
        while not stop:
            if await request(s, t, shape, errors) and counting:
                ok += 1

    try:
        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(min(1.0, max(0.3, seconds / 4)))
        counting = True
        cpu.mark()
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        counting = False
        elapsed = time.perf_counter() - t0
        used = cpu.used()
        stop = True
        await asyncio.gather(*tasks)
    finally:
        await s.close()
    return Throughput(ok / elapsed, {k: v * 1000 / max(ok, 1) for k, v in used.items()})


async def large_body(t: Target, size: int, errors: Errors, repeats: int = 2) -> tuple[float, float]:
    """(upload MB/s, download MB/s), best of `repeats`. Upload: POST to a sink
    (/work reads the body, answers a few bytes). Download: the body of an
    /echo answer, timed from its head to its last byte (the upstream reads
    and hashes the whole request before it answers)."""
    body = os.urandom(size)
    digest = hashlib.sha256(body).hexdigest()
    up = down = 0.0
    async with t.session(1) as s:
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                async with s.post(t.base + "/work?ms=0", data=body, headers=t.headers) as r:
                    await r.read()
                    if r.status == 200:
                        up = max(up, size / MB / (time.perf_counter() - t0))
                    else:
                        errors.add(f"{t.name} upload: HTTP {r.status}")
                async with s.post(t.base + "/echo", data=body, headers=t.headers) as r:
                    t1 = time.perf_counter()
                    got = await r.read()
                    t2 = time.perf_counter()
                    if r.status != 200 or len(got) != size or r.headers.get("X-Sha256") != digest:
                        errors.add(f"{t.name} echo: HTTP {r.status}, {len(got)} bytes")
                    elif hashlib.sha256(got).hexdigest() != digest:
                        errors.add(f"{t.name} echo: body differs")
                    else:
                        down = max(down, size / MB / (t2 - t1))
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.add(f"{t.name} large body: {exc.__class__.__name__}")
    return up, down


# --------------------------------------------------------------- idle agents
async def idle_agent(url: str, system: System, agent_id: str, ready: asyncio.Queue[ClientConnection | None]) -> None:
    """A worker that only keeps its tunnel alive: answers pings and the edge's
    health checks, nothing else."""
    try:
        ws = await connect(url, ssl=system.pki.client_ssl(), ping_interval=None, close_timeout=1, compression=None,
                           additional_headers={"Authorization": f"Bearer {system.pki.worker_token}"})
    except (OSError, ConnectionClosed, TimeoutError):
        await ready.put(None)
        return
    conn = Connection(Role.AGENT)
    conn.send_hello(Hello(agent_id, pool="idle", capacity=1))
    try:
        try:
            await ws.send(conn.data_to_send())
        finally:
            # The starter waits on this queue: answer it whatever happens.
            await ready.put(ws)
        async for data in ws:
            for ev in conn.receive_data(data if isinstance(data, bytes) else data.encode()):
                if isinstance(ev, RequestReceived):
                    conn.send_response(ev.stream_id, ResponseHead(200, (("content-length", "2"),)))
                    conn.send_data(ev.stream_id, b"ok", end_stream=True)
                elif isinstance(ev, DataReceived):
                    conn.acknowledge_received(ev.stream_id, len(ev.data))
            out = conn.data_to_send()
            if out:
                await ws.send(out)
    except ConnectionClosed:
        pass
    finally:
        await ws.close()


@dataclass
class IdleResult:
    agents: int
    connected: int
    rss_before: float
    rss_with: float
    connect_seconds: float
    cpu_percent: float


async def idle_agents(system: System, n: int, hold: float) -> IdleResult:
    """A fresh edge (production health-check interval of 2 s) with `n`
    simulated agents connected and idle."""
    edge_proc, edge = await system.edge("edge-idle", None, "--rate-limit", "0", "--check-interval", "2",
                                        "--log-level", "warning")
    await asyncio.sleep(1.0)
    rss_before = rss_mb(edge_proc.pid)
    url = edge.replace("https://", "wss://") + "/_edge/tunnel"
    ready: asyncio.Queue[ClientConnection | None] = asyncio.Queue()
    sem = asyncio.Semaphore(50)
    tasks: list[asyncio.Task[None]] = []

    async def start(i: int) -> None:
        async with sem:
            tasks.append(asyncio.create_task(idle_agent(url, system, f"idle{i}", ready)))
            await ready.get()

    t0 = time.perf_counter()
    await asyncio.gather(*(start(i) for i in range(n)))

    async def tunnels() -> float:
        async with system.http().get(edge + "/_edge/metrics", headers=system.auth()) as r:
            return metric(await r.text(), "edge_tunnels") or 0.0

    async def all_in() -> bool:
        return await tunnels() >= n

    try:
        await wait_for(all_in, 30, f"{n} idle tunnels")
    except AssertionError:
        pass
    connect_seconds = time.perf_counter() - t0
    cpu0, w0 = cpu_seconds(edge_proc.pid), time.perf_counter()
    await asyncio.sleep(hold)
    cpu_percent = (cpu_seconds(edge_proc.pid) - cpu0) / (time.perf_counter() - w0) * 100
    connected = int(await tunnels())
    rss_with = rss_mb(edge_proc.pid)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    edge_proc.stop()
    return IdleResult(n, connected, rss_before, rss_with, connect_seconds, cpu_percent)


# -------------------------------------------------------------------- table
@dataclass
class Row:
    name: str
    direct: str
    edge: str
    added: str
    target: str = ""
    verdict: str = ""


def judged(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "MISSED")


def print_table(rows: list[Row]) -> None:
    head = Row("measurement", "direct", "via edge", "added", "target (issue #2 s.6)", "verdict")
    widths = [max(len(getattr(r, f)) for r in [head, *rows]) for f in ("name", "direct", "edge", "added", "target")]
    for r in [head, *rows]:
        cells = (r.name, r.direct, r.edge, r.added, r.target)
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + r.verdict)


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min)"


T = TypeVar("T")


async def phase(what: str, coro: Awaitable[T]) -> T:
    t0 = time.perf_counter()
    print(f"  {what} ...", end="", flush=True)
    out = await coro
    print(f" {time.perf_counter() - t0:.1f} s", flush=True)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000,
                    help="GET requests per target at concurrency 1 (POST 100 KB: a quarter, POST 1 MB: a tenth)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per throughput point")
    ap.add_argument("--mb", type=int, default=100, help="size of the large upload/download in MB")
    ap.add_argument("--idle-agents", type=int, default=1000, help="simulated idle agents for the RSS figure (0: skip)")
    ap.add_argument("--idle-hold", type=float, default=5.0, help="seconds the idle agents stay before sampling")
    a = ap.parse_args()

    started = time.perf_counter()
    print(f"{os.cpu_count()} CPUs, {load_note()} at start", flush=True)
    work = Path(tempfile.mkdtemp(prefix="relay-overhead-"))
    system = System(make_pki(work / "pki"), work)
    errors = Errors()
    shapes = {
        "GET /": Shape("GET /", "GET", "/"),
        "POST 100 KB": Shape("POST 100 KB", "POST", "/work?ms=0", os.urandom(100 * KB)),
        "POST 1 MB": Shape("POST 1 MB", "POST", "/work?ms=0", os.urandom(MB)),
    }
    counts = {"GET /": a.requests, "POST 100 KB": max(20, a.requests // 4), "POST 1 MB": max(20, a.requests // 10)}
    points = [("GET /", 16), ("GET /", 32), ("GET /", 64), ("POST 100 KB", 32), ("POST 1 MB", 32)]
    try:
        up_proc, up = await system.upstream("upstream")
        edge_proc, edge = await system.edge("edge", None, "--rate-limit", "0", "--log-level", "warning",
                                            "--max-body", str(a.mb * MB + MB), "--check-interval", "2")
        agent_proc: Proc = system.agent("agent", edge, up, "--log-level", "warning", capacity=64)
        await system.wait_available(edge, ["agent"])
        await asyncio.sleep(1.0)
        edge_rss_idle = rss_mb(edge_proc.pid)
        pids = {"client (this process)": os.getpid(), "upstream": up_proc.pid, "agent": agent_proc.pid,
                "edge": edge_proc.pid}
        cpu = CpuMeter(pids)
        direct = Target("direct", up, system.auth(), False)
        relayed = Target("via edge", edge, system.auth(), system.pki.client_ssl())
        targets = [direct, relayed]
        traffic_cpu0 = cpu_seconds(edge_proc.pid)
        ours0, machine0 = sum(cpu_seconds(p) for p in pids.values()), machine_cpu_seconds()
        traffic_t0 = time.perf_counter()

        lat: dict[str, dict[str, Latency]] = {}
        for name, shape in shapes.items():
            lat[name] = await phase(f"latency {name} x{counts[name]} per target, concurrency 1",
                                    latency(targets, shape, counts[name], cpu, errors))
        thr: dict[tuple[str, int, str], Throughput] = {}
        for name, c in points:
            for t in targets:
                thr[(name, c, t.name)] = await phase(
                    f"throughput {name} concurrency {c} {t.name}, {a.seconds:g} s",
                    throughput(t, shapes[name], c, a.seconds, cpu, errors))
        big: dict[str, tuple[float, float]] = {}
        for t in targets:
            big[t.name] = await phase(f"{a.mb} MB upload and download {t.name}",
                                      large_body(t, a.mb * MB, errors))
        traffic_seconds = time.perf_counter() - traffic_t0
        edge_cpu_percent = (cpu_seconds(edge_proc.pid) - traffic_cpu0) / traffic_seconds * 100
        # Anything else running (other test suites, model inference) competes
        # for the same CPUs: say how much of them it took.
        ours = sum(cpu_seconds(p) for p in pids.values()) - ours0
        machine = [b - a for a, b in zip(machine0, machine_cpu_seconds(), strict=True)]
        others_percent = max(0.0, machine[0] - ours) / traffic_seconds * 100
        irq_percent, steal_percent = (x / traffic_seconds * 100 for x in machine[1:])
        edge_rss_end, edge_rss_peak = rss_mb(edge_proc.pid), peak_rss_mb(edge_proc.pid)
        load_after_traffic = load_note()
        # The idle-agent figure wants a fresh edge and the CPUs to itself.
        for p in (agent_proc, edge_proc, up_proc):
            p.stop()
        idle: IdleResult | None = None
        if a.idle_agents > 0:
            idle = await phase(f"{a.idle_agents} idle agents on a fresh edge",
                               idle_agents(system, a.idle_agents, a.idle_hold))
    finally:
        await system.close()

    # ------------------------------------------------------------- report
    lat_targets = {("GET /", "p50"): 0.5, ("POST 100 KB", "p50"): 1.0, ("POST 1 MB", "p50"): 6.0,
                   ("GET /", "p99"): 3.0, ("POST 100 KB", "p99"): 3.0}
    ratio_targets = {("GET /", 32): 0.25, ("POST 100 KB", 32): 0.30, ("POST 1 MB", 32): 0.40}
    rows: list[Row] = []
    for name in shapes:
        for q in ("p50", "p99"):
            d, e = getattr(lat[name]["direct"], q), getattr(lat[name]["via edge"], q)
            goal = lat_targets.get((name, q))
            rows.append(Row(f"{name} latency {q} ms (c=1)", f"{d:.2f}", f"{e:.2f}", f"+{e - d:.2f} ms",
                            f"added <= {goal:g} ms" if goal is not None else "",
                            judged(None if goal is None else e - d <= goal)))
    for name, c in points:
        d_t, e_t = thr[(name, c, "direct")].rps, thr[(name, c, "via edge")].rps
        ratio = e_t / d_t if d_t else float("nan")
        goal = ratio_targets.get((name, c))
        rows.append(Row(f"{name} req/s (c={c}, closed loop)", f"{d_t:.0f}", f"{e_t:.0f}", f"{ratio:.2f}x",
                        f"ratio >= {goal:g}" if goal is not None else "",
                        judged(None if goal is None else ratio >= goal)))
    for i, what in enumerate(("upload", "download")):
        d_b, e_b = big["direct"][i], big["via edge"][i]
        ratio = e_b / d_b if d_b else float("nan")
        rows.append(Row(f"{a.mb} MB {what} MB/s (best of 2)", f"{d_b:.0f}", f"{e_b:.0f}", f"{ratio:.2f}x"))
    rows.append(Row("edge RSS MB: idle / end / peak (VmHWM)", "", f"{edge_rss_idle:.0f} / {edge_rss_end:.0f} / "
                    f"{edge_rss_peak:.0f}", ""))
    rows.append(Row("edge CPU % over the traffic phases", "", f"{edge_cpu_percent:.0f}", ""))
    if idle is not None:
        rows.append(Row(f"edge RSS MB with {idle.agents} idle agents", "", f"{idle.rss_with:.0f}",
                        f"+{idle.rss_with - idle.rss_before:.0f} over empty", "<= 150 MB",
                        judged(idle.rss_with <= 150 and idle.connected >= idle.agents)))
    else:
        rows.append(Row("edge RSS MB with 1000 idle agents", "", "-", "", "<= 150 MB", "not measured"))
    print()
    print_table(rows)

    print(f"\nWhere the time goes: CPU ms per request by process ({os.cpu_count()} CPUs; at c=1 compare the "
          f"total with the p50 above, the rest is waiting):")
    names = list(pids)
    print(f"{'point':<34} " + " ".join(f"{n:>21}" for n in names) + f" {'total':>7}")
    for name in shapes:
        for c in (1, 32):
            for t in targets:
                used = lat[name][t.name].cpu_ms_per_req if c == 1 else thr[(name, c, t.name)].cpu_ms_per_req
                print(f"{f'{name} c={c} {t.name}':<34} " + " ".join(f"{used[n]:>21.3f}" for n in names)
                      + f" {sum(used.values()):>7.3f}")
    if idle is not None:
        print(f"\nidle agents: {idle.connected}/{idle.agents} tunnels up after {idle.connect_seconds:.1f} s; edge RSS "
              f"{idle.rss_before:.0f} MB empty -> {idle.rss_with:.0f} MB; edge CPU {idle.cpu_percent:.0f}% while idle "
              f"(heartbeats every 1 s, health checks every 2 s per agent)")
    if errors.counts:
        print("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(errors.counts.items())))
    else:
        print("errors: none")
    print(f"\ndirect = plain HTTP to the upstream; via edge = HTTPS + WSS tunnel (TLS on both legs); agent capacity 64;"
          f"\nduring the traffic phases, in % of one CPU: other processes {others_percent:.0f}, interrupts "
          f"(loopback networking) {irq_percent:.0f}, steal {steal_percent:.0f};"
          f"\n{load_after_traffic} after them; {load_note()} at the end; "
          f"total {time.perf_counter() - started:.0f} s")
    return 0


def run() -> int:
    return asyncio.run(main())


if __name__ == "__main__":
    sys.exit(run())
