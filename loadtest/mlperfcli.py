"""`loadtest mlperf` on the command line: its options, the run (or the peak
search), and the summary printed after it (loadtest/mlperf.py runs LoadGen)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .mlperf import DEFAULT_LATENCY_MS, P99_EARLY_STOPPING_QUERIES, SCENARIOS, MlperfConfig, measure
from .runner import UsageError, machine


def add_parser(sub: Any) -> None:
    what = ("MLPerf Inference scenarios scheduled and judged by MLCommons' LoadGen, with this client as the "
            "system under test: LoadGen's logs, VALID/INVALID and why, the scenario's metric, and the hops")
    s = sub.add_parser("mlperf", help=what, description=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--scenario", required=True, choices=SCENARIOS, help="the MLPerf scenario")
    s.add_argument("--url", required=True, help="an inference server's /photo, the edge's, or (with --protocol oip) "
                                                 "an OIP server's base URL")
    s.add_argument("--protocol", choices=("photo", "oip"), default="photo",
                   help="photo: each sample POSTed as the body; oip: OIP v2 infer requests, binary BYTES input")
    s.add_argument("--model", help="--protocol oip: the model's name")
    s.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (LOADTEST_API_KEY)")
    s.add_argument("--ca", default=os.environ.get("LOADTEST_CA"), help="CA file for the server's certificate "
                                                                      "(LOADTEST_CA)")
    s.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate (only when asked)")
    s.add_argument("--pool", help="worker pool at the edge, sent as X-Pool")
    s.add_argument("--target-qps", type=float, help="Server: the scheduled queries per second (default 10; the "
                   "first step of --find-peak); Offline: the expected samples per second (sizes the query)")
    s.add_argument("--target-latency-ms", type=float,
                   help=f"Server: the latency bound at the 99th percentile (default {DEFAULT_LATENCY_MS:g}); "
                        "SingleStream/MultiStream: the expected latency (sizes the run)")
    s.add_argument("--duration", type=float, help="LoadGen's minimum duration in seconds (default: LoadGen's, 10)")
    s.add_argument("--min-queries", type=int,
                   help=f"LoadGen's minimum query count (default: {P99_EARLY_STOPPING_QUERIES} for Server and "
                        "MultiStream, the fewest with which early stopping can judge their 99th percentile; "
                        "LoadGen's 100 otherwise)")
    s.add_argument("--samples", metavar="DIR", help="images of the query sample library (default: the built-in "
                                                    "samples)")
    s.add_argument("--out", default="mlperf-out", metavar="DIR", help="where LoadGen's logs and our JSON go")
    s.add_argument("--concurrency", type=int, default=16, help="Offline: requests in flight at most")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    s.add_argument("--find-peak", action="store_true",
                   help="Server: search the highest --target-qps that stays VALID at the latency bound")
    s.add_argument("--peak-precision", type=float, default=0.05, metavar="FRACTION",
                   help="--find-peak: stop when the highest VALID and lowest INVALID rates are this close "
                        "(a fraction of the INVALID one)")


def command(a: argparse.Namespace) -> int:
    try:
        import mlperf_loadgen  # noqa: F401
    except ImportError:
        raise UsageError("loadtest mlperf needs MLCommons' LoadGen: pip install mlcommons-loadgen "
                         "(or the project's 'mlperf' extra)") from None
    if a.find_peak and a.scenario != "Server":
        raise UsageError("--find-peak searches the Server scenario's QPS: use it with --scenario Server")
    for name in ("target_qps", "target_latency_ms", "duration"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v:g}")
    if not 0 < a.peak_precision < 1:
        raise UsageError(f"--peak-precision is a fraction between 0 and 1, got {a.peak_precision:g}")
    if a.min_queries is not None and a.min_queries < 1 or a.concurrency < 1:
        raise UsageError("--min-queries and --concurrency must be at least 1")
    cfg = MlperfConfig(scenario=a.scenario, url=a.url, protocol=a.protocol, model=a.model, api_key=a.api_key,
                       ca=a.ca, insecure=a.insecure, pool=a.pool, target_qps=a.target_qps,
                       target_latency_ms=a.target_latency_ms, duration=a.duration, min_queries=a.min_queries,
                       samples=a.samples, out=a.out, concurrency=a.concurrency, timeout=a.timeout,
                       peak_precision=a.peak_precision)
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {cfg.out}: {exc.strerror or exc}") from None

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        res = asyncio.run(measure(cfg, a.find_peak, say))
    except KeyboardInterrupt:
        # LoadGen's C++ thread cannot be stopped; a normal exit would abort in
        # its destructor, so leave at once once the line is out.
        say(f"loadtest: interrupted; LoadGen's logs in {cfg.out} are incomplete")
        sys.stdout.flush()
        os._exit(130)
    res.pop("_summary", None)
    res["config"] = {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {"find_peak": a.find_peak}
    res["machine"] = machine()
    Path(cfg.out, "loadtest_mlperf.json").write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    print_summary(res)
    return 0 if res["result"] == "VALID" else 1


def print_summary(res: dict[str, Any]) -> None:
    m = res["metric"]
    lines = [f"{res['scenario']}: {res['result']} (LoadGen: {res['loadgen_result']})"]
    lines += [f"  why: {w}" for w in res["why"]]
    lines.append(f"  {m['name']}: {m['value']} {m['unit']}")
    if "find_peak" in res:
        fp = res["find_peak"]
        lines.append(f"  peak: {fp['peak_qps']} QPS VALID at a {fp['latency_bound_ms']:g} ms bound "
                     f"({len(fp['steps'])} runs)")
    lines.append(f"  requests {res['requests']}, errors {sum(res['errors'].values())}, {res['wall_s']} s; "
                 f"LoadGen's logs in {res['out']}")
    if res["hops_ms"]:
        lines.append("  hops (ms)          p50      p90      p99")
        for name, h in res["hops_ms"].items():
            lines.append(f"  {name:<16}{h['p50']:>8.2f} {h['p90']:>8.2f} {h['p99']:>8.2f}")
    print("\n".join(lines), flush=True)
