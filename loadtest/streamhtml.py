"""The HTML report of a stream run: failures first, the cards, the capacity
table, latency over time with the deadline, the distributions (each saying
so when there are too few frames to draw), jitter per stream, the server's
phases, the upgrade's hops and the streams table. One self-contained file."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from . import stats
from .htmlreport import CSS, _card, _cdf, _histogram, _table, page, too_little
from .ledger import DROPPED, ERROR, UNANSWERED
from .stream import StreamRun
from .streamreport import MAX_JITTER_LINES, MAX_POINTS
from .summary import _f
from .svg import PALETTE, Chart

MIN_FRAMES = 10
MIN_SECONDS = 2  # bins of scheduled send time are always whole: two make a line


def _latency_plot(run: StreamRun, deadline_ms: float) -> str:
    frames = sorted((f for s in run.streams for f in s.ledger.frames), key=lambda f: f.intended)
    if len(frames) < MIN_FRAMES:
        return too_little("Latency of every frame", f"{len(frames)} frames sent; a plot needs {MIN_FRAMES}")
    on_time = [(f.intended, v) for f in frames if (v := f.latency_ms) is not None and v <= deadline_ms]
    late = [(f.intended, v) for f in frames if (v := f.latency_ms) is not None and v > deadline_ms]
    ys = [v for _, v in on_time + late] or [deadline_ms]
    top = max(max(ys), deadline_ms) * 1.05
    dropped = [(f.intended, top) for f in frames if f.outcome == DROPPED]
    lost = [(f.intended, top) for f in frames if f.outcome == UNANSWERED]
    errors = [(f.intended, top) for f in frames if f.outcome == ERROR]
    xs = [f.intended for f in frames]
    c = Chart("plot-stream-latency", "Latency of every frame by its scheduled send time (drops and errors on top)",
              "seconds since the first scheduled frame", "latency ms", xs, [*ys, top])
    c.points(_thin_pts(on_time), "answered in time", PALETTE[0])
    c.points(_thin_pts(late), f"deadline miss (> {deadline_ms:g} ms)", PALETTE[3], r=2.0)
    c.points(_thin_pts(dropped), "dropped by the server", PALETTE[1], r=2.5)
    c.points(_thin_pts(lost), "never answered", PALETTE[4], r=2.5)
    c.points(_thin_pts(errors), "error answer", PALETTE[5], r=2.5)
    c.line([(min(xs), deadline_ms), (max(xs), deadline_ms)], "deadline", PALETTE[7], width=1.0)
    return c.render()


def _thin_pts(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    step = max(1, len(pts) // MAX_POINTS)
    return list(pts[::step])


def _jitter_plot(run: StreamRun) -> str:
    lines: list[tuple[int, list[tuple[float, float]]]] = []
    ipdv: list[tuple[float, float]] = []
    for s in run.streams:
        fs = s.ledger.frames
        answered = [f for f in fs if f.latency_ms is not None]
        js = stats.rfc3550_series([f.latency_ms for f in answered])  # type: ignore[misc]
        if len(answered) > 1:
            lines.append((s.index, [(f.intended, j) for f, j in zip(answered, js, strict=True)]))
        for a, b in zip(fs, fs[1:], strict=False):
            la, lb = a.latency_ms, b.latency_ms
            if la is not None and lb is not None:
                ipdv.append((b.intended, abs(lb - la)))
    if not lines:
        return ""
    shown = lines[:MAX_JITTER_LINES]
    ys = [y for _, pts in shown for _, y in pts] + [y for _, y in ipdv]
    xs = [x for _, pts in shown for x, _ in pts]
    c = Chart("plot-stream-jitter", "Jitter over time: RFC 3550 J per stream, and |IPDV| of every frame pair",
              "seconds since the first scheduled frame", "ms", xs, ys)
    c.points(_thin_pts(ipdv), "|IPDV|", "#9ab")
    for i, (idx, pts) in enumerate(shown):
        c.line(_thin_pts(pts), f"J stream {idx}", PALETTE[i % len(PALETTE)])
    return c.render()


def _timeline_plots(res: dict[str, Any], deadline_ms: float) -> tuple[str, str]:
    """Latency and jitter over time from the per-second timeline (a saved
    JSON has no frames)."""
    tl = res.get("timeline") or []
    if len(tl) < MIN_SECONDS:
        why = f"{len(tl)} second(s) of frames; per-second figures need {MIN_SECONDS}"
        return too_little("Latency per second", why), too_little("Jitter per second", why)
    lat: dict[str, list[tuple[float, float]]] = {k: [(r["t"] + 0.5, r[k]) for r in tl if k in r]
                                                 for k in ("p50", "p99", "max")}
    out = ["", ""]
    ys = [y for pts in lat.values() for _, y in pts]
    if ys:
        xs = [r["t"] + 0.5 for r in tl]
        c = Chart("plot-stream-latency", "Latency per second of scheduled send time", "seconds", "latency ms",
                  xs, [*ys, deadline_ms])
        for i, k in enumerate(("p50", "p99", "max")):
            c.line(lat[k], f"{k} per second", PALETTE[i])
        c.line([(min(xs), deadline_ms), (max(xs), deadline_ms)], "deadline", PALETTE[7], width=1.0)
        bad = [(r["t"] + 0.5, deadline_ms) for r in tl if r["dropped"] or r["misses"]]
        c.points(bad, "seconds with drops or misses", PALETTE[3], r=3.0)
        out[0] = c.render()
    ipdv = [(r["t"] + 0.5, r["ipdv_mean"]) for r in tl if "ipdv_mean" in r]
    if ipdv:
        c = Chart("plot-stream-jitter", "Jitter over time: mean |IPDV| per second", "seconds", "ms",
                  [x for x, _ in ipdv], [y for _, y in ipdv])
        c.line(ipdv, "mean |IPDV|", PALETTE[5])
        out[1] = c.render()
    return out[0], out[1]


def _stream_rows(res: dict[str, Any]) -> list[list[Any]]:
    return [[p["stream"], p["frames_sent"], p["frames_answered"], p["frames_dropped"], p["deadline_misses"],
             p["frames_errors"], p["achieved_fps"], p["latency_ms"]["p50"], p["latency_ms"]["p99"],
             p["latency_ms"]["max"], p["jitter_ms"]["rfc3550"], p["jitter_ms"]["p99"],
             (p["error"] or "ok") + (f" {p['close_code']}" if p["close_code"] is not None else "")]
            for p in res["streams"]]


def _cards(res: dict[str, Any]) -> str:
    cfg, lat, jit = res["config"], res["latency_ms"], res["jitter_ms"]
    cards = [
        _card(f"{res['frames_answered']} / {res['frames_sent']}", "answered / sent frames"),
        _card(_f(res["frames_dropped"]), "dropped"),
        _card(_f(res["deadline_misses"]), f"deadline misses (> {cfg['deadline_ms']:g} ms)"),
        _card(_f(res["frames_errors"]), "errors"),
        _card(_f(res["achieved_fps"], 1), "achieved fps (all streams)"),
        _card(_f(lat.get("p50")), "latency p50 ms"),
        _card(_f(lat.get("p99")), "latency p99 ms"),
        _card(_f(jit.get("rfc3550"), 3), "RFC 3550 J ms"),
        _card(_f(jit.get("p99"), 3), "|IPDV| p99 ms"),
    ]
    return '<div class="cards">' + "".join(cards) + "</div>"


def _capacity(res: dict[str, Any]) -> str:
    cap = res.get("capacity")
    if not cap:
        return ""
    return "<h2>Capacity</h2>" + _table(
        ["streams", "sent", "dropped", "misses", "miss ratio", "p50 ms", "p99 ms", "verdict"],
        [[s["streams"], s["frames_sent"], s["frames_dropped"], s["deadline_misses"], s["miss_ratio"],
          s["latency_ms"]["p50"], s["latency_ms"]["p99"], "pass" if s["passed"] else "FAIL"]
         for s in cap["steps"]]) + (f"<p>Sustained: <b>{_f(cap['sustained_streams'])}</b> real-time streams at "
                                    f"{cap['fps']:g} fps ({escape(cap['rule'])}).</p>")


def _latency(res: dict[str, Any], run: StreamRun | None) -> str:
    cfg, lat, jit = res["config"], res["latency_ms"], res["jitter_ms"]
    from_timeline = _timeline_plots(res, cfg["deadline_ms"]) if run is None else ("", "")
    return "".join([
        "<h2>Latency</h2><p>From each frame's scheduled send time to its answer's arrival.</p>",
        _table(["", *stats.FIELDS, "n"], [
            [name, *(s.get(k) for k in stats.FIELDS), s.get("count")]
            for name, s in (("latency", lat), ("jitter |IPDV|", jit), ("jitter PDV", jit.get("pdv")))
            if s and s.get("count")]),
        _latency_plot(run, cfg["deadline_ms"]) if run is not None else from_timeline[0],
        _histogram(res).replace("requests", "frames"), _cdf(res),
        "<h2>Jitter</h2>",
        f"<p>RFC 3550 J: {_f(jit.get('rfc3550'), 3)} ms (mean of the streams' final J; the largest "
        f"{_f(jit.get('rfc3550_max'), 3)} ms). |IPDV| between consecutive answered frames of a stream: "
        f"p50 {_f(jit.get('p50'), 3)}, p99 {_f(jit.get('p99'), 3)} ms.</p>",
        _jitter_plot(run) if run is not None else from_timeline[1]])


def _hops(res: dict[str, Any]) -> str:
    parts = []
    if res.get("server_timing_ms"):
        parts.append("<h2>Server phases per frame</h2>" + _table(
            ["phase (ms)", *stats.FIELDS, "n"],
            [[k, *(s.get(f) for f in stats.FIELDS), s.get("count")] for k, s in res["server_timing_ms"].items()]))
    if res.get("upgrade_hops_ms"):
        parts.append("<h2>Hops of the upgrade (101 Server-Timing)</h2>" + _table(
            ["hop (ms)", *stats.FIELDS, "n"],
            [[k, *(s.get(f) for f in stats.FIELDS), s.get("count")] for k, s in res["upgrade_hops_ms"].items()]))
    if res.get("tunnel_rtt_ms"):
        parts.append("<p>Tunnel heartbeat RTT (the edge's reading of the link, not part of a frame): " + ", ".join(
            f"{escape(k)} {v:.2f} ms" for k, v in res["tunnel_rtt_ms"].items()) + "</p>")
    return "".join(parts)


def render(res: dict[str, Any], run: StreamRun | None) -> str:
    title = f"loadtest stream {res['url']}"
    sub = (f"<h1>{escape(title)}</h1><p class=sub>{res['streams_connected']} of {res['streams_asked']} streams at "
           f"{res['fps']:g} fps for {_f(res['schedule_s'])} s; started {escape(str(res.get('started_at')))}; "
           f"{escape(res['stagger'])}</p>")
    cause = f'<p class="cause">{escape(res["cause"])}</p>' if res.get("cause") else ""
    streams = "<h2>Streams</h2>" + _table(
        ["stream", "sent", "answered", "dropped", "misses", "errors", "fps", "p50", "p99", "max", "J", "|IPDV| p99",
         "end"], _stream_rows(res))
    return page(title, CSS, [sub, cause, _cards(res), _capacity(res), _latency(res, run), _hops(res), streams])
