"""From a stream run's frames to results: the JSON document (run and per
stream), the one-line cause, the terminal tables and the capacity search's
table. The HTML report is in `streamhtml`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from . import hops as hoplib
from . import stats
from .ledger import ANSWERED, DROPPED, ERROR, UNANSWERED, Frame
from .series import distribution as _distribution
from .stream import StreamRun, StreamState
from .summary import _f

FORMAT = "loadtest-stream/1"
# The upgrade's hops of the timing contract, from the 101's Server-Timing.
UPGRADE_HOPS = ("lb", "tunnel", "agent", "upstream", "edge", "tunnel_rtt", "net_edge_worker")
MAX_POINTS = 8000
MAX_JITTER_LINES = 8


def _ms(v: float) -> float:
    return round(v, 4)


def schedule_s(run: StreamRun) -> float:
    """Seconds of each stream's schedule."""
    cfg = run.cfg
    if cfg.duration is not None and cfg.frames is not None:
        return min(cfg.duration, cfg.frames / cfg.fps)
    return cfg.duration if cfg.duration is not None else (cfg.frames or 0) / cfg.fps


def figures(frames: Sequence[Frame], by_stream: Sequence[Sequence[Frame]], seconds: float, deadline_ms: float,
            late_ms: float, not_sent: int = 0) -> dict[str, Any]:
    """The figures of a set of frames (one stream's, or the run's with
    `by_stream` its streams' frames in sequence order, for jitter)."""
    outcomes = Counter(f.outcome for f in frames)
    lat = [v for f in frames if (v := f.latency_ms) is not None]
    misses = sum(1 for v in lat if v > deadline_ms)
    answered = outcomes[ANSWERED]
    dropped = outcomes[DROPPED] + outcomes[UNANSWERED]
    sent = len(frames)
    bad = misses + dropped + outcomes[ERROR] + not_sent
    late = sum(1 for f in frames if f.lag_ms > late_ms)
    phases: dict[str, list[float]] = {}
    outside: list[float] = []
    for f in frames:
        if f.timing is None or f.latency_ms is None:
            continue
        for k, v in f.timing.items():
            phases.setdefault(k, []).append(v)
        outside.append(f.latency_ms - math.fsum(v for k, v in f.timing.items() if k in hoplib.INFERENCE[:-1]))
    timing = {k: stats.summary(phases[k]) for k in sorted(phases, key=hoplib.order_key)}
    if outside:
        timing["outside_phases"] = stats.summary(outside)
    return {
        "frames_sent": sent,
        "frames_answered": answered,
        "frames_dropped": dropped,
        "dropped_by_server": outcomes[DROPPED],
        "unanswered": outcomes[UNANSWERED],
        "frames_errors": outcomes[ERROR],
        "frames_not_sent": not_sent,
        "deadline_misses": misses,
        "miss_ratio": round(bad / (sent + not_sent), 6) if sent + not_sent else None,
        "achieved_fps": round(answered / seconds, 3) if seconds > 0 else None,
        "on_time_fps": round((answered - misses) / seconds, 3) if seconds > 0 else None,
        "late_sends": late,
        "send_lag_ms": stats.summary([f.lag_ms for f in frames]),
        "latency_ms": stats.summary(lat),
        "jitter_ms": stats.streams_jitter([[f.latency_ms for f in fs] for fs in by_stream]),
        "server_timing_ms": timing,
    }


def _upgrade_hops(s: StreamState) -> dict[str, float]:
    h = hoplib.parse_server_timing(s.server_timing)
    h.update(hoplib.derive(h))
    return {k: _ms(v) for k, v in sorted(h.items(), key=lambda kv: hoplib.order_key(kv[0]))}


HINTS = {401: " (check --api-key)", 403: " (this key may not do that)", 404: " (check the --url path)",
         429: " (rate limited: use a key with a higher limit)",
         502: " (the edge could not reach a worker)", 503: " (no worker available, or the server is not ready)"}


def cause(run: StreamRun) -> str | None:
    """One line naming the main failure of the streams, with a hint."""
    errs = Counter(s.error for s in run.streams if s.error)
    if not errs:
        return None
    kind, n = errs.most_common(1)[0]
    detail = next((s.error_detail for s in run.streams if s.error == kind and s.error_detail), "")
    if kind.startswith("HTTP "):
        code = int(kind[5:])
        hint = HINTS.get(code, " (server error)" if code >= 500 else
                         " (is --url a WebSocket endpoint?)" if code < 400 else "")
        if code == 404 and "no pool named" in detail:  # the edge's unknown_pool
            hint = " (check --pool, sent as X-Pool)"
        text = f"the upgrade was refused: {kind} {detail}".rstrip() + hint
    elif kind == "connect":
        text = f"cannot connect to {run.cfg.url}: {detail}"
    elif kind == "tls":
        text = (f"TLS failure talking to {run.cfg.url}: {detail} (give the server's CA with --ca FILE, "
                "or --insecure to skip verification)")
    else:
        text = f"{kind}: {detail}"
    line = f"{n} of {len(run.streams)} streams failed: {text}"
    others = [f"{k} x{c}" for k, c in errs.most_common()[1:4]]
    if others:
        line += " (also " + ", ".join(others) + ")"
    return line


def _timeline(frames: Sequence[Frame], by_stream: Sequence[Sequence[Frame]],
              deadline_ms: float) -> list[dict[str, Any]]:
    """Per second of scheduled send time: frames sent, answered, dropped,
    deadline misses, errors, the latency p50/p99/max of those frames and the
    mean |IPDV| of the pairs ending in that second."""
    if not frames:
        return []
    n = int(max(f.intended for f in frames)) + 1
    ipdv: list[list[float]] = [[] for _ in range(n)]
    for fs in by_stream:
        for a, b in zip(fs, fs[1:], strict=False):
            la, lb = a.latency_ms, b.latency_ms
            if la is not None and lb is not None:
                ipdv[min(n - 1, int(b.intended))].append(abs(lb - la))
    rows: list[dict[str, Any]] = [{"t": i, "sent": 0, "answered": 0, "dropped": 0, "misses": 0, "errors": 0}
                                  for i in range(n)]
    lat: list[list[float]] = [[] for _ in range(n)]
    for f in frames:
        row = rows[min(n - 1, int(f.intended))]
        row["sent"] += 1
        if f.outcome == ANSWERED:
            row["answered"] += 1
            v = f.latency_ms
            assert v is not None
            lat[min(n - 1, int(f.intended))].append(v)
            if v > deadline_ms:
                row["misses"] += 1
        elif f.outcome == ERROR:
            row["errors"] += 1
        else:
            row["dropped"] += 1
    for row, values, d in zip(rows, lat, ipdv, strict=True):
        if d:
            row["ipdv_mean"] = _ms(math.fsum(d) / len(d))
        if values:
            values.sort()
            row["p50"] = _ms(values[(len(values) - 1) // 2])
            row["p99"] = _ms(values[max(0, math.ceil(0.99 * len(values)) - 1)])
            row["max"] = _ms(values[-1])
    return rows


def analyse(run: StreamRun) -> dict[str, Any]:
    """The result document of one stream run."""
    cfg = run.cfg
    seconds = schedule_s(run)
    live = [s for s in run.streams if s.ws is not None]
    per: list[dict[str, Any]] = []
    for s in run.streams:
        fs = s.ledger.frames
        d: dict[str, Any] = {"stream": s.index, "offset_ms": _ms(s.offset * 1000)}
        d.update(figures(fs, [fs], seconds if s.ws is not None else 0.0, cfg.deadline_ms, cfg.late_ms, s.not_sent))
        d.update({"connect_ms": None if s.connect_ms is None else _ms(s.connect_ms), "subprotocol": s.subprotocol,
                  "upgrade_status": s.upgrade_status, "upgrade_hops_ms": _upgrade_hops(s),
                  "close_code": s.close_code, "error": s.error, "error_detail": s.error_detail,
                  "unmatched_answers": s.ledger.unmatched})
        per.append(d)
    frames = sorted((f for s in run.streams for f in s.ledger.frames), key=lambda f: (f.intended, f.stream))
    res: dict[str, Any] = {
        "format": FORMAT,
        "command": "stream",
        "label": cfg.label,
        "url": cfg.url,
        "started_at": datetime.fromtimestamp(run.wall_start, UTC).isoformat(timespec="seconds") if run.wall_start
        else None,
        "config": cfg.public() | {"frame_sizes": sorted({len(b) for _, b in run.frames})},
        "machine": None,
        "streams_asked": cfg.streams,
        "streams_connected": len(live),
        "fps": cfg.fps,
        "offered_fps": round(cfg.fps * cfg.streams, 3),
        "schedule_s": seconds,
        "duration_s": round(run.span_s, 4),
        "stagger": f"stream i starts i/(streams*fps) s after stream 0: evenly within one frame interval "
                   f"({1000 / cfg.fps:.3g} ms)",
        "latency_from": "scheduled send time",
    }
    res.update(figures(frames, [s.ledger.frames for s in run.streams], seconds if live else 0.0, cfg.deadline_ms,
                       cfg.late_ms, sum(s.not_sent for s in run.streams)))
    res["achieved_fps_per_stream"] = round(res["achieved_fps"] / len(live), 3) if live and res["achieved_fps"] \
        is not None else None
    res["upgrade_hops_ms"] = {h: stats.summary(vals) for h in UPGRADE_HOPS
                              if (vals := [p["upgrade_hops_ms"][h] for p in per if h in p["upgrade_hops_ms"]])}
    res["connect_ms"] = stats.summary([p["connect_ms"] for p in per if p["connect_ms"] is not None])
    res["tunnel_rtt_ms"] = run.tunnel_rtt_ms
    res["unmatched_answers"] = sum(s.ledger.unmatched for s in run.streams)
    res["interrupted"] = run.interrupted
    res["cause"] = cause(run)
    res["timeline"] = _timeline(frames, [s.ledger.frames for s in run.streams], cfg.deadline_ms)
    lat = [v for f in frames if (v := f.latency_ms) is not None]
    res["distribution"] = _distribution(lat, stats.pdv(lat))
    labels = Counter(f.label for f in frames if f.label is not None)
    if labels:
        res["labels"] = dict(labels.most_common(20))
    res["streams"] = per
    return res


def capacity_json(search: Any, steps: Sequence[dict[str, Any]], cfg: Any, step_s: float) -> dict[str, Any]:
    return {
        "fps": cfg.fps,
        "threshold": search.threshold,
        "step_duration_s": step_s,
        "deadline_ms": cfg.deadline_ms,
        "max_streams": search.max_streams,
        "sustained_streams": search.sustained,
        "failed_at_streams": search.failed_at,
        "rule": "doubling from 1 while the miss ratio ((deadline misses + drops + errors + unsent) / frames) "
                "is at most the threshold, then bisection between the last passing and first failing count",
        "steps": [{k: st[k] for k in ("streams", "frames_sent", "frames_answered", "frames_dropped",
                                      "deadline_misses", "frames_errors", "miss_ratio", "achieved_fps",
                                      "latency_ms", "jitter_ms", "passed")} for st in steps],
    }


# -- terminal ------------------------------------------------------------------------


def _lat_cols(t: Table) -> None:
    for k in ("p50", "p90", "p99", "p999", "max", "mean"):
        t.add_column(k, justify="right")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def print_summary(res: dict[str, Any], console: Console) -> None:
    cfg = res["config"]
    size = ", ".join(str(s) for s in cfg.get("frame_sizes", [])[:4])
    console.print(f"stream {res['url']} - {res['streams_connected']}/{res['streams_asked']} streams x "
                  f"{res['fps']:g} fps, frames of {size} bytes, deadline {cfg['deadline_ms']:g} ms",
                  style="bold", highlight=False)
    if res.get("cause"):  # failures first
        console.print(res["cause"], style="bold red", highlight=False)
    console.print(f"frames sent {res['frames_sent']}, answered {res['frames_answered']}, dropped "
                  f"{res['frames_dropped']} (by the server {res['dropped_by_server']}, unanswered "
                  f"{res['unanswered']}), deadline misses {res['deadline_misses']}, errors {res['frames_errors']}"
                  f"; achieved {_f(res['achieved_fps'], 1)} fps ({_f(res['achieved_fps_per_stream'], 1)} per "
                  f"stream), miss ratio {_pct(res['miss_ratio'])}",
                  highlight=False)
    t = Table(title="latency (ms, from each frame's scheduled send time)", title_justify="left")
    t.add_column("")
    _lat_cols(t)
    t.add_column("n", justify="right")

    def row(name: str, s: dict[str, Any] | None) -> None:
        if s and s.get("count"):
            t.add_row(name, *(_f(s.get(k)) for k in stats.FIELDS), str(s.get("count")))

    row("latency", res["latency_ms"])
    row("jitter |IPDV|", res["jitter_ms"])
    row("jitter PDV", res["jitter_ms"].get("pdv"))
    for name, s in res["server_timing_ms"].items():
        row("  server " + name, s)
    for name, s in res["upgrade_hops_ms"].items():
        row("  upgrade " + name, s)
    row("connect (upgrade)", res["connect_ms"])
    if t.row_count:
        console.print(t)
    j = res["jitter_ms"]
    console.print(f"jitter: RFC 3550 J {_f(j['rfc3550'], 3)} ms (mean of the streams', max "
                  f"{_f(j['rfc3550_max'], 3)}), |IPDV| p50 {_f(j['p50'], 3)} p99 {_f(j['p99'], 3)} ms",
                  highlight=False)
    if res.get("late_sends"):
        console.print(f"late sends (> {cfg['late_ms']:g} ms after the schedule): {res['late_sends']}, lag p99 "
                      f"{_f(res['send_lag_ms']['p99'], 3)} ms", highlight=False)
    if res.get("tunnel_rtt_ms"):
        console.print("tunnel heartbeat RTT (the edge's reading of the link, not part of a frame): " + ", ".join(
            f"{k} {v:.2f} ms" for k, v in res["tunnel_rtt_ms"].items()), highlight=False)
    if res.get("unmatched_answers"):
        console.print(f"answers matching no waiting frame: {res['unmatched_answers']}", highlight=False)

    st = Table(title="per stream", title_justify="left")
    for c in ("#", "sent", "ans", "drop", "miss", "err", "fps", "p50", "p99", "max", "J", "IPDV99", "end"):
        st.add_column(c, justify="right")
    for p in res["streams"][:64]:
        end = p["error"] or "ok"
        if p["close_code"] is not None:
            end += f" {p['close_code']}"
        st.add_row(str(p["stream"]), str(p["frames_sent"]), str(p["frames_answered"]), str(p["frames_dropped"]),
                   str(p["deadline_misses"]), str(p["frames_errors"]), _f(p["achieved_fps"], 1),
                   _f(p["latency_ms"]["p50"]), _f(p["latency_ms"]["p99"]), _f(p["latency_ms"]["max"]),
                   _f(p["jitter_ms"]["rfc3550"], 3), _f(p["jitter_ms"]["p99"], 3), end)
    console.print(st)
    if len(res["streams"]) > 64:
        console.print(f"(first 64 of {len(res['streams'])} streams; all are in the JSON)", highlight=False)
    if res.get("capacity"):
        print_capacity(res["capacity"], console)


def print_capacity(cap: dict[str, Any], console: Console) -> None:
    t = Table(title=f"capacity at {cap['fps']:g} fps per stream, deadline {cap['deadline_ms']:g} ms, "
                    f"threshold {100 * cap['threshold']:g}% misses", title_justify="left")
    for c in ("streams", "sent", "ans", "drop", "miss", "err", "miss %", "fps", "p50", "p99", "J", "verdict"):
        t.add_column(c, justify="right")
    for s in cap["steps"]:
        t.add_row(str(s["streams"]), str(s["frames_sent"]), str(s["frames_answered"]), str(s["frames_dropped"]),
                  str(s["deadline_misses"]), str(s["frames_errors"]),
                  _f(100 * s["miss_ratio"] if s["miss_ratio"] is not None else None), _f(s["achieved_fps"], 1),
                  _f(s["latency_ms"]["p50"]), _f(s["latency_ms"]["p99"]), _f(s["jitter_ms"]["rfc3550"], 3),
                  "pass" if s["passed"] else "FAIL")
    console.print(t)
    n = cap["sustained_streams"]
    if n is None:
        console.print(f"sustained: none - even {cap['steps'][0]['streams']} stream(s) missed more than "
                      f"{100 * cap['threshold']:g}% of the frames", highlight=False)
    else:
        beyond = (f"{cap['failed_at_streams']} did not" if cap["failed_at_streams"] is not None
                  else f"the search stopped at --max-streams {cap['max_streams']}")
        console.print(f"sustained: {n} real-time stream(s) at {cap['fps']:g} fps ({beyond})", style="bold",
                      highlight=False)
