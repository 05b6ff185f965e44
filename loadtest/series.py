"""The series of a run: throughput and mean latency per stability window,
per-second rows of the timeline (rates weighted by the part of the second the
run covered, so a partial last second is not drawn as a collapse), and the
latency distribution (CDF points, histogram). Pure functions of records."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from . import stats
from .runner import Record

CDF_PERCENTILES = (0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 97.5, 98, 99, 99.5, 99.75, 99.9,
                   99.95, 99.99, 100)
HISTOGRAM_BINS = 40
# A per-second bin covering less of its second than this is left out of the
# rates: a rate from a sliver of a second is noise, not a collapse.
MIN_BIN_COVER = 0.5


def _ms(x: float) -> float:
    return round(x, 4)


def stability(measured: Sequence[Record], first: float, last: float, n: int) -> dict[str, Any]:
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


def timeline(measured: Sequence[Record], first: float, last: float) -> list[dict[str, Any]]:
    """Per second since the first measured send: completions (ok, errors,
    status codes) by completion time; latency p50/p99/max and mean IPDV of
    the requests intended to be sent in that second. `cover_s` is the part
    of the second the run covered; the rates (`ok_rps`, `errors_rps`,
    `sent_rps`) are counts divided by it, and None for a bin covering less
    than MIN_BIN_COVER of its second."""
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
        cover = min(1.0, last - first - i)
        row["cover_s"] = round(cover, 4)
        for k in ("ok", "errors", "sent"):
            row[f"{k}_rps"] = round(row[k] / cover, 3) if cover >= MIN_BIN_COVER else None
        values = sorted(lat[i])
        if values:
            row["p50"] = _ms(pct(values, 50))
            row["p99"] = _ms(pct(values, 99))
            row["max"] = _ms(values[-1])
        if ipdv[i]:
            row["ipdv_mean"] = _ms(math.fsum(ipdv[i]) / len(ipdv[i]))
    return rows


def pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (per-second figures, where an HdrHistogram
    per bucket would be overkill)."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def distribution(latency: Sequence[float], pdv: Sequence[float]) -> dict[str, Any]:
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
