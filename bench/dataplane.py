"""The data plane's cost per request (issue #16): the same aiohttp upstream
(tests/relay/upstream.py) reached directly (plain HTTP), through nginx with
TLS to the client (when nginx is installed; one process, keep-alive to the
upstream), and through this project (HTTPS to the edge, WSS tunnel to one
agent, the agent's HTTP call to the upstream: TLS on both legs).

For GET /, POST 100 KB and POST 1 MB (to the sink /work?ms=0):
- added p50 / p99 over direct at concurrency 1, from our own keep-alive
  client, direct and proxied requests alternating in blocks;
- throughput at concurrency 32 as a ratio to direct, from `wrk` (a C load
  generator, so the client is not the bottleneck; POST bodies via a small
  Lua script);
- CPU per request of the proxy processes (edge and agent; nginx), from
  /proc/PID/stat utime + stime over each wrk run.

Other work shares this machine's CPUs, so the whole sequence runs in
--rounds interleaved rounds and every figure is the median over them.
Prints the issue's table and a verdict per target; asserts nothing, exits 0
(also when wrk is missing: one line says so).

    python bench/dataplane.py                      # 3 rounds, ~3 min on 2 cores
    python bench/dataplane.py --rounds 1 --seconds 2 --requests 200
    python bench/dataplane.py --processes 1,2      # + GET at c=64 with edge-proxy serve --processes N
    python bench/dataplane.py --processes 1,2 --processes-only --agents 1,2   # only that, with 1 and 2 agents

For --processes, each point is a fresh edge (`--processes N`) and K agents
(`--agents`, each its own id and process, capacity 128) that have reached
every edge process; wrk runs GET at c=64 (64 connections, which the kernel
spreads over the edge processes), and the CPU per request is summed over the
edge's processes (the supervisor idles) and the agents.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.relay_overhead import cpu_seconds, machine_cpu_seconds, percentile  # noqa: E402
from tests.harness import Proc, System, free_port, make_pki, wait_for  # noqa: E402

KB = 1024
MB = 1024 * 1024
WRK = shutil.which("wrk")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@dataclass(frozen=True)
class Shape:
    name: str
    method: str
    path: str
    size: int = 0


SHAPES = [Shape("GET", "GET", "/"), Shape("100 KB", "POST", "/work?ms=0", 100 * KB),
          Shape("1 MB", "POST", "/work?ms=0", MB)]


@dataclass
class Target:
    name: str  # direct, nginx, relay
    base: str
    ssl: object  # SSLContext or False
    pids: dict[str, int]  # the proxy processes whose CPU counts (none for direct)


@dataclass
class Samples:
    """Per (target, shape): one value per round."""

    p50: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    p99: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    rps: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)  # (target, shape, process) -> us/req
    errors: list[str] = field(default_factory=list)
    spread: dict[str, str] = field(default_factory=dict)  # --processes point -> requests served per edge process

    @staticmethod
    def add(d: dict, key: tuple, value: float) -> None:  # type: ignore[type-arg]
        d.setdefault(key, []).append(value)


def med(values: list[float] | None) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------ clients
async def latency(targets: list[Target], shape: Shape, n: int, auth: dict[str, str], out: Samples) -> None:
    """c=1, one keep-alive connection per target, targets alternating in blocks of 25."""
    body = os.urandom(shape.size) if shape.size else None
    sessions = {t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=t.ssl, limit=1))  # type: ignore[arg-type]
                for t in targets}
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for t in targets:  # warm-up: connection, TLS, first-request costs
            for _ in range(5):
                await _one(sessions[t.name], t, shape, body, auth, out)
        done = 0
        while done < n:
            block = min(25, n - done)
            for t in targets:
                s = sessions[t.name]
                for _ in range(block):
                    t0 = time.perf_counter()
                    ok = await _one(s, t, shape, body, auth, out)
                    if ok:
                        times[t.name].append((time.perf_counter() - t0) * 1000)
            done += block
    finally:
        for s in sessions.values():
            await s.close()
    for name, ms in times.items():
        ms.sort()
        out.add(out.p50, (name, shape.name), percentile(ms, 0.50))
        out.add(out.p99, (name, shape.name), percentile(ms, 0.99))


async def _one(s: aiohttp.ClientSession, t: Target, shape: Shape, body: bytes | None, auth: dict[str, str],
               out: Samples) -> bool:
    try:
        async with s.request(shape.method, t.base + shape.path, data=body, headers=auth) as r:
            await r.read()
            if r.status == 200:
                return True
            out.errors.append(f"{t.name} {shape.name}: HTTP {r.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.errors.append(f"{t.name} {shape.name}: {exc.__class__.__name__}")
    return False


def lua_script(work: Path, shape: Shape) -> Path | None:
    if not shape.size:
        return None
    path = work / f"post-{shape.size}.lua"
    path.write_text(f'wrk.method = "POST"\nwrk.body = string.rep("x", {shape.size})\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


def wrk(t: Target, shape: Shape, concurrency: int, seconds: float, script: Path | None, auth: dict[str, str],
        out: Samples, label: str | None = None) -> float:
    """One wrk run; records req/s and CPU per request of the target's processes. Returns req/s."""
    # wrk takes whole seconds only.
    args = [WRK or "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-H", f"Authorization: {auth['Authorization']}"]
    if script is not None:
        args += ["-s", str(script)]
    args.append(t.base + shape.path)
    cpu0 = {n: cpu_seconds(p) for n, p in t.pids.items()}
    res = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    used = {n: cpu_seconds(p) - cpu0[n] for n, p in t.pids.items()}
    m = re.search(r"(\d+) requests in ([0-9.]+)s", res.stdout)
    if res.returncode != 0 or m is None:
        out.errors.append(f"wrk {t.name} {shape.name}: {res.stderr.strip() or res.stdout.strip()}")
        return float("nan")
    n, secs = int(m.group(1)), float(m.group(2))
    if bad := re.search(r"Non-2xx or 3xx responses: (\d+)", res.stdout):
        out.errors.append(f"wrk {t.name} {shape.name}: {bad.group(1)} non-2xx answers")
    if sock := re.search(r"Socket errors: (.*)", res.stdout):
        out.errors.append(f"wrk {t.name} {shape.name}: socket errors {sock.group(1)}")
    rps = n / secs
    key = label or shape.name
    out.add(out.rps, (t.name, key), rps)
    for name, s in used.items():
        out.add(out.cpu, (t.name, key, name), s / max(1, n) * 1e6)
    return rps


# ------------------------------------------------------------------ servers
def start_nginx(work: Path, cert: Path, key: str, upstream_port: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
error_log {work}/nginx-error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    client_max_body_size 4m;
    client_body_buffer_size 2m;
    keepalive_requests 1000000;
    upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    p = subprocess.Popen([NGINX or "nginx", "-c", str(conf), "-p", str(work)], stdout=subprocess.DEVNULL,
                         stderr=open(work / "nginx-stderr.log", "wb"))
    return p, f"https://127.0.0.1:{port}"


async def up(url: str, ssl: object, timeout: float = 15) -> None:
    async def ok() -> bool:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as s:  # type: ignore[arg-type]
            async with s.get(url + "/healthz") as r:
                return r.status == 200

    await wait_for(ok, timeout, f"{url} to answer")


# ------------------------------------------------------------------ report
TARGETS = {  # issue #16: c=1 added p50 (ms), c=32 ratio, p99 added (ms)
    "GET": (0.40, 0.25, 1.5), "100 KB": (0.80, 0.30, 1.5), "1 MB": (4.0, 0.40, None)}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(s: Samples, names: list[str], proxies: dict[str, list[str]], processes: list[int],
           agents: list[int]) -> None:
    if names:
        table(s, names, proxies)
    if processes:
        print(f"\nGET at c=64 (wrk, {len(s.rps.get(('direct', 'GET c=64'), []))} runs each, medians); direct "
              f"{med(s.rps.get(('direct', 'GET c=64'))):,.0f}/s")
        print("\n| edge processes | agents | GET/s | x N=1 | edge CPU/GET | agents CPU/GET | spread over processes |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for k in agents:
            base = med(s.rps.get(("relay", f"GET c=64 N={processes[0]} A={k}")))
            for n in processes:
                key = f"GET c=64 N={n} A={k}"
                rps = med(s.rps.get(("relay", key)))
                print(f"| {n} | {k} | {rps:,.0f} | {rps / base:.2f} | {cpu(s, 'relay', key, ['edge']):,.0f} us | "
                      f"{cpu(s, 'relay', key, ['agents']):,.0f} us | {s.spread.get(key, '-')} |")


def table(s: Samples, names: list[str], proxies: dict[str, list[str]]) -> None:
    shapes = [sh.name for sh in SHAPES]
    head = (["", *[f"{sh} +p50" for sh in shapes], *[f"{sh} +p99" for sh in shapes[:2]],
             *[f"{sh} ratio" for sh in shapes], *[f"CPU/{sh}" for sh in shapes]])
    print("\n| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for name in names:
        if name == "direct":
            cells = [f"{med(s.p50.get(('direct', sh))):.2f} ms" for sh in shapes]
            cells += [f"{med(s.p99.get(('direct', sh))):.2f} ms" for sh in shapes[:2]]
            cells += [f"{med(s.rps.get(('direct', sh))):,.0f}/s" for sh in shapes]
            cells += ["-"] * 3
            print("| direct (absolute) | " + " | ".join(cells) + " |")
            continue
        cells = [f"+{med(s.p50.get((name, sh))) - med(s.p50.get(('direct', sh))):.2f} ms" for sh in shapes]
        cells += [f"+{med(s.p99.get((name, sh))) - med(s.p99.get(('direct', sh))):.2f} ms" for sh in shapes[:2]]
        cells += [f"{ratio(s, name, sh):.2f}x" for sh in shapes]
        cells += [f"{cpu(s, name, sh, proxies[name]):,.0f} us" for sh in shapes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "relay" in names:
        print("\nCPU per request, relay by process (us, c=32):")
        for sh in shapes:
            parts = ", ".join(f"{p} {cpu(s, 'relay', sh, [p]):,.0f}" for p in proxies["relay"])
            print(f"  {sh}: {parts}")
        print("\nissue #16 targets (medians):")
        for sh in shapes:
            p50_t, ratio_t, p99_t = TARGETS[sh]
            added = med(s.p50.get(("relay", sh))) - med(s.p50.get(("direct", sh)))
            print(f"  {sh:7} +p50 {added:6.2f} ms <= {p50_t:g}: {verdict(added <= p50_t)};"
                  f"  ratio {ratio(s, 'relay', sh):.2f} >= {ratio_t:g}: {verdict(ratio(s, 'relay', sh) >= ratio_t)}")
            if p99_t is not None:
                added99 = med(s.p99.get(("relay", sh))) - med(s.p99.get(("direct", sh)))
                print(f"  {sh:7} +p99 {added99:6.2f} ms <= {p99_t:g}: {verdict(added99 <= p99_t)}")
        c1 = cpu(s, "relay", "1 MB", proxies["relay"])
        print(f"  CPU per 1 MB {c1:,.0f} us <= 4,000: {verdict(c1 <= 4000)}")
        e, a = cpu(s, "relay", "GET", ["edge"]), cpu(s, "relay", "GET", ["agent"])
        print(f"  edge CPU per GET {e:,.0f} us <= 150: {verdict(e <= 150)}; agent CPU per GET {a:,.0f} us <= 60: "
              f"{verdict(a <= 60)}")


def ratio(s: Samples, name: str, shape: str) -> float:
    return med(s.rps.get((name, shape))) / med(s.rps.get(("direct", shape)))


def cpu(s: Samples, name: str, shape: str, procs: list[str]) -> float:
    return sum(med(s.cpu.get((name, shape, p))) for p in procs)


# ------------------------------------------------------------------ main
async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    ap.add_argument("--requests", type=int, default=400,
                    help="GET requests per target per round at c=1 (100 KB: half, 1 MB: a fifth)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per wrk run (whole seconds, at least 1)")
    ap.add_argument("--no-nginx", action="store_true", help="skip the nginx reference row")
    ap.add_argument("--processes", default="", help="comma-separated edge process counts for GET at c=64 "
                    "(edge-proxy serve --processes N), e.g. 1,2")
    ap.add_argument("--agents", default="1", help="comma-separated agent counts for each --processes point")
    ap.add_argument("--processes-only", action="store_true",
                    help="only the --processes points (and direct GET at c=64), not the issue's table")
    a = ap.parse_args()
    if WRK is None:
        print("bench/dataplane.py: skipped, `wrk` is not installed (apt-get install wrk)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="dataplane-"))
    system = System(make_pki(work / "pki"), work)
    auth = system.auth()
    nginx: subprocess.Popen[bytes] | None = None
    s = Samples()
    t_start = time.perf_counter()
    ours0, machine0 = 0.0, machine_cpu_seconds()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; {a.rounds} interleaved rounds, "
          "medians", flush=True)
    try:
        up_proc, upstream = await system.upstream("upstream")
        edge_proc, edge = await system.edge("edge", None, "--rate-limit", "0", "--log-level", "warning",
                                            "--max-body", str(4 * MB), "--check-interval", "2")
        agent_proc: Proc = system.agent("agent", edge, upstream, "--log-level", "warning", capacity=128)
        await system.wait_available(edge, ["agent"])
        targets = [Target("direct", upstream, False, {}),
                   Target("relay", edge, system.pki.client_ssl(), {"edge": edge_proc.pid, "agent": agent_proc.pid})]
        proxies = {"relay": ["edge", "agent"]}
        if NGINX and not a.no_nginx:
            nginx, nurl = start_nginx(work, system.pki.cert, str(system.pki.key), int(upstream.rsplit(":", 1)[1]))
            await up(nurl, system.pki.client_ssl())
            targets.insert(1, Target("nginx", nurl, system.pki.client_ssl(), {"nginx": nginx.pid}))
            proxies["nginx"] = ["nginx"]
        else:
            print("nginx not installed (or --no-nginx): no reference row")
        pids = [up_proc.pid, edge_proc.pid, agent_proc.pid, os.getpid()] + ([nginx.pid] if nginx else [])
        ours0 = sum(cpu_seconds(p) for p in pids)
        scripts = {sh.name: lua_script(work, sh) for sh in SHAPES}
        counts = {"GET": a.requests, "100 KB": max(20, a.requests // 2), "1 MB": max(20, a.requests // 5)}
        for r in range(0 if a.processes_only else a.rounds):
            order = targets[r % len(targets):] + targets[: r % len(targets)]
            for sh in SHAPES:
                print(f"round {r + 1}: {sh.name} c=1 x{counts[sh.name]} per target", flush=True)
                await latency(order, sh, counts[sh.name], auth, s)
                for t in order:
                    print(f"round {r + 1}: {sh.name} wrk c=32 {t.name}", flush=True)
                    await asyncio.to_thread(wrk, t, sh, 32, a.seconds, scripts[sh.name], auth, s)
        processes = [int(x) for x in a.processes.split(",") if x.strip()]
        agents = [int(x) for x in a.agents.split(",") if x.strip()]
        if processes:
            edge_proc.stop()  # the table's edge and agent idle, but leave the cores to the points
            agent_proc.stop()
            for _ in range(a.rounds):
                await asyncio.to_thread(wrk, targets[0], SHAPES[0], 64, a.seconds, None, auth, s, "GET c=64")
            for k in agents:
                for n in processes:
                    await processes_point(system, upstream, n, k, a, auth, s)
        names = [t.name for t in targets] if not a.processes_only else []
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        await system.close()
    secs = time.perf_counter() - t_start
    ours = 0.0
    try:
        ours = sum(cpu_seconds(p) for p in pids) - ours0
    except (OSError, NameError):
        pass
    others = max(0.0, machine_cpu_seconds()[0] - machine0[0] - ours)
    report(s, names, proxies, processes, agents if processes else [])
    print(f"\nerrors: {', '.join(sorted(set(s.errors))) or 'none'}")
    print(f"other processes used about {others / secs * 100:.0f}% of one CPU during the {secs:.0f} s run "
          f"(from /proc/stat; wrk and exited processes count there too); load average {os.getloadavg()[0]:.2f} "
          "at the end")
    return 0


async def processes_point(system: System, upstream: str, n: int, k: int, a: argparse.Namespace,
                          auth: dict[str, str], s: Samples) -> None:
    """GET at c=64 through an edge started with --processes n and k agents
    (fresh ones), once every agent holds a tunnel to every edge process."""
    edge_proc, edge = await system.edge(f"edge-n{n}-a{k}", None, "--rate-limit", "0", "--log-level", "warning",
                                        "--check-interval", "2", "--processes", str(n))
    names = [f"agent-n{n}-a{k}-{i}" for i in range(k)]
    agent_procs = [system.agent(name, edge, upstream, "--log-level", "warning", capacity=128) for name in names]
    key = f"GET c=64 N={n} A={k}"
    print(f"{key}: starting", flush=True)
    try:
        await system.wait_available(edge, names)
        workers: dict[str, dict[str, object]] = {}

        async def everywhere() -> bool:
            nonlocal workers
            workers = await system.workers(edge)
            if n == 1:
                return True
            return all(len(workers[name].get("processes", {})) == n for name in names)  # type: ignore[arg-type]

        await wait_for(everywhere, 60, lambda: f"agents at every edge process: {workers}")
        pids = sorted({int(p["pid"]) for w in workers.values()  # type: ignore[union-attr]
                       for p in w.get("processes", {}).values()}) or [edge_proc.pid]  # type: ignore[union-attr]
        served0 = await served_by_process(system, edge, names)
        edge_cpu = sum(cpu_seconds(p) for p in pids)
        agents_cpu = sum(cpu_seconds(p.pid) for p in agent_procs)
        t = Target("relay", edge, system.pki.client_ssl(), {})
        n_req = 0.0
        for _ in range(a.rounds):
            rps = await asyncio.to_thread(wrk, t, SHAPES[0], 64, a.seconds, None, auth, s, key)
            n_req += rps * max(1, round(a.seconds))
        edge_cpu = sum(cpu_seconds(p) for p in pids) - edge_cpu
        agents_cpu = sum(cpu_seconds(p.pid) for p in agent_procs) - agents_cpu
        s.add(s.cpu, ("relay", key, "edge"), edge_cpu / max(1.0, n_req) * 1e6)
        s.add(s.cpu, ("relay", key, "agents"), agents_cpu / max(1.0, n_req) * 1e6)
        served1 = await served_by_process(system, edge, names)
        spread = {p: served1.get(p, 0) - served0.get(p, 0) for p in served1}
        total = max(1, sum(spread.values()))
        s.spread[key] = " / ".join(f"{100 * spread[p] / total:.0f}%" for p in sorted(spread)) if n > 1 else "-"
    finally:
        for p in agent_procs:
            p.stop()
        edge_proc.stop()


async def served_by_process(system: System, edge: str, names: list[str]) -> dict[str, int]:
    """Requests each edge process has passed to these workers so far (merged /_edge/workers)."""
    workers = await system.workers(edge)
    out: dict[str, int] = {}
    for name in names:
        for proc, part in (workers.get(name, {}).get("processes") or {}).items():  # type: ignore[union-attr]
            out[proc] = out.get(proc, 0) + int(part["served"])
    return out


def run() -> int:
    return asyncio.run(main())


if __name__ == "__main__":
    sys.exit(run())
