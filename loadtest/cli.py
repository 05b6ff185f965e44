"""Command line of the load tester: `ping`, `classify`, `stream`, `mlperf`, `compare`, `report`.
Failures end in one line on standard error and an exit status, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import replace
from itertools import takewhile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from . import compare, mlperfcli, report, slo, stats, streamcli, summary
from .client import UsageError, machine
from .options import (
    HelpFormatter,
    check_writable,
    console,
    err,
    examples,
    non_negative,
    positive,
    write,
)
from .runner import Run, RunConfig, install_stop_on_signals
from .schedule import ARRIVALS

EPILOG = """\
examples:
  loadtest ping --url http://127.0.0.1:8000/ --rate 200 --duration 30 --json direct.json
  EDGE_KEY="$(cat secrets/client-key)"
  loadtest ping --url https://edge:8443/ --api-key "$EDGE_KEY" --ca pki/ca.pem --pool opencv-dnn \\
      --rate 200 --duration 30 --json edge.json --slo 'p99<100ms'
  loadtest classify --url https://edge:8443/photo --api-key "$EDGE_KEY" --ca pki/ca.pem --pool opencv-dnn \\
      --rate 10 --duration 10 --html classify.html
  loadtest ping --url https://edge:8443/ --api-key "$EDGE_KEY" --ca pki/ca.pem --sweep 100,200,400,800 --duration 10
  loadtest stream --url wss://edge:8443/stream --api-key "$EDGE_KEY" --ca pki/ca.pem --fps 30 --streams 8 \\
      --duration 20 --frame-bytes 50000 --html stream.html
  loadtest classify --protocol oip --model efficientnet-lite0 --url http://127.0.0.1:8000 --rate 50 --duration 20
  loadtest stream --url ws://127.0.0.1:8000/stream --fps 30 --duration 10 --capacity
  loadtest mlperf --scenario Server --url http://127.0.0.1:8000/photo --find-peak --out mlperf-server
  loadtest compare direct.json edge.json --html compare.html
  loadtest report edge.json --html edge.html

Latency is measured from each request's intended send time in open loop
(--rate), so a stall is charged to every request it delays; see
docs/loadtesting.md for every statistic and hop. Exit status: 0 ok, 1 no
request succeeded, 2 bad usage, 3 unexpected error, 4 an --slo violated.
"""


SUBCOMMAND_EPILOGS = {
    "ping": examples(
        "loadtest ping --url http://127.0.0.1:8000/ --rate 200 --duration 30 --json direct.json",
        'loadtest ping --url https://edge:8443/ --api-key "$EDGE_KEY" --ca pki/ca.pem --pool default \\',
        "    --rate 100 --duration 10 --html edge.html --slo 'p99<50ms' --slo 'error_rate<1%'",
        'loadtest ping --url https://edge:8443/ --api-key "$EDGE_KEY" --ca pki/ca.pem --sweep 50,100,200,400 '
        "--duration 10"),
    "classify": examples(
        "loadtest classify --url http://127.0.0.1:8000/photo --rate 10 --duration 10 --html direct.html",
        'loadtest classify --url https://edge:8443/photo --api-key "$EDGE_KEY" --ca pki/ca.pem --pool opencv-dnn \\',
        "    --concurrency 8 --requests 1000 --json classify.json"),
}


def _rates(value: str) -> list[float]:
    try:
        rates = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 100,200,400, got {value!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"expected positive rates like 100,200,400, got {value!r}")
    return sorted(set(rates))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadtest", description="Measure end-to-end delay, jitter and throughput of an "
                                "HTTP(S) service, hop by hop.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("ping", "GET the URL: delay and jitter"),
                       ("classify", "POST images to the URL (an inference server's /photo): checks every answer "
                                    "and counts labels")):
        s = sub.add_parser(name, help=what, description=what, formatter_class=HelpFormatter,
                           epilog=SUBCOMMAND_EPILOGS[name])
        s.add_argument("--url", required=True, help="the URL: an inference server, the edge, or any HTTP(S) server")
        s.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"),
                       help="sent as 'Authorization: Bearer KEY' (LOADTEST_API_KEY)")
        s.add_argument("--ca", default=os.environ.get("LOADTEST_CA"),
                       help="CA file to verify the server's certificate with (LOADTEST_CA)")
        s.add_argument("--pool", help="worker pool at the edge, sent as X-Pool")
        s.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate (only when asked)")
        load = s.add_mutually_exclusive_group(required=True)
        load.add_argument("--rate", type=positive(float), help="open loop: requests per second")
        load.add_argument("--concurrency", type=positive(int), help="closed loop: requests in flight")
        load.add_argument("--sweep", type=_rates, metavar="R1,R2,...",
                          help="open loop at each rate in turn; draws latency vs throughput and finds the knee")
        s.add_argument("--arrivals", choices=ARRIVALS, default="fixed",
                       help="open-loop arrivals: evenly spaced, or a Poisson process of the same mean rate")
        end = s.add_mutually_exclusive_group(required=True)
        end.add_argument("--duration", type=positive(float), help="measured seconds (per rate in a sweep)")
        end.add_argument("--requests", type=positive(int), help="measured requests (per rate in a sweep)")
        s.add_argument("--warmup", type=non_negative, default=1.0,
                       help="seconds of load before measuring; their requests are excluded")
        s.add_argument("--timeout", type=positive(float), default=30.0, help="seconds per request")
        s.add_argument("--connections", type=positive(int),
                       help="client connection pool size (default: 100 in open loop, the concurrency in closed loop)")
        s.add_argument("--images", help="directory of images to POST (classify; default: the built-in samples)")
        s.add_argument("--seed", type=int, default=1, help="seed of the Poisson arrivals")
        s.add_argument("--late-ms", type=non_negative, default=1.0,
                       help="a send later than this after its intended time counts as late")
        s.add_argument("--windows", type=positive(int), default=5, help="windows of the stability check")
        s.add_argument("--keep-going", action="store_true",
                       help="do not stop when the first requests all fail (default: stop after those)")
        s.add_argument("--label", help="a name for this run in reports and comparisons")
        s.add_argument("--json", metavar="FILE", help="write the results as JSON")
        s.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with plots")
        s.add_argument("--records", action="store_true", help="include every request's record in the JSON")
        s.add_argument("--quiet", action="store_true", help="no live progress display")
        _slo_option(s)
        if name == "classify":
            _oip_arguments(s)

    streamcli.add_parser(sub)
    mlperfcli.add_parser(sub)

    c = sub.add_parser("compare", help="results side by side (e.g. direct vs through the edge), with the "
                       "differences from the first", epilog=examples(
                           "loadtest compare direct.json edge.json",
                           "loadtest compare direct.json edge.json --html compare.html"), formatter_class=HelpFormatter)
    c.add_argument("files", nargs="+", metavar="FILE.json")
    c.add_argument("--html", metavar="OUT", help="write an HTML page: overlaid percentile curves, hop trees")
    r = sub.add_parser("report", help="summary table and HTML report of a saved JSON result",
                       formatter_class=HelpFormatter, epilog=examples("loadtest report edge.json --html edge.html"))
    r.add_argument("file", metavar="FILE.json")
    r.add_argument("--html", metavar="OUT", help="write the HTML report here")
    return p


def _slo(value: str) -> slo.Slo:
    try:
        return slo.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _slo_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--slo", type=_slo, action="append", default=[], metavar="METRIC<VALUE",
                   help="a pass/fail threshold, repeatable: p50, p90, p99, p999 or max in ms or s (p99<100ms), "
                        "or error_rate (error_rate<1%%); drawn in the report; exit status 4 when one is violated")


def _oip_arguments(s: argparse.ArgumentParser) -> None:
    """classify over the Open Inference Protocol (loadtest/oip.py)."""
    s.add_argument("--protocol", choices=("photo", "oip"), default="photo",
                   help="photo: POST each image as the body (the inference server's /photo); oip: Open Inference "
                        "Protocol v2 infer requests with the image as a binary BYTES input (our /v2, Triton, "
                        "KServe, OVMS); --url is then the server's base URL")
    s.add_argument("--model", help="--protocol oip: the model's name (its metadata names the input and output)")


def new_run(cfg: RunConfig, stop: asyncio.Event) -> Run:
    if cfg.protocol == "oip":
        from .oip import OipRun

        return OipRun(cfg, stop)
    return Run(cfg, stop)


def config_from_args(a: argparse.Namespace) -> RunConfig:
    return RunConfig(
        command=a.command, url=a.url, api_key=a.api_key, ca=a.ca, pool=a.pool, insecure=a.insecure,
        rate=a.rate, arrivals=a.arrivals, concurrency=a.concurrency, duration=a.duration, requests=a.requests,
        warmup=a.warmup, timeout=a.timeout, connections=a.connections, images=a.images, seed=a.seed,
        late_ms=a.late_ms, windows=a.windows, keep_going=a.keep_going, sweep=a.sweep, label=a.label,
        protocol=getattr(a, "protocol", "photo"), model=getattr(a, "model", None),
    )


# -- live progress ---------------------------------------------------------------


def _progress_text(run: Run, title: str) -> Text:
    p = run.progress
    now = p.elapsed
    # p.recent is in completion order: walk back from the newest and stop at
    # the first older than a second, instead of scanning the whole deque.
    recent = sorted(lat for _, lat in takewhile(lambda x: x[0] >= now - 1.0, reversed(p.recent)))
    line = f"{title}  {now:5.1f} s"
    if p.planned:
        line += f" / {p.planned:.1f} s ({max(0.0, p.planned - now):.1f} s left)"
    if p.planned_requests:
        line += f"  measured target {p.planned_requests}"
    line += f"  done {p.completed}  rate {len(recent)}/s"
    if recent:
        line += f"  p50 {recent[len(recent) // 2]:.1f} ms  p99 {recent[min(len(recent) - 1, int(len(recent) * .99))]:.1f} ms"
    line += f"  errors {p.errors}"
    return Text(line)


async def _with_progress(run: Run, title: str, show: bool) -> None:
    if not show:
        await run.execute()
        return
    console = Console(stderr=True)
    # Refreshed from this loop only: rich's own refresh thread would take the
    # GIL from the generator at times of its choosing.
    with Live(_progress_text(run, title), console=console, transient=True, auto_refresh=False) as live:
        task = asyncio.ensure_future(run.execute())
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            live.update(_progress_text(run, title), refresh=True)
        task.result()


# -- runs ------------------------------------------------------------------------


async def _measure(cfg: RunConfig, show: bool, records: bool) -> dict[str, Any]:
    stop = asyncio.Event()
    install_stop_on_signals(stop)
    if not cfg.sweep:
        run = new_run(cfg, stop)
        await _with_progress(run, cfg.command, show)
        res = report.analyse(run)
        if records:
            res["records"] = report.records_json(run)
        res["_run"] = run
        return res
    points: list[dict[str, Any]] = []
    for rate in cfg.sweep:
        run = new_run(replace(cfg, rate=rate), stop)
        await _with_progress(run, f"{cfg.command} @ {rate:g} req/s", show)
        res = report.analyse(run)
        if records:
            res["records"] = report.records_json(run)
        res["_run"] = run
        points.append(res)
        if run.aborted or stop.is_set() or res["ok"] == 0:
            break
    knee = stats.find_knee([(p["offered_rps"], p["throughput_rps"], p["latency_ms"]["p99"] or 0.0)
                            for p in points if p["ok"]])
    chosen = next((p for p in points if p["offered_rps"] == knee["knee_rps"]), points[0])
    top = dict(chosen)
    top["config"] = {**chosen["config"], "sweep": cfg.sweep}
    top["sweep"] = {
        "rates": cfg.sweep,
        "points": [{k: p[k] for k in ("offered_rps", "throughput_rps", "send_rate_rps", "requests", "ok", "errors",
                                      "error_kinds", "latency_ms", "service_time_ms", "jitter_ms", "late_sends",
                                      "duration_s")} | {"stable": p["stability"]["stable"]} for p in points],
        "knee": knee,
        "top_level_is": f"the run at {chosen['offered_rps']:g} req/s",
    }
    return top


def run_command(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    if cfg.insecure:
        err("warning: --insecure: the server's TLS certificate is NOT verified")
    check_writable(a.json, a.html)
    show = not a.quiet and sys.stderr.isatty()
    res = asyncio.run(_measure(cfg, show, a.records))
    run: Run = res.pop("_run")
    res["machine"] = machine()
    res["slo"] = slo.check(a.slo, res) if a.slo else None
    # Files first: a closed stdout (| head) must not lose them.
    if a.json:
        write(a.json, json.dumps(res, indent=1, default=str) + "\n")
    if a.html:
        from .htmlreport import render

        write(a.html, render(res, run))
    summary.print_summary(res, console())
    if res.get("aborted"):
        err(res["aborted"])
    if res["cause"]:
        err(("error: " if res["ok"] == 0 else "warning: ") + res["cause"])
    if res["ok"] == 0:
        if not res["cause"]:
            err("error: no request succeeded")
        return 1
    return _slo_status(res)


def _slo_status(res: dict[str, Any]) -> int:
    """Each threshold's verdict on standard error; exit status 4 when one failed."""
    verdicts = res.get("slo") or []
    for v in verdicts:
        err(slo.describe(v))
    return slo.EXIT_VIOLATED if slo.failed(verdicts) else 0


def _load(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or "latency_ms" not in data:
        raise UsageError(f"{path} is not a loadtest result (no latency_ms)")
    return data


def compare_command(a: argparse.Namespace) -> int:
    results = [_load(f) for f in a.files]
    names = [r.get("label") or Path(f).stem for r, f in zip(results, a.files, strict=True)]
    compare.print_compare(results, names, console())
    if a.html:
        write(a.html, compare.render(results, names))
    return 0


def report_command(a: argparse.Namespace) -> int:
    res = _load(a.file)
    if res.get("command") == "stream":
        from . import streamreport

        streamreport.print_summary(res, console())
        if a.html:
            from . import streamhtml

            write(a.html, streamhtml.render(res, None))
        return 0
    summary.print_summary(res, console())
    if a.html:
        from .htmlreport import render

        write(a.html, render(res, None))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "compare":
            return compare_command(a)
        if a.command == "report":
            return report_command(a)
        if a.command == "stream":
            return streamcli.stream_command(a)
        if a.command == "mlperf":
            return mlperfcli.command(a)
        return run_command(a)
    except UsageError as exc:
        err(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        err("interrupted")
        return 130

    except Exception as exc:  # the promise is one line, never a traceback
        if os.environ.get("LOADTEST_DEBUG"):
            raise
        err(f"error: unexpected {exc.__class__.__name__}: {exc} (LOADTEST_DEBUG=1 shows the traceback)")
        return 3
