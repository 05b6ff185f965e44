"""What LoadGen said and what `loadtest mlperf` does with it, pure: its
summary and detail logs read into VALID/INVALID, why and the scenario's
metric; whether a run was judged too early (early stopping short of
queries); the peak search of `--find-peak`; the hops of the timed requests
as percentiles."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# -------------------------------------------------------------- the peak search

class PeakSearch:
    """Server --find-peak: the highest target QPS LoadGen judges VALID.
    Doubles from the first QPS until a run is INVALID, then bisects until the
    bracket is within `precision` (a fraction) or `max_steps` runs are spent."""

    def __init__(self, start: float, precision: float = 0.05, max_steps: int = 12, floor: float = 0.5) -> None:
        self.lo: float | None = None  # highest VALID so far
        self.hi: float | None = None  # lowest INVALID so far
        self.precision = precision
        self.max_steps = max_steps
        self.floor = floor
        self.steps: list[tuple[float, bool]] = []
        self._next: float | None = start

    def next_qps(self) -> float | None:
        return self._next

    def record(self, qps: float, valid: bool) -> None:
        self.steps.append((qps, valid))
        if valid:
            self.lo = max(self.lo or 0.0, qps)
        else:
            self.hi = qps if self.hi is None else min(self.hi, qps)
        if len(self.steps) >= self.max_steps:
            self._next = None
        elif self.hi is None:
            self._next = qps * 2
        elif self.lo is None:
            self._next = qps / 2 if qps / 2 >= self.floor else None
        elif self.hi - self.lo <= self.precision * self.hi:
            self._next = None
        else:
            self._next = round((self.lo + self.hi) / 2, 3)

    @property
    def peak(self) -> float | None:
        return self.lo


# -------------------------------------------------------------- LoadGen's results

def read_summary(out: Path) -> dict[str, Any]:
    """VALID/INVALID, why, and LoadGen's own figures, from its logs."""
    text = (out / "mlperf_log_summary.txt").read_text(encoding="utf-8", errors="replace")
    m = re.search(r"Result is\s*:\s*(\w+)", text)
    result = m.group(1) if m else "UNKNOWN"
    why = [f"{k.strip()}: {v.strip()}" for k, v in re.findall(r"^\s*([^\n:]*satisfied)\s*:\s*(\w+)", text, re.M)
           if v.strip().lower() != "yes"]
    rec = re.search(r"Recommendations:\s*\n((?:\s*\*.*\n?)+)", text)
    if rec:
        why += [line.strip(" *") for line in rec.group(1).splitlines() if line.strip(" *")]
    block = re.search(r"Early Stopping Result:\n(.*?)\n\s*\n", text, re.S)
    early = [" ".join(item.split()) for item in block.group(1).split("*") if item.strip()] if block else []
    if any(w.lower().startswith("early stopping satisfied") for w in why):
        why += early  # how many queries it would take
    detail: dict[str, Any] = {}
    detail_file = out / "mlperf_log_detail.txt"
    if detail_file.exists():
        for line in detail_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if ":::MLLOG" not in line:
                continue
            try:
                rec_ = json.loads(line.split(":::MLLOG", 1)[1])
            except ValueError:
                continue
            key = rec_.get("key", "")
            if key.startswith("result_") or key.startswith("early_stopping") or key == "effective_scenario":
                detail[key] = rec_.get("value")
    return {"result": result, "why": why, "early_stopping": early, "detail": detail, "summary": text}


def metric(scenario: str, detail: dict[str, Any]) -> dict[str, Any]:
    """The scenario's metric, named and in its unit, from LoadGen's detail log."""
    def ns_ms(key: str) -> float | None:
        v = detail.get(key)
        return round(float(v) / 1e6, 3) if isinstance(v, (int, float)) else None

    if scenario == "SingleStream":
        v = ns_ms("early_stopping_latency_ss") or ns_ms("result_90.00_percentile_latency_ns")
        return {"name": "90th percentile latency (early stopping estimate)", "value": v, "unit": "ms"}
    if scenario == "MultiStream":
        v = ns_ms("early_stopping_latency_ms") or ns_ms("result_99.00_percentile_per_query_latency_ns")
        return {"name": "99th percentile latency per query (8 samples, early stopping estimate)", "value": v,
                "unit": "ms"}
    if scenario == "Server":
        v = detail.get("result_completed_samples_per_sec") or detail.get("result_scheduled_samples_per_sec")
        return {"name": "completed queries per second at the latency bound", "value": _round(v), "unit": "QPS",
                "p99_ms": ns_ms("result_99.00_percentile_latency_ns")}
    v = detail.get("result_samples_per_second")
    return {"name": "samples per second", "value": _round(v), "unit": "samples/s"}


def _round(v: Any) -> float | None:
    return round(float(v), 3) if isinstance(v, (int, float)) else None


MAX_QUERIES = 20000


def queries_needed(res: dict[str, Any]) -> int | None:
    """When a run's only fault is that early stopping could not judge it yet,
    the query count LoadGen says would let it (capped); else None."""
    unmet = [w for w in res["why"] if w.endswith(": NO")]
    if res["errors"] or unmet != ["Early stopping satisfied: NO"]:
        return None
    text = " ".join(res["early_stopping"])
    done = re.search(r"Processed (\d+) queries", text)
    more = re.search(r"at least (\d+) more queries", text)
    total = re.search(r"Need to process at least (\d+) queries", text)
    if more and done:
        return min(MAX_QUERIES, int(done.group(1)) + int(more.group(1)))
    if total:
        return min(MAX_QUERIES, int(total.group(1)))
    return None


def hop_table(timings: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    names: list[str] = []
    for t in timings:
        names += [n for n in t if n not in names]
    out = {}
    for n in names:
        vals = sorted(t[n] for t in timings if n in t)
        out[n] = {"count": len(vals), "p50": _pct(vals, 50), "p90": _pct(vals, 90), "p99": _pct(vals, 99)}
    return out


def _pct(vals: list[float], p: float) -> float:
    k = min(len(vals) - 1, max(0, math.ceil(p / 100 * len(vals)) - 1))
    return round(vals[k], 3)
