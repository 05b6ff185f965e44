"""`loadtest stream`: its options, the live progress line, the capacity
search's steps and the command itself."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import replace
from itertools import takewhile
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from .capacity import CapacitySearch
from .client import UsageError, machine
from .frames import load_frames
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
from .runner import install_stop_on_signals
from .stream import StreamConfig, StreamRun


def _threshold(value: str) -> float:
    v = non_negative(value)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"a fraction below 1 (0.01 = 1%), got {value!r}")
    return v


def add_parser(sub: Any) -> None:
    what = ("live streams of frames over WebSockets, like cameras: latency, jitter, drops and deadline misses "
            "per frame; --capacity finds how many streams keep up")
    s = sub.add_parser("stream", help=what, description=what, formatter_class=HelpFormatter, epilog=examples(
        "loadtest stream --url ws://127.0.0.1:8000/stream --fps 30 --duration 10",
        'loadtest stream --url wss://edge:8443/stream --api-key "$EDGE_KEY" --ca pki/ca.pem --pool opencv-dnn \\',
        "    --fps 10 --duration 5 --html stream.html",
        "loadtest stream --url ws://127.0.0.1:8000/stream --fps 30 --duration 10 --capacity"))
    s.add_argument("--url", required=True, help="the WebSocket URL, ws:// or wss:// (an inference server's /stream, "
                   "the edge, or any WebSocket server: a plain echo works too)")
    s.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' on the upgrade (LOADTEST_API_KEY)")
    s.add_argument("--ca", default=os.environ.get("LOADTEST_CA"),
                   help="CA file to verify the server's certificate with (LOADTEST_CA)")
    s.add_argument("--pool", help="worker pool at the edge, sent as X-Pool on the upgrade")
    s.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate (only when asked)")
    s.add_argument("--fps", type=positive(float), required=True, help="frames per second of each stream")
    end = s.add_mutually_exclusive_group(required=True)
    end.add_argument("--duration", type=positive(float),
                     help="seconds of frames per stream (per step with --capacity)")
    end.add_argument("--frames", type=positive(int), help="frames per stream (per step with --capacity)")
    s.add_argument("--streams", type=positive(int), default=1, help="streams (WebSocket connections) in parallel")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--frame-bytes", type=positive(int), metavar="B",
                     help="send a valid JPEG (the sample cat) padded to B bytes")
    src.add_argument("--images", nargs="+", metavar="PATH",
                     help="image files or directories to send, cycled (default: the built-in samples)")
    s.add_argument("--deadline-ms", type=positive(float), default=1000.0,
                   help="an answer later than this after its frame's scheduled send is a deadline miss; a frame "
                        "still unanswered this long after the last scheduled frame is dropped")
    s.add_argument("--late-ms", type=non_negative, default=1.0,
                   help="a send later than this after its scheduled time counts as late")
    s.add_argument("--capacity", action="store_true",
                   help="step the number of streams up (1, 2, 4, ... then bisection) until the miss ratio passes "
                        "--threshold, and report how many streams the system sustains")
    s.add_argument("--threshold", type=_threshold, default=0.01,
                   help="--capacity: the largest miss ratio ((misses + drops + errors) / frames) that passes")
    s.add_argument("--max-streams", type=positive(int), default=64, help="--capacity: the most streams to try")
    s.add_argument("--label", help="a name for this run in reports")
    s.add_argument("--json", metavar="FILE", help="write the results as JSON")
    s.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with plots")
    s.add_argument("--quiet", action="store_true", help="no progress lines on standard error")


def _stream_progress_text(run: StreamRun, title: str, planned: float) -> Text:
    p = run.progress
    now = run.elapsed()
    recent = sorted(lat for _, lat in takewhile(lambda x: x[0] >= now - 1.0, reversed(p.recent)))
    line = f"{title}  {now:5.1f} s / {planned:.1f} s  sent {p.sent}  answered {p.answered}  dropped {p.dropped}"
    line += f"  errors {p.errors}"
    if recent:
        line += f"  last second: p50 {recent[len(recent) // 2]:.1f} ms  max {recent[-1]:.1f} ms"
    return Text(line)


async def _stream_with_progress(run: StreamRun, title: str, show: bool) -> None:
    if not show:
        await run.execute()
        return
    from .streamreport import schedule_s

    planned = schedule_s(run) + 1 / run.cfg.fps
    with Live(_stream_progress_text(run, title, planned), console=Console(stderr=True), transient=True,
              auto_refresh=False) as live:
        task = asyncio.ensure_future(run.execute())
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            live.update(_stream_progress_text(run, title, planned), refresh=True)
        task.result()


async def _stream_measure(cfg: StreamConfig, a: argparse.Namespace) -> tuple[dict[str, Any], StreamRun]:
    from . import streamreport

    stop = asyncio.Event()
    install_stop_on_signals(stop)
    frames = load_frames(cfg.images, cfg.frame_bytes)
    show = not a.quiet and sys.stderr.isatty()
    if not a.capacity:
        run = StreamRun(cfg, stop, frames)
        await _stream_with_progress(run, "stream", show)
        return streamreport.analyse(run), run
    search = CapacitySearch(a.threshold, a.max_streams)
    steps: list[dict[str, Any]] = []
    results: dict[int, tuple[dict[str, Any], StreamRun]] = {}
    while (n := search.next_streams()) is not None and not stop.is_set():
        run = StreamRun(replace(cfg, streams=n), stop, frames)
        await _stream_with_progress(run, f"capacity: {n} stream(s)", show)
        res = streamreport.analyse(run)
        if stop.is_set():
            break
        ratio = res["miss_ratio"] if res["miss_ratio"] is not None else 1.0
        res["passed"] = search.record(n, ratio)
        steps.append(res | {"streams": n})
        results[n] = (res, run)
        if not a.quiet:
            err(f"capacity: {n} stream(s): miss ratio {100 * ratio:.2f}%, p99 {res['latency_ms']['p99']} ms -> "
                f"{'pass' if res['passed'] else 'FAIL'}")
        if res["streams_connected"] == 0:
            break
    if not steps:
        raise UsageError("interrupted before the first step")
    chosen = search.sustained if search.sustained in results else steps[0]["streams"]
    top, run = results[chosen]
    top = dict(top)
    top["capacity"] = streamreport.capacity_json(search, steps, cfg, streamreport.schedule_s(run))
    top["top_level_is"] = f"the step with {chosen} stream(s)"
    return top, run


def stream_command(a: argparse.Namespace) -> int:
    from . import streamhtml, streamreport

    if a.capacity and a.streams != 1:
        raise UsageError("--capacity chooses the number of streams itself: leave out --streams")
    cfg = StreamConfig(url=a.url, api_key=a.api_key, ca=a.ca, insecure=a.insecure, pool=a.pool, fps=a.fps,
                       duration=a.duration, frames=a.frames, streams=a.streams, frame_bytes=a.frame_bytes,
                       images=a.images, deadline_ms=a.deadline_ms, late_ms=a.late_ms, label=a.label)
    if cfg.insecure:
        err("warning: --insecure: the server's TLS certificate is NOT verified")
    check_writable(a.json, a.html)
    res, run = asyncio.run(_stream_measure(cfg, a))
    res["machine"] = machine()
    if a.json:
        write(a.json, json.dumps(res, indent=1, default=str) + "\n")
    if a.html:
        write(a.html, streamhtml.render(res, run))
    streamreport.print_summary(res, console())
    if res.get("interrupted"):
        err("interrupted: the report covers the frames up to then")
    if res["cause"]:
        err(("error: " if res["frames_answered"] == 0 else "warning: ") + res["cause"])
    if res["frames_answered"] == 0:
        if not res["cause"]:
            err("error: no frame was answered")
        return 1
    return 0
