"""From records to results: the JSON document of a run (built in named steps:
which records count, the counts and the cause of failures, latency and
jitter, the hop tree, the series) and each request's record.

Text output is in `summary`, comparisons in `compare`, the HTML in
`htmlreport`."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from yarl import URL

from . import hops as hoplib
from . import series, stats
from .runner import Record, Run, RunConfig

FORMAT = "loadtest-result/1"
TAIL_SHARE = 0.01  # the slowest 1% of requests: what the p99 is made of
MIDDLE = (0.45, 0.55)  # the requests around the median


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


# -- failures ----------------------------------------------------------------------

# A problem's machine `code` names the option to fix more exactly than its status.
CODE_HINTS = {
    "unknown_pool": "check --pool (sent as X-Pool)",
    "unauthorized": "check --api-key",
    "forbidden": "this key may not do that",
    "rate_limited": "rate limited: lower --rate, or use a key with a higher limit",
    "no_worker": "no healthy worker in the pool: is an agent connected for --pool?",
    "worker_unavailable": "no healthy worker in the pool: is an agent connected for --pool?",
    "draining": "the edge is shutting down",
}
STATUS_HINTS = {401: "check --api-key", 403: "this key may not do that", 404: "check the --url path",
                429: "rate limited: lower --rate, or use a key with a higher limit",
                502: "the edge could not get an answer from a worker",
                503: "no worker available, or the server is not ready", 504: "the worker did not answer in time"}


def _failure_text(kind: str, detail: str, code: str | None, cfg: RunConfig) -> str:
    """The cause of one kind of failure, with the fix."""
    if kind == "connect":
        return f"cannot connect to {cfg.url}: {detail}"
    if kind == "tls":
        return (f"TLS failure talking to {cfg.url}: {detail} (give the server's CA with --ca FILE, "
                "or --insecure to skip verification)")
    if kind == "timeout":
        return f"no complete answer within --timeout {cfg.timeout:g} s"
    if kind == "bad answer":
        return f"{detail} (is --url the inference server's POST /photo?)"
    if kind.startswith("HTTP "):
        status = int(kind[5:])
        hint = CODE_HINTS.get(code or "") or STATUS_HINTS.get(status) or ("server error" if status >= 500 else "")
        text = f"{status} {detail}" if detail else str(status)
        return f"{text}, {hint}" if hint else text
    return f"{kind}: {detail}" if kind != "disconnected" else detail


def cause(errors: Counter[str], run: Run, total: int) -> str | None:
    """One line naming the main failure first, with a hint at the fix:
    "13 of 13 failed: 401 Unauthorized: ..., check --api-key"."""
    if not errors:
        return None
    kind, _ = errors.most_common(1)[0]
    failed = sum(errors.values())
    line = (f"{failed} of {total} failed: "
            + _failure_text(kind, run.details.get(kind, ""), getattr(run, "codes", {}).get(kind), run.cfg))
    others = [f"{k} x{c}" for k, c in errors.most_common()[1:4]]
    if others:
        line += " (also " + ", ".join(others) + ")"
    return line


def _counted(run: Run) -> tuple[list[Record], str | None]:
    """The records the result counts, in intended order: the measured ones, or,
    when the run stopped before measuring anything (every warm-up request
    failed), the warm-up ones, so a failed run never reports 0 errors."""
    measured = [r for r in run.records if not r.warmup]
    note = None
    if not measured and run.records:
        measured = list(run.records)
        note = "the run stopped in its warm-up: these counts include the warm-up requests"
    measured.sort(key=lambda r: (r.intended, r.seq))
    return measured, note


def _counts(run: Run, measured: Sequence[Record], note: str | None) -> dict[str, Any]:
    ok = sum(1 for r in measured if r.ok)
    errors = Counter(r.error or "?" for r in measured if not r.ok)
    warm_errors = sum(1 for r in run.records if r.warmup and not r.ok)
    return {
        "requests": len(measured),
        "ok": ok,
        "errors": len(measured) - ok,
        "error_rate": round((len(measured) - ok) / len(measured), 6) if measured else None,
        "error_kinds": dict(errors.most_common()),
        "error_details": {k: run.details.get(k, "") for k in errors},
        "error_codes": {k: c for k, c in getattr(run, "codes", {}).items() if k in errors},
        "cause": cause(errors, run, len(measured)),
        "counts_note": note,
        "warmup_errors": warm_errors,
        "aborted": run.aborted,
        "cancelled_in_flight": run.cancelled_in_flight,
        "warmup_requests": len(run.records) - len(measured),
        "status_counts": dict(sorted(Counter(str(r.status) for r in measured if r.status).items())),
    }


# -- timing ------------------------------------------------------------------------


def _span(measured: Sequence[Record]) -> tuple[float, float, float]:
    if not measured:
        return 0.0, 0.0, 0.0
    first = min(r.intended for r in measured)
    last = max(r.done for r in measured)
    return first, last, max(last - first, 1e-9)


def _rates(cfg: RunConfig, measured: Sequence[Record], ok: int, span: float) -> dict[str, Any]:
    sends = sorted(r.sent for r in measured)
    send_rate = (len(sends) - 1) / (sends[-1] - sends[0]) if len(sends) > 1 and sends[-1] > sends[0] else None
    return {
        "duration_s": round(span, 4),
        "throughput_rps": round(ok / span, 3) if measured else 0.0,
        "offered_rps": cfg.rate if cfg.mode == "open" else None,
        "send_rate_rps": round(send_rate, 3) if send_rate else None,
    }


def _latency(cfg: RunConfig, measured: Sequence[Record], ok: Sequence[Record]) -> dict[str, Any]:
    latency = [r.latency_ms for r in ok]
    lags = [r.lag_ms for r in measured]
    late = sum(1 for x in lags if x > cfg.late_ms)
    return {
        "latency_from": "intended send time" if cfg.mode == "open" else "send time (closed loop)",
        "latency_ms": stats.summary(latency),
        "service_time_ms": stats.summary([r.service_ms for r in ok]),
        "jitter_ms": stats.jitter_summary(latency),
        "late_sends": {
            "count": late,
            "fraction": round(late / len(measured), 6) if measured else None,
            "threshold_ms": cfg.late_ms,
            "lag_ms": stats.summary(lags),
        } if cfg.mode == "open" else None,
        "distribution": series.distribution(latency, stats.pdv(latency)),
    }


# -- hops --------------------------------------------------------------------------


def _hops(run: Run, ok: Sequence[Record]) -> dict[str, Any]:
    """Per-hop summaries (the heartbeat RTT apart: it is not part of any
    request), the mean breakdown, the hop tree and the heartbeat reading."""
    per_hop: dict[str, list[float]] = defaultdict(list)
    seg_sum: dict[str, float] = defaultdict(float)
    for r in ok:
        h = record_hops(r)
        for k, v in h.items():
            per_hop[k].append(v)
        for k, v in hoplib.segments(r.latency_ms, h).items():
            seg_sum[k] += v
    heartbeat = per_hop.pop("tunnel_rtt", [])
    return {
        "hops_ms": {k: stats.summary(per_hop[k]) for k in sorted(per_hop, key=hoplib.order_key)},
        "breakdown_ms": [[k, _ms(seg_sum[k] / len(ok))] for k in hoplib.SEGMENTS if k in seg_sum] if ok else [],
        "hop_tree": hop_tree(ok, hoplib.is_loopback(URL(run.cfg.url).host)),
        "heartbeat_rtt_ms": _ms(sorted(heartbeat)[len(heartbeat) // 2]) if heartbeat else None,
        "tunnel_rtt_ms": run.tunnel_rtt_ms,
    }


def hop_tree(ok: Sequence[Record], loopback: bool) -> dict[str, Any] | None:
    """The hops as a tree with p50 and p99 per node and the tail excess: the
    mean over the slowest 1% minus the mean over the middle 10%, so the
    leaves' excesses add up to the latency's and the largest one is where the
    p99 comes from."""
    if not ok:
        return None
    by_latency = sorted(ok, key=lambda r: r.latency_ms)
    values = [hoplib.node_values(r.latency_ms, record_hops(r)) for r in by_latency]
    n = len(values)
    tail = values[min(n - 1, math.floor(n * (1 - TAIL_SHARE))):]
    middle = values[math.floor(n * MIDDLE[0]):max(math.floor(n * MIDDLE[0]) + 1, math.ceil(n * MIDDLE[1]))]

    def mean(rows: Sequence[dict[str, float]], k: str) -> float:
        return math.fsum(r.get(k, 0.0) for r in rows) / len(rows)

    present = {k for v in values for k in v}
    depth = hoplib.depths(present)
    names = hoplib.labels(loopback)
    nodes: list[dict[str, Any]] = []
    for k in hoplib.TREE_ORDER:
        if k not in present:
            continue
        s = stats.summary([v[k] for v in values if k in v])
        nodes.append({"key": k, "label": names.get(k, k), "depth": depth[k], "p50": s["p50"], "p99": s["p99"],
                      "count": s["count"], "tail_excess_ms": _ms(mean(tail, k) - mean(middle, k))})
    leaves = [nd for nd in nodes if not any(hoplib.PARENT.get(o["key"]) == nd["key"] for o in nodes)
              and nd["key"] != "latency"]
    total = next(nd["tail_excess_ms"] for nd in nodes if nd["key"] == "latency")
    top = max(leaves, key=lambda nd: nd["tail_excess_ms"], default=None)
    tail_from = None
    if top is not None and total > 0 and n >= 20:
        share = top["tail_excess_ms"] / total
        tail_from = {"key": top["key"], "label": top["label"], "excess_ms": top["tail_excess_ms"],
                     "share": round(share, 4),
                     "text": f"the slowest 1% took {total:.2f} ms longer than the median requests; "
                             f"{top['tail_excess_ms']:.2f} ms ({share:.0%}) of it in {top['label']}"}
    return {"nodes": nodes, "tail_from": tail_from, "tail_requests": len(tail), "loopback": loopback}


# -- the document ------------------------------------------------------------------


def analyse(run: Run) -> dict[str, Any]:
    """The result document of one run (the fields of DESIGN.md and more)."""
    cfg = run.cfg
    measured, note = _counted(run)
    ok = [r for r in measured if r.ok]
    first, last, span = _span(measured)
    result: dict[str, Any] = {
        "format": FORMAT,
        "command": cfg.command,
        "label": cfg.label,
        "url": cfg.url,
        "started_at": datetime.fromtimestamp(run.wall_start, UTC).isoformat(timespec="seconds") if run.wall_start
        else None,
        "config": cfg.public(),
        "machine": None,
        **_counts(run, measured, note),
        **_rates(cfg, measured, len(ok), span),
        **_latency(cfg, measured, ok),
        **_hops(run, ok),
        "stability": series.stability(measured, first, last, cfg.windows),
        "timeline": series.timeline(measured, first, last),
    }
    if cfg.command == "classify":
        result["labels"] = dict(Counter(r.label for r in ok if r.label is not None).most_common())
    return result


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


