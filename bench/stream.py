"""Live streams through each path: latency and jitter of 30 fps streams of
50 KB frames, 1, 8 and 32 streams at a time, measured with `loadtest
stream`'s client (open loop, latency from each frame's scheduled send).

The upstream is the WebSocket test server (tests/loadtest/wsserver.py), a
real process on loopback: `/echo` sends every frame back as it is
(--delay-ms 0), `/delay?ms=D` answers {"seq": n} D ms after each frame.
Paths:

  direct      ws:// straight to the upstream
  via edge    (--edge) wss:// to an edge started here, through the tunnel to
              an agent whose upstream is the same server: needs the edge's
              WebSocket passthrough
  NAME=URL    (--path, repeatable) any other WebSocket base URL serving the
              same paths, with --api-key / --ca

Paths alternate at each stream count (which goes first alternates too), and
--rounds repeats the series, so a drift of the machine's load hits them alike;
what a path adds is the median over rounds of each round's difference. Prints one table (p50, p99, RFC 3550 J, |IPDV| p99, drops,
misses, late sends) and, for every path beside `direct`, what it adds. A
benchmark: asserts nothing, exits 0.

    python bench/stream.py                                  # ~2 min
    python bench/stream.py --streams 1,8 --seconds 5 --edge
    python bench/stream.py --edge --rounds 3                # docs/benchmarks.md
    python bench/stream.py --path lan=wss://10.0.0.5:8443 --api-key $KEY --ca ca.pem
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from loadtest import streamreport  # noqa: E402
from loadtest.stream import StreamConfig, StreamRun, load_frames  # noqa: E402
from tests.harness import PY, Proc, System, free_port, make_pki, wait_for  # noqa: E402

WS_SERVER = ROOT / "tests" / "loadtest" / "wsserver.py"


@dataclass
class Path_:
    name: str
    base: str  # ws[s]://host:port, the upstream's paths appended
    api_key: str | None = None
    ca: str | None = None
    pids: dict[str, int] | None = None  # processes of this path besides the client and upstream, for CPU shares


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _counts(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,8,32, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts like 1,8,32, got {value!r}")
    return out


async def start_upstream(log_dir: Path) -> tuple[Proc, int]:
    port = free_port()
    p = Proc("ws-upstream", [PY, str(WS_SERVER), str(port)], log_dir)

    async def up() -> bool:
        if not p.alive():
            raise AssertionError(f"the upstream exited:\n{p.log()}")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status == 200

    await wait_for(up, 15, lambda: f"the upstream to listen\n{p.log()}")
    return p, port


async def start_edge(system: System, upstream_port: int) -> Path_:
    """An edge and one agent (capacity 64) in front of the upstream."""
    _, edge_url = await system.edge("edge")
    system.agent("agent-1", edge_url, f"http://127.0.0.1:{upstream_port}", capacity=64)
    await system.wait_available(edge_url, ["agent-1"])
    pids = {p.name: p.pid for p in system.procs}
    return Path_("via edge", edge_url.replace("https://", "wss://"), system.pki.client_key, str(system.pki.ca),
                 {"edge": pids["edge"], "agent": pids["agent-1"]})


async def measure(path: Path_, route: str, streams: int, a: argparse.Namespace,
                  frames: list[tuple[str, bytes]], upstream_pid: int) -> dict[str, Any]:
    cfg = StreamConfig(url=path.base + route, api_key=path.api_key, ca=path.ca, fps=a.fps, duration=a.seconds,
                       streams=streams, frame_bytes=a.frame_bytes, deadline_ms=a.deadline_ms)
    run = StreamRun(cfg, frames=frames)
    procs: dict[str, int | str] = {"client": "self", "upstream": upstream_pid, **(path.pids or {})}
    before = {k: cpu_seconds(pid) for k, pid in procs.items()}
    t = time.monotonic()
    await run.execute()
    wall = time.monotonic() - t
    res = streamreport.analyse(run)
    # Each process's CPU over the point, in % of one core: who is the bottleneck.
    res["cpu_pct"] = {k: round(100 * (cpu_seconds(pid) - before[k]) / wall) for k, pid in procs.items()}
    return res


def added_by(direct: dict[str, Any], other: dict[str, Any]) -> tuple[float, float, float] | None:
    """(p50, p99, RFC 3550 J) of `other` minus `direct`, in ms; None if either has no answers."""
    d, v = direct["latency_ms"], other["latency_ms"]
    if d["p50"] is None or v["p50"] is None:
        return None
    return (v["p50"] - d["p50"], v["p99"] - d["p99"],
            (other["jitter_ms"]["rfc3550"] or 0) - (direct["jitter_ms"]["rfc3550"] or 0))


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


HEAD = ("path", "streams", "sent", "answered", "dropped", "misses", "late", "p50 ms", "p99 ms", "max ms", "J ms",
        "|IPDV| p99", "fps/stream")


def row(name: str, n: int, r: dict[str, Any]) -> list[str]:
    lat, j = r["latency_ms"], r["jitter_ms"]
    return [name, str(n), str(r["frames_sent"]), str(r["frames_answered"]), str(r["frames_dropped"]),
            str(r["deadline_misses"]), str(r["late_sends"]), _f(lat["p50"]), _f(lat["p99"]), _f(lat["max"]),
            _f(j["rfc3550"], 3), _f(j["p99"], 3), _f(r["achieved_fps_per_stream"], 1)]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEAD, widths, strict=True))))
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fps", type=float, default=30.0, help="frames per second of each stream")
    ap.add_argument("--frame-bytes", type=int, default=50_000, help="bytes per frame (a padded JPEG)")
    ap.add_argument("--streams", type=_counts, default=[1, 8, 32], help="stream counts, e.g. 1,8,32")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of frames per point")
    ap.add_argument("--deadline-ms", type=float, default=1000.0, help="deadline of every frame")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="0: the upstream echoes each frame; D: it answers {seq} D ms after each frame")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole series this many times (paths interleaved), and report the median added")
    ap.add_argument("--edge", action="store_true",
                    help="also through an edge + tunnel + agent started here (needs WebSocket passthrough)")
    ap.add_argument("--path", action="append", default=[], metavar="NAME=URL",
                    help="another path: a ws[s]:// base URL in front of the same upstream")
    ap.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"), help="key for --path URLs")
    ap.add_argument("--ca", default=os.environ.get("LOADTEST_CA"), help="CA file for --path URLs")
    a = ap.parse_args()

    route = "/echo" if a.delay_ms <= 0 else f"/delay?ms={a.delay_ms:g}"
    frames = load_frames(None, a.frame_bytes)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        log_dir = Path(tmp)
        upstream, port = await start_upstream(log_dir)
        system: System | None = None
        try:
            paths = [Path_("direct", f"ws://127.0.0.1:{port}")]
            if a.edge:
                system = System(make_pki(log_dir / "pki"), log_dir)
                paths.append(await start_edge(system, port))
            for spec in a.path:
                name, _, url = spec.partition("=")
                if not url:
                    ap.error(f"--path {spec!r}: expected NAME=URL")
                paths.append(Path_(name, url.rstrip("/"), a.api_key, a.ca))
            print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {a.fps:g} fps, "
                  f"{len(frames[0][1])} B frames, {a.seconds:g} s per point, upstream {route}, "
                  f"{a.rounds} round(s)", flush=True)
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            rows = []
            for rnd in range(a.rounds):
                for n in a.streams:
                    # Alternate which path goes first, so neither always runs on the warmer machine.
                    for p in paths if (rnd + n) % 2 == 0 else paths[::-1]:
                        print(f"  round {rnd + 1}, {p.name}, {n} stream(s) ...", end="", flush=True)
                        r = await measure(p, route, n, a, frames, upstream.pid)
                        results.setdefault((p.name, n), []).append(r)
                        rows.append(row(p.name, n, r))
                        cpu = ", ".join(f"{k} {v}%" for k, v in r["cpu_pct"].items())
                        print(f" p50 {_f(r['latency_ms']['p50'])} ms, load {os.getloadavg()[0]:.2f}, CPU {cpu}"
                              + (f" ({r['cause']})" if r["cause"] else ""), flush=True)
            print()
            print_table(rows)
            for p in paths[1:]:
                print(f"\nwhat '{p.name}' adds to direct (median over rounds of the per-round difference; "
                      "each round's in brackets):")
                for n in a.streams:
                    added = [added_by(d, v) for d, v in zip(results[("direct", n)], results[(p.name, n)],
                                                              strict=True)]
                    if any(x is None for x in added):
                        print(f"  {n:>3} streams: -")
                        continue
                    cols = []
                    for i, what in enumerate(("p50", "p99", "RFC 3550 J")):
                        vals = [x[i] for x in added if x is not None]
                        each = ", ".join(f"{v:+.2f}" for v in vals)
                        cols.append(f"{what} {statistics.median(vals):+.3f} ms [{each}]")
                    print(f"  {n:>3} streams: " + "; ".join(cols))
            print("\nlatency from each frame's scheduled send to its answer; J = RFC 3550 interarrival jitter "
                  "(mean of the streams'); |IPDV| between consecutive frames of a stream; late = sends > 1 ms "
                  "behind schedule (the generator's own lag); CPU = each process's share of one core over the point")
        finally:
            if system is not None:
                await system.close()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
