"""The load generator's own limits, so it is never the bottleneck it measures.

1. Ceiling: closed-loop small GETs against a trivial keep-alive HTTP server
   (a bare asyncio protocol, far cheaper per request than the client), the
   generator pinned to one core and the server to another. Prints req/s and
   the generator's CPU per request (1 / that is its ceiling on one whole core,
   whatever else the machine runs).
2. Timing accuracy: open loop at fixed rates (500 req/s is the promise),
   intended-vs-actual send lag p50/p99/max and late sends (> 1 ms).

Prints figures, asserts nothing.

    python bench/loadgen.py                 # ~1 minute
    python bench/loadgen.py --seconds 10 --rates 500,1000,2000,3000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest import report  # noqa: E402
from loadtest.runner import Run, RunConfig  # noqa: E402

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"


class Trivial(asyncio.Protocol):
    """Answers every request head (GET, no body) with a fixed 200, keep-alive."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(RESPONSE * n)  # type: ignore[attr-defined]


def serve(port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Trivial, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def pin(pid: int, cpu: int) -> bool:
    try:
        if cpu in os.sched_getaffinity(0) or cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(pid, {cpu})
            return True
    except (AttributeError, OSError):
        pass
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(cfg: RunConfig) -> tuple[dict, float, float]:
    run = Run(cfg)
    c0, t0 = cpu_seconds(), time.perf_counter()
    await run.execute()
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    return report.analyse(run), cpu / max(1, len(run.records)), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per step")
    ap.add_argument("--concurrency", default="16,64", help="closed-loop concurrencies")
    ap.add_argument("--rates", default="500,1000,2000", help="open-loop rates for the lag table")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return 0

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    print("the trivial server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
        pinned = pin(0, 0) and pin(server.pid, 1 if (os.cpu_count() or 1) > 1 else 0)
        url = f"http://127.0.0.1:{port}/"
        print(f"machine: {os.cpu_count()} cpus ({'generator on cpu 0, server on cpu 1' if pinned else 'not pinned'})"
              f", load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, Python "
              f"{sys.version.split()[0]}")

        print("\nceiling: closed loop, small GETs, one generator process (one core)")
        print(f"{'concurrency':>11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>11} "
              f"{'req/s per core':>15}")
        for c in [int(x) for x in a.concurrency.split(",")]:
            res, cpu, _ = asyncio.run(measure(RunConfig(url=url, concurrency=c, duration=a.seconds, warmup=1.0)))
            lat = res["latency_ms"]
            print(f"{c:>11} {res['throughput_rps']:>9.0f} {lat['p50']:>8.2f} {lat['p99']:>8.2f} {cpu * 1e6:>11.0f} "
                  f"{1 / cpu:>15.0f}")

        print("\ntiming accuracy: open loop, fixed arrivals, send lag = actual - intended send time")
        print(f"{'rate':>6} {'sent req/s':>10} {'lag p50 ms':>10} {'lag p99 ms':>10} {'lag max ms':>10} "
              f"{'late > 1 ms':>11} {'latency p99 ms':>14}")
        for rate in [float(x) for x in a.rates.split(",")]:
            res, _, _ = asyncio.run(measure(RunConfig(url=url, rate=rate, duration=a.seconds, warmup=1.0)))
            lag, late = res["late_sends"]["lag_ms"], res["late_sends"]
            print(f"{rate:>6.0f} {res['send_rate_rps'] or 0:>10.1f} {lag['p50']:>10.3f} {lag['p99']:>10.3f} "
                  f"{lag['max']:>10.3f} {late['count']:>5} ({late['fraction']:>4.1%}) "
                  f"{res['latency_ms']['p99']:>14.2f}")
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
