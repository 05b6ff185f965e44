"""Pass/fail thresholds for CI: `--slo p99<100ms` (repeatable). A threshold
names a latency percentile (p50, p90, p99, p999, max) in ms or s, or the
error rate (`error_rate<1%` or `<0.01`); the run fails (exit status 4) when
any is violated, and the reports draw and list them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LATENCY = ("p50", "p90", "p99", "p999", "max")
METRICS = (*LATENCY, "error_rate")
EXIT_VIOLATED = 4
_SPEC = re.compile(r"^\s*(?P<metric>[a-z0-9_.]+)\s*(?P<op><=|<)\s*(?P<value>[0-9]*\.?[0-9]+)\s*(?P<unit>ms|s|%)?\s*$")


@dataclass(frozen=True)
class Slo:
    metric: str  # one of METRICS
    limit: float  # ms for latency, a fraction for error_rate
    inclusive: bool
    text: str

    def holds(self, value: float) -> bool:
        return value <= self.limit if self.inclusive else value < self.limit


def parse(text: str) -> Slo:
    """`p99<100ms`, `p999<=0.5s`, `error_rate<1%`; ValueError with the reason."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"expected METRIC<VALUE such as p99<100ms or error_rate<1%, got {text!r}")
    metric = m["metric"].replace("p99.9", "p999")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {m['metric']!r} in {text!r}: one of {', '.join(METRICS)}")
    value, unit = float(m["value"]), m["unit"]
    if metric == "error_rate":
        if unit in ("ms", "s"):
            raise ValueError(f"{text!r}: the error rate is a fraction (0.01) or a percentage (1%)")
        limit = value / 100 if unit == "%" else value
    else:
        if unit == "%":
            raise ValueError(f"{text!r}: a latency takes ms or s")
        limit = value * 1000 if unit == "s" else value
    return Slo(metric, limit, m["op"] == "<=", text.strip())


def value_of(slo: Slo, res: dict[str, Any]) -> float | None:
    if slo.metric == "error_rate":
        rate = res.get("error_rate")
        return float(rate) if rate is not None else None
    v = (res.get("latency_ms") or {}).get(slo.metric)
    return float(v) if v is not None else None


def check(slos: list[Slo], res: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per threshold; a latency with no successful request to
    measure it fails (a run that answered nothing meets no latency target)."""
    out = []
    for s in slos:
        v = value_of(s, res)
        out.append({"slo": s.text, "metric": s.metric, "limit": s.limit, "value": v,
                    "ok": v is not None and s.holds(v)})
    return out


def failed(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [v for v in verdicts if not v["ok"]]


def describe(v: dict[str, Any]) -> str:
    unit = "" if v["metric"] == "error_rate" else " ms"
    value = "none measured" if v["value"] is None else f"{v['value']:g}{unit}"
    return f"SLO {v['slo']}: {'ok' if v['ok'] else 'VIOLATED'} ({v['metric']} {value})"
