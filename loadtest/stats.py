"""The statistics of a run, as pure functions of plain sequences: HdrHistogram
percentiles, jitter (PDV, IPDV, RFC 3550 J), stability windows and the knee.

Nothing here reads a clock or does I/O; time is always an argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from hdrh.histogram import HdrHistogram

# Recorded in microseconds: 1 us resolution, up to one hour, 3 significant
# digits (a relative error of at most 0.1% on every percentile).
HDR_LOWEST_US = 1
HDR_HIGHEST_US = 3_600_000_000
HDR_DIGITS = 3
SUB_BUCKET_BITS = 11  # 3 significant digits -> 2048 sub-buckets per bucket

PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))
FIELDS = ("p50", "p90", "p99", "p999", "max", "mean")

# The RFC 3550 jitter estimator's gain: J += (|D| - J) / 16.
RFC3550_GAIN = 1 / 16


def histogram(values_ms: Sequence[float]) -> HdrHistogram:
    """An HdrHistogram of millisecond values, recorded in whole microseconds.
    Negative values (a derived hop can dip below 0 by rounding) record as 0.

    Values are first folded onto the histogram's own resolution (its lowest
    equivalent value: 2048 sub-buckets, i.e. the top 11 bits kept) and
    counted with numpy, so a run of a million requests costs a few thousand
    `record_value` calls instead of a million. The result is identical."""
    h = HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS)
    if len(values_ms) == 0:
        return h
    us = np.clip(np.rint(np.asarray(values_ms, dtype=np.float64) * 1000), 0, HDR_HIGHEST_US).astype(np.int64)
    _, bits = np.frexp(us.astype(np.float64))  # the exponent is the bit length: exact
    shift = np.maximum(0, bits.astype(np.int64) - SUB_BUCKET_BITS)
    folded = (us >> shift) << shift
    values, counts = np.unique(folded, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        h.record_value(v, c)
    return h


def percentiles(h: HdrHistogram, ps: Sequence[float]) -> dict[float, float]:
    """Values in ms at the percentiles `ps` (one pass over the histogram)."""
    got = h.get_percentile_to_value_dict(list(ps))
    return {p: got.get(p, 0) / 1000 for p in ps}


def summary(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """count, min, p50, p90, p99, p999, max, mean of millisecond values.

    Percentiles come from the HdrHistogram (within 0.1%), clamped into the
    exact [min, max]; min, max and mean are exact. Empty input gives None
    for every statistic and count 0."""
    n = len(values_ms)
    if n == 0:
        return {"count": 0, "min": None, **{k: None for k in FIELDS}}
    lo, hi = min(values_ms), max(values_ms)
    # The histogram holds non-negative values only; a derived hop can dip
    # below 0 (two clocks' rounding), so shift the whole set up and back.
    offset = -lo if lo < 0 else 0.0
    shifted = [v + offset for v in values_ms] if offset else values_ms
    at = percentiles(histogram(shifted), [p for _, p in PERCENTILES])
    out: dict[str, float | int | None] = {"count": n, "min": _r(lo)}
    for name, p in PERCENTILES:
        out[name] = _r(min(hi, max(lo, at[p] - offset)))
    out["max"] = _r(hi)
    out["mean"] = _r(math.fsum(values_ms) / n)
    return out


def _r(v: float) -> float:
    return round(v, 4)


def pdv(latencies_ms: Sequence[float]) -> list[float]:
    """Packet delay variation (ITU-T Y.1540 / RFC 5481): each latency minus the minimum."""
    if not latencies_ms:
        return []
    m = min(latencies_ms)
    return [v - m for v in latencies_ms]


def ipdv(latencies_ms: Sequence[float]) -> list[float]:
    """Inter-packet delay variation (RFC 3393): |L_i - L_(i-1)| for consecutive
    requests. The caller passes latencies in intended-send order."""
    return [abs(b - a) for a, b in pairwise(latencies_ms)]


def rfc3550_jitter(latencies_ms: Sequence[float]) -> float:
    """RFC 3550's interarrival jitter J, the running estimate J += (|D| - J)/16
    with D = L_i - L_(i-1) (a transit-time difference), starting from J = 0.
    Returns the final J; 0 for fewer than two samples."""
    j = 0.0
    for a, b in pairwise(latencies_ms):
        j += (abs(b - a) - j) * RFC3550_GAIN
    return j


def jitter_summary(latencies_ms: Sequence[float]) -> dict[str, object]:
    """Jitter of latencies given in intended-send order: PDV percentiles (the
    JSON's jitter_ms fields), the p99-p50 spread (the headline), IPDV (mean
    |dL| and percentiles) and RFC 3550's J."""
    p = summary(pdv(latencies_ms))
    out: dict[str, object] = {k: p[k] for k in FIELDS}
    out["count"] = p["count"]
    if latencies_ms:
        out["spread_p99_p50"] = _r(float(p["p99"]) - float(p["p50"]))  # type: ignore[arg-type]
        out["min_latency"] = _r(min(latencies_ms))
    else:
        out["spread_p99_p50"] = None
        out["min_latency"] = None
    d = ipdv(latencies_ms)
    out["ipdv"] = summary(d)
    out["ipdv_mean"] = out["ipdv"]["mean"]  # type: ignore[index]
    out["rfc3550"] = _r(rfc3550_jitter(latencies_ms)) if len(latencies_ms) > 1 else None
    return out


def windows(start: float, end: float, n: int) -> list[tuple[float, float]]:
    """`n` equal windows covering [start, end)."""
    if n <= 0 or end <= start:
        return []
    width = (end - start) / n
    return [(start + i * width, start + (i + 1) * width) for i in range(n)]


def within(values: Sequence[float], tolerance: float) -> bool:
    """Every value within +/- tolerance (a fraction) of their mean."""
    mean = math.fsum(values) / len(values)
    if mean == 0:
        return all(v == 0 for v in values)
    return all(abs(v - mean) <= tolerance * abs(mean) for v in values)


def stability(throughputs: Sequence[float], latencies: Sequence[float], last: int = 3,
              tolerance: float = 0.10) -> dict[str, object]:
    """perf_analyzer's criterion: the run is stable when the last `last`
    windows' throughput and mean latency are each within `tolerance` of their
    own mean. With fewer windows it says so instead of guessing."""
    out: dict[str, object] = {"criterion": f"last {last} windows: throughput and mean latency each within "
                                           f"{tolerance:.0%} of their mean", "windows": len(throughputs)}
    if len(throughputs) < last or len(latencies) < last:
        out.update(stable=None, reason=f"only {len(throughputs)} windows, need {last}")
        return out
    if not any(throughputs[-last:]):
        out.update(stable=None, reason="nothing completed in the last windows")
        return out
    t_ok = within(throughputs[-last:], tolerance)
    l_ok = within(latencies[-last:], tolerance)
    out["stable"] = t_ok and l_ok
    t_sp, l_sp = spread(throughputs[-last:]), spread(latencies[-last:])
    out["throughput_spread"], out["latency_spread"] = round(t_sp, 4), round(l_sp, 4)
    reasons = []
    if not t_ok:
        reasons.append(f"throughput moved {t_sp:.0%} over the last {last} windows")
    if not l_ok:
        reasons.append(f"mean latency moved {l_sp:.0%} over the last {last} windows")
    out["reason"] = "; ".join(reasons) if reasons else (
        f"throughput within {t_sp:.0%} and mean latency within {l_sp:.0%} over the last {last} windows")
    return out


def spread(values: Sequence[float]) -> float:
    """The largest distance of a value from the mean, as a fraction of it."""
    mean = math.fsum(values) / len(values)
    return max(abs(v - mean) for v in values) / abs(mean) if mean else 0.0


def find_knee(points: Sequence[tuple[float, float, float]], min_ratio: float = 0.9,
              latency_factor: float = 3.0) -> dict[str, object]:
    """The knee of a sweep: `points` are (offered rate, achieved throughput, p99
    latency ms). A rate is sustained when its throughput is at least
    `min_ratio` of the offered rate and its p99 at most `latency_factor` times
    the p99 at the lowest rate. The knee is the highest rate such that it and
    every lower rate is sustained; `saturated_at_rps` the first rate that is not."""
    pts = sorted(points)
    if not pts:
        return {"knee_rps": None, "saturated_at_rps": None, "reason": "no points"}
    base = pts[0][2]
    knee: float | None = None
    for rate, thr, p99 in pts:
        why = None
        if thr < min_ratio * rate:
            why = f"throughput {thr:.1f} req/s is below {min_ratio:.0%} of the offered {rate:g} req/s"
        elif base > 0 and p99 > latency_factor * base:
            why = f"p99 {p99:.1f} ms is more than {latency_factor:g}x the {base:.1f} ms at {pts[0][0]:g} req/s"
        if why is not None:
            return {"knee_rps": knee, "saturated_at_rps": rate, "reason": f"at {rate:g} req/s {why}"}
        knee = rate
    return {"knee_rps": knee, "saturated_at_rps": None,
            "reason": f"every rate up to {knee:g} req/s was sustained; the knee lies beyond the sweep"}


# -- live streams (loadtest stream) ---------------------------------------------


def consecutive_ipdv(latencies_ms: Sequence[float | None]) -> list[float]:
    """|IPDV| (RFC 5481) of frames given in sequence order, None where a frame
    has no latency (dropped, lost, an error): only pairs of consecutive frames
    that both have one count, since RFC 5481 leaves IPDV undefined across a loss."""
    return [abs(b - a) for a, b in pairwise(latencies_ms) if a is not None and b is not None]


def rfc3550_series(latencies_ms: Sequence[float]) -> list[float]:
    """RFC 3550's J after each sample (0 after the first): the running
    estimate whose last value `rfc3550_jitter` returns."""
    out: list[float] = []
    j = 0.0
    prev: float | None = None
    for v in latencies_ms:
        if prev is not None:
            j += (abs(v - prev) - j) * RFC3550_GAIN
        out.append(j)
        prev = v
    return out


def stream_jitter(latencies_ms: Sequence[float | None]) -> dict[str, object]:
    """Jitter of one stream's frames in sequence order (None: no latency):
    `streams_jitter` of that one stream."""
    out = streams_jitter([latencies_ms])
    del out["rfc3550_max"]
    return out


def streams_jitter(per_stream_ms: Sequence[Sequence[float | None]]) -> dict[str, object]:
    """Jitter of several streams, each given in sequence order: |IPDV| pooled
    over every stream's consecutive answered pairs (never across streams),
    RFC 3550's J as the mean (`rfc3550`) and the largest (`rfc3550_max`) of
    the streams' own final J, and PDV with each latency relative to its own
    stream's minimum."""
    ipdvs: list[float] = []
    pdvs: list[float] = []
    js: list[float] = []
    for lat in per_stream_ms:
        ipdvs.extend(consecutive_ipdv(lat))
        answered = [v for v in lat if v is not None]
        pdvs.extend(pdv(answered))
        if len(answered) > 1:
            js.append(rfc3550_jitter(answered))
    d = summary(ipdvs)
    out: dict[str, object] = {k: d[k] for k in FIELDS}
    out["count"] = d["count"]
    out["rfc3550"] = _r(math.fsum(js) / len(js)) if js else None
    out["rfc3550_max"] = _r(max(js)) if js else None
    out["pdv"] = summary(pdvs)
    return out
