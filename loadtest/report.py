"""From records to results: the JSON document of a run, the one-line cause of
failures, the summary table and the side-by-side comparison."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from . import hops as hoplib
from . import stats
from .runner import Record, Run, RunConfig

FORMAT = "loadtest-result/1"
CDF_PERCENTILES = (0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 97.5, 98, 99, 99.5, 99.75, 99.9,
                   99.95, 99.99, 100)
HISTOGRAM_BINS = 40


def _ms(x: float) -> float:
    return round(x, 4)


def record_hops(r: Record) -> dict[str, float]:
    """Every hop of one request: client phases, Server-Timing entries, derived
    hops. Computed after the run (keeping the hot path lean), once."""
    if r.hops is not None:
        return r.hops
    h: dict[str, float] = {}
    if r.timing is not None:
        h.update(r.timing.phases())
    if r.server_timing:
        h.update(hoplib.parse_server_timing([r.server_timing]))
    h.update(hoplib.derive(h))
    r.hops = h
    return h


def cause(run_errors: Counter[str], details: dict[str, str], total: int, cfg: RunConfig) -> str | None:
    """One line naming the main failure, with a hint at the fix."""
    if not run_errors:
        return None
    kind, n = run_errors.most_common(1)[0]
    d = details.get(kind, "")
    host = f"{cfg.url}"
    if kind == "connect":
        text = f"cannot connect to {host}: {d}"
    elif kind == "tls":
        text = (f"TLS failure talking to {host}: {d} (give the server's CA with --ca FILE, "
                "or --insecure to skip verification)")
    elif kind == "timeout":
        text = f"no complete answer within --timeout {cfg.timeout:g} s"
    elif kind == "disconnected":
        text = f"{d}"
    elif kind == "bad answer":
        text = f"{d} (is --url the inference server's POST /photo?)"
    elif kind.startswith("HTTP "):
        code = int(kind[5:])
        hint = {401: " (check --api-key)", 403: " (this key may not do that)", 404: " (check the --url path)",
                429: " (rate limited: lower --rate, or use a key with a higher limit)",
                502: " (the edge could not get an answer from a worker)",
                503: " (no worker available, or the server is not ready)",
                504: " (the worker did not answer in time)"}.get(code, " (server error)" if code >= 500 else "")
        text = f"{kind} {d}{hint}"
    else:
        text = f"{kind}: {d}"
    line = f"{n} of {total} requests failed: {text}"
    others = [f"{k} x{c}" for k, c in run_errors.most_common()[1:4]]
    if others:
        line += " (also " + ", ".join(others) + ")"
    return line


def analyse(run: Run) -> dict[str, Any]:
    """The result document of one run (the fields of DESIGN.md and more)."""
    cfg = run.cfg
    measured = [r for r in run.records if not r.warmup]
    measured.sort(key=lambda r: (r.intended, r.seq))
    ok = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    errors = Counter(r.error or "?" for r in failed)
    # A run that failed in its warm-up still owes the reader a cause.
    warm_errors = Counter(r.error or "?" for r in run.records if r.warmup and not r.ok)
    why = errors if errors or ok else warm_errors
    status = Counter(str(r.status) for r in measured if r.status)

    latency = [r.latency_ms for r in ok]
    service = [r.service_ms for r in ok]
    if measured:
        first = min(r.intended for r in measured)
        last = max(r.done for r in measured)
        span = max(last - first, 1e-9)
    else:
        first = last = span = 0.0
    sends = sorted(r.sent for r in measured)
    send_rate = (len(sends) - 1) / (sends[-1] - sends[0]) if len(sends) > 1 and sends[-1] > sends[0] else None

    per_hop: dict[str, list[float]] = defaultdict(list)
    seg_sum: dict[str, float] = defaultdict(float)
    for r in ok:
        h = record_hops(r)
        for k, v in h.items():
            per_hop[k].append(v)
        for k, v in hoplib.segments(r.latency_ms, h).items():
            seg_sum[k] += v
    hops_ms = {k: stats.summary(per_hop[k]) for k in sorted(per_hop, key=hoplib.order_key)}
    breakdown = [[k, _ms(seg_sum[k] / len(ok))] for k in hoplib.SEGMENTS if k in seg_sum] if ok else []

    lags = [r.lag_ms for r in measured]
    late = sum(1 for x in lags if x > cfg.late_ms)

    result: dict[str, Any] = {
        "format": FORMAT,
        "command": cfg.command,
        "label": cfg.label,
        "url": cfg.url,
        "started_at": datetime.fromtimestamp(run.wall_start, UTC).isoformat(timespec="seconds") if run.wall_start
        else None,
        "config": cfg.public(),
        "machine": None,
        "requests": len(measured),
        "ok": len(ok),
        "errors": len(failed),
        "error_rate": round(len(failed) / len(measured), 6) if measured else None,
        "error_kinds": dict(errors.most_common()),
        "error_details": {k: run.details.get(k, "") for k in errors},
        "cause": cause(why, run.details, len(measured) if why is errors else sum(why.values()) + sum(
            1 for r in run.records if r.warmup and r.ok), cfg),
        "warmup_errors": sum(warm_errors.values()),
        "aborted": run.aborted,
        "cancelled_in_flight": run.cancelled_in_flight,
        "warmup_requests": len(run.records) - len(measured),
        "status_counts": dict(sorted(status.items())),
        "duration_s": round(span, 4),
        "throughput_rps": round(len(ok) / span, 3) if measured else 0.0,
        "offered_rps": cfg.rate if cfg.mode == "open" else None,
        "send_rate_rps": round(send_rate, 3) if send_rate else None,
        "latency_from": "intended send time" if cfg.mode == "open" else "send time (closed loop)",
        "latency_ms": stats.summary(latency),
        "service_time_ms": stats.summary(service),
        "jitter_ms": stats.jitter_summary(latency),
        "hops_ms": hops_ms,
        "breakdown_ms": breakdown,
        "late_sends": {
            "count": late,
            "fraction": round(late / len(measured), 6) if measured else None,
            "threshold_ms": cfg.late_ms,
            "lag_ms": stats.summary(lags),
        } if cfg.mode == "open" else None,
        "stability": _stability(measured, first, last, cfg.windows),
        "timeline": _timeline(measured, first, last),
        "distribution": _distribution(latency, stats.pdv(latency)),
        "tunnel_rtt_ms": run.tunnel_rtt_ms,
    }
    if cfg.command == "classify":
        result["labels"] = dict(Counter(r.label for r in ok if r.label is not None).most_common())
    return result


def _stability(measured: Sequence[Record], first: float, last: float, n: int) -> dict[str, Any]:
    """Throughput per window by completion time over [first, last]; mean
    latency per window by intended send time over the span of the sends (so
    the tail after the last send leaves no empty latency window)."""
    ok = [r for r in measured if r.ok]
    if not ok:
        out = stats.stability([], [])
        out.update(stable=None, reason="no successful request to judge", per_window=[])
        return out
    wins = stats.windows(first, last, n)
    last_sent = max(r.intended for r in ok)
    lat_wins = stats.windows(first, last_sent, n) or [(first, last_sent)] * len(wins)
    done = [0] * len(wins)
    sums = [0.0] * len(wins)
    counts = [0] * len(wins)

    def index(t: float, span: list[tuple[float, float]]) -> int:
        a0, b0 = span[0]
        return min(len(span) - 1, max(0, int((t - a0) / (b0 - a0)))) if b0 > a0 else 0

    for r in ok:
        done[index(r.done, wins)] += 1
        j = index(r.intended, lat_wins)
        sums[j] += r.latency_ms
        counts[j] += 1
    thr = [done[i] / (b - a) for i, (a, b) in enumerate(wins)]
    lat = [sums[i] / counts[i] if counts[i] else 0.0 for i in range(len(wins))]
    rows = [{"start_s": round(a - first, 3), "throughput_rps": round(thr[i], 3), "latency_mean_ms": _ms(lat[i])}
            for i, (a, _) in enumerate(wins)]
    out = stats.stability(thr, lat)
    out["per_window"] = rows
    return out


def _timeline(measured: Sequence[Record], first: float, last: float) -> list[dict[str, Any]]:
    """Per second since the first measured send: completions (ok, errors,
    status codes) by completion time; latency p50/p99/max and mean IPDV of
    the requests intended to be sent in that second."""
    if not measured:
        return []
    n = int(math.floor(last - first)) + 1
    rows: list[dict[str, Any]] = [{"t": i, "ok": 0, "errors": 0, "sent": 0, "status": Counter()} for i in range(n)]
    lat: list[list[float]] = [[] for _ in range(n)]
    prev: float | None = None
    for r in measured:  # in intended order
        i = min(n - 1, max(0, int(r.done - first)))
        row = rows[i]
        row["ok" if r.ok else "errors"] += 1
        row["status"][str(r.status) if r.status else (r.error or "?")] += 1
        j = min(n - 1, max(0, int(r.intended - first)))
        rows[j]["sent"] += 1
        if r.ok:
            lat[j].append(r.latency_ms)
    ipdv: list[list[float]] = [[] for _ in range(n)]
    for r in (r for r in measured if r.ok):
        if prev is not None:
            ipdv[min(n - 1, max(0, int(r.intended - first)))].append(abs(r.latency_ms - prev))
        prev = r.latency_ms
    for i, row in enumerate(rows):
        row["status"] = dict(row["status"])
        values = sorted(lat[i])
        if values:
            row["p50"] = _ms(_pct(values, 50))
            row["p99"] = _ms(_pct(values, 99))
            row["max"] = _ms(values[-1])
        if ipdv[i]:
            row["ipdv_mean"] = _ms(math.fsum(ipdv[i]) / len(ipdv[i]))
    return rows


def _pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (per-second figures, where an HdrHistogram
    per bucket would be overkill)."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _distribution(latency: Sequence[float], pdv: Sequence[float]) -> dict[str, Any]:
    if not latency:
        return {"latency_cdf": [], "pdv_cdf": [], "histogram": None}
    h = stats.histogram(latency)
    hp = stats.histogram(pdv)
    lo, hi = min(latency), max(latency)

    def cdf(hist: Any, vmin: float, vmax: float) -> list[list[float]]:
        at = stats.percentiles(hist, CDF_PERCENTILES)
        return [[p, _ms(min(vmax, max(vmin, at[p])))] for p in CDF_PERCENTILES]

    # Histogram up to the p99.9 so one outlier does not squash the shape.
    top = min(hi, stats.percentiles(h, [99.9])[99.9])
    width = (top - lo) / HISTOGRAM_BINS if top > lo else 1.0
    counts = [0] * HISTOGRAM_BINS
    beyond = 0
    for v in latency:
        i = int((v - lo) / width)
        if i >= HISTOGRAM_BINS:
            if v > top:
                beyond += 1
                continue
            i = HISTOGRAM_BINS - 1
        counts[i] += 1
    return {
        "latency_cdf": cdf(h, lo, hi),
        "pdv_cdf": cdf(hp, 0.0, max(pdv)),
        "histogram": {"start_ms": _ms(lo), "width_ms": _ms(width), "counts": counts, "beyond": beyond},
    }


def records_json(run: Run) -> list[dict[str, Any]]:
    out = []
    for r in sorted(run.records, key=lambda r: r.seq):
        d: dict[str, Any] = {
            "seq": r.seq, "intended_s": round(r.intended, 6), "sent_s": round(r.sent, 6), "done_s": round(r.done, 6),
            "latency_ms": _ms(r.latency_ms), "service_ms": _ms(r.service_ms), "status": r.status, "ok": r.ok,
        }
        if r.error:
            d["error"] = r.error
        if r.warmup:
            d["warmup"] = True
        if r.label is not None:
            d["label"] = r.label
        if r.ok:
            d["hops_ms"] = {k: _ms(v) for k, v in record_hops(r).items()}
        out.append(d)
    return out


# -- text output ---------------------------------------------------------------


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_summary(res: dict[str, Any], console: Console) -> None:
    cfg = res["config"]
    if cfg["mode"] == "open":
        load = f"open loop, {cfg['arrivals']} arrivals at {cfg['rate']:g} req/s"
    else:
        load = f"closed loop, concurrency {cfg['concurrency']}"
    title = f"{res['command']} {res['url']} - {load}"
    console.print(title, style="bold", highlight=False)
    line = (f"requests {res['requests']} (+{res['warmup_requests']} warm-up), ok {res['ok']}, errors {res['errors']}"
            f", {res['duration_s']:.2f} s, throughput {res['throughput_rps']:.1f} req/s")
    if res.get("send_rate_rps"):
        line += f", sent {res['send_rate_rps']:.1f} req/s"
    console.print(line, highlight=False)

    t = Table(title=f"latency (ms, from the {res['latency_from']})", title_justify="left")
    t.add_column("")
    for k in stats.FIELDS:
        t.add_column(k, justify="right")
    t.add_column("n", justify="right")

    def row(name: str, s: dict[str, Any] | None) -> None:
        if s:
            t.add_row(name, *(_f(s.get(k)) for k in stats.FIELDS), str(s.get("count", "")))

    row("latency", res["latency_ms"])
    if cfg["mode"] == "open":
        row("service time", res["service_time_ms"])
    j = res["jitter_ms"]
    row("jitter PDV", j)
    row("jitter IPDV", j.get("ipdv"))
    for name, s in res["hops_ms"].items():
        row("  " + name, s)
    console.print(t)
    if j.get("count"):
        console.print(f"jitter: p99-p50 spread {_f(j['spread_p99_p50'])} ms, mean IPDV {_f(j['ipdv_mean'])} ms, "
                      f"RFC 3550 J {_f(j['rfc3550'])} ms", highlight=False)
    if res.get("breakdown_ms"):
        console.print("mean breakdown: " + ", ".join(f"{k} {v:.2f}" for k, v in res["breakdown_ms"]) + " (ms)",
                      highlight=False)
    if res.get("late_sends"):
        ls = res["late_sends"]
        console.print(f"late sends (> {ls['threshold_ms']:g} ms after the intended time): {ls['count']}"
                      f", lag p50 {_f(ls['lag_ms']['p50'], 3)} ms, p99 {_f(ls['lag_ms']['p99'], 3)} ms",
                      highlight=False)
    st = res["stability"]
    verdict = {True: "stable", False: "NOT stable", None: "not judged"}[st.get("stable")]
    console.print(f"stability: {verdict} ({st.get('reason')}; {st['criterion']})", highlight=False)
    if res.get("error_kinds"):
        console.print("errors: " + ", ".join(f"{k} x{v}" for k, v in res["error_kinds"].items()), highlight=False)
    if res["status_counts"]:
        console.print("status: " + ", ".join(f"{k} x{v}" for k, v in res["status_counts"].items()), highlight=False)
    if res.get("labels"):
        console.print("labels: " + ", ".join(f"{k} x{v}" for k, v in list(res["labels"].items())[:10]),
                      highlight=False)
    if res.get("tunnel_rtt_ms"):
        console.print("tunnel RTT (edge heartbeats): " + ", ".join(f"{k} {v:.2f} ms"
                                                                   for k, v in res["tunnel_rtt_ms"].items()),
                      highlight=False)
    if res.get("sweep"):
        print_sweep(res["sweep"], console)


def print_sweep(sweep: dict[str, Any], console: Console) -> None:
    t = Table(title="sweep", title_justify="left")
    for c in ("offered req/s", "throughput", "errors", "p50 ms", "p99 ms", "p99.9 ms", "late sends"):
        t.add_column(c, justify="right")
    for p in sweep["points"]:
        t.add_row(_f(p["offered_rps"], 1), _f(p["throughput_rps"], 1), str(p["errors"]), _f(p["latency_ms"]["p50"]),
                  _f(p["latency_ms"]["p99"]), _f(p["latency_ms"]["p999"]), str((p.get("late_sends") or {}).get("count")))
    console.print(t)
    k = sweep["knee"]
    console.print(f"knee: {_f(k['knee_rps'], 1)} req/s - {k['reason']}", highlight=False)


COMPARE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("requests", ("requests",)), ("errors", ("errors",)), ("throughput req/s", ("throughput_rps",)),
    ("latency p50", ("latency_ms", "p50")), ("latency p90", ("latency_ms", "p90")),
    ("latency p99", ("latency_ms", "p99")), ("latency p99.9", ("latency_ms", "p999")),
    ("latency max", ("latency_ms", "max")), ("latency mean", ("latency_ms", "mean")),
    ("jitter p99-p50", ("jitter_ms", "spread_p99_p50")), ("jitter PDV p99", ("jitter_ms", "p99")),
    ("IPDV mean", ("jitter_ms", "ipdv_mean")), ("RFC 3550 J", ("jitter_ms", "rfc3550")),
)


def _get(d: Any, path: Sequence[str]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def print_compare(results: Sequence[dict[str, Any]], names: Sequence[str], console: Console) -> None:
    t = Table(title="comparison (ms unless noted)", title_justify="left")
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    for label, path in COMPARE_ROWS:
        t.add_row(label, *(_f(_get(r, path)) for r in results))
    hop_names: list[str] = []
    for r in results:
        for h in r.get("hops_ms", {}):
            if h not in hop_names:
                hop_names.append(h)
    hop_names.sort(key=hoplib.order_key)
    for h in hop_names:
        t.add_row(f"{h} p50 / p99", *(
            f"{_f(_get(r, ('hops_ms', h, 'p50')))} / {_f(_get(r, ('hops_ms', h, 'p99')))}"
            if h in r.get("hops_ms", {}) else "-" for r in results))
    console.print(t)
    for n, r in zip(names, results, strict=True):
        cfg = r.get("config", {})
        load = f"rate {cfg.get('rate')}" if cfg.get("mode") == "open" else f"concurrency {cfg.get('concurrency')}"
        console.print(f"{n}: {r.get('command')} {r.get('url')} ({load}, pool {cfg.get('pool') or '-'})",
                      highlight=False)
