"""The self-contained HTML report: summary, per-hop tables and inline SVG
plots (latency over time, histogram, percentile CDF, jitter, throughput,
hop breakdown, and the latency-vs-throughput curve of a sweep)."""

from __future__ import annotations

import json
from html import escape
from typing import Any

from . import stats
from .runner import Run
from .svg import PALETTE, Chart, stacked_bar

MAX_POINTS = 6000

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
.sub{color:#666} .cards{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;min-width:9em}
.card b{display:block;font-size:1.25em} .card span{color:#666;font-size:.85em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right} th{background:#f6f6f6}
td:first-child,th:first-child{text-align:left} .cause{background:#fdecea;border:1px solid #f5c2c0;padding:.6em;
border-radius:6px} .ok{color:#1a7f37} .bad{color:#c62828} svg.plot{display:block;margin:1em 0;max-width:100%;
height:auto} details pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}
"""


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return escape(str(v))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_f(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _stats_rows(named: list[tuple[str, dict[str, Any] | None]]) -> list[list[Any]]:
    return [[name, *(s.get(k) for k in stats.FIELDS), s.get("count")] for name, s in named if s]


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{value}</b><span>{escape(label)}</span></div>'


def _latency_over_time(res: dict[str, Any], run: Run | None) -> str:
    tl = res.get("timeline") or []
    series: dict[str, list[tuple[float, float]]] = {"p50": [], "p99": [], "max": []}
    for row in tl:
        for k in series:
            if k in row:
                series[k].append((row["t"] + 0.5, row[k]))
    pts: list[tuple[float, float]] = []
    if run is not None:
        measured = sorted((r for r in run.records if r.ok and not r.warmup), key=lambda r: r.intended)
        if measured:
            t0 = min(r.intended for r in run.records if not r.warmup)
            step = max(1, len(measured) // MAX_POINTS)
            chosen = measured[::step]
            if step > 1:  # keep the tail visible when thinning
                cut = sorted(r.latency_ms for r in measured)[int(len(measured) * 0.99)]
                chosen += [r for r in measured if r.latency_ms >= cut]
            pts = [(r.intended - t0, r.latency_ms) for r in chosen]
    elif res.get("records"):
        recs = [r for r in res["records"] if r.get("ok") and not r.get("warmup")]
        if recs:
            t0 = min(r["intended_s"] for r in res["records"] if not r.get("warmup"))
            step = max(1, len(recs) // MAX_POINTS)
            pts = [(r["intended_s"] - t0, r["latency_ms"]) for r in recs[::step]]
    xs = [x for x, _ in pts] + [x for s in series.values() for x, _ in s]
    ys = [y for _, y in pts] + [y for s in series.values() for _, y in s]
    if not xs:
        return ""
    c = Chart("plot-latency-time", "Latency over time (by intended send time)", "seconds since the first "
              "measured send", "latency ms", xs, ys)
    c.points(pts, "each request", "#9ab")
    c.line(series["p50"], "p50 per second", PALETTE[0])
    c.line(series["p99"], "p99 per second", PALETTE[1])
    c.line(series["max"], "max per second", PALETTE[3], width=1.0)
    return c.render()


def _histogram(res: dict[str, Any]) -> str:
    h = (res.get("distribution") or {}).get("histogram")
    if not h:
        return ""
    edges = [h["start_ms"] + i * h["width_ms"] for i in range(len(h["counts"]) + 1)]
    c = Chart("plot-histogram", "Latency histogram (up to the p99.9"
              + (f"; {h['beyond']} beyond)" if h.get("beyond") else ")"), "latency ms", "requests", edges, h["counts"])
    c.bars(edges, h["counts"], "requests", PALETTE[0])
    return c.render()


def _cdf(res: dict[str, Any]) -> str:
    d = res.get("distribution") or {}
    lat = [(p, v) for p, v in d.get("latency_cdf", []) if p < 100]
    if not lat:
        return ""
    c = Chart("plot-cdf", "Latency by percentile (CDF, tail spread out)", "percentile", "latency ms",
              [p for p, _ in lat], [v for _, v in lat], percentile_x=True)
    c.line(lat, "latency", PALETTE[0], dots=True)
    return c.render()


def _jitter(res: dict[str, Any]) -> str:
    d = res.get("distribution") or {}
    pdv = [(p, v) for p, v in d.get("pdv_cdf", []) if p < 100]
    out = ""
    if pdv:
        c = Chart("plot-jitter-pdv", "Jitter: PDV (latency minus the minimum) by percentile", "percentile",
                  "PDV ms", [p for p, _ in pdv], [v for _, v in pdv], percentile_x=True)
        c.line(pdv, "PDV", PALETTE[4], dots=True)
        out += c.render()
    ipdv = [(row["t"] + 0.5, row["ipdv_mean"]) for row in res.get("timeline") or [] if "ipdv_mean" in row]
    if ipdv:
        c = Chart("plot-jitter-ipdv", "Jitter: mean IPDV |L(i) - L(i-1)| per second", "seconds", "IPDV ms",
                  [x for x, _ in ipdv], [y for _, y in ipdv])
        c.line(ipdv, "mean IPDV", PALETTE[5])
        out += c.render()
    return out


def _throughput(res: dict[str, Any]) -> str:
    tl = res.get("timeline") or []
    if not tl:
        return ""
    ok = [(r["t"] + 0.5, r["ok"]) for r in tl]
    errors = [(r["t"] + 0.5, r["errors"]) for r in tl]
    sent = [(r["t"] + 0.5, r["sent"]) for r in tl]
    c = Chart("plot-throughput", "Throughput per second", "seconds", "requests / s", [x for x, _ in ok],
              [y for _, y in ok + errors + sent])
    c.line(sent, "sent", PALETTE[7], width=1.0)
    c.line(ok, "ok (goodput)", PALETTE[2])
    c.line(errors, "errors", PALETTE[1])
    return c.render()


def _breakdown(res: dict[str, Any]) -> str:
    segs = [(k, v) for k, v in res.get("breakdown_ms") or []]
    if not segs:
        return ""
    return stacked_bar("plot-hops", "Where the time goes: mean per request, by hop (ms)", segs)


def _sweep(res: dict[str, Any]) -> str:
    sw = res.get("sweep")
    if not sw or not sw.get("points"):
        return ""
    pts = sw["points"]
    p50 = [(p["throughput_rps"], p["latency_ms"]["p50"]) for p in pts if p["latency_ms"]["p50"] is not None]
    p99 = [(p["throughput_rps"], p["latency_ms"]["p99"]) for p in pts if p["latency_ms"]["p99"] is not None]
    c = Chart("plot-sweep", "Latency vs throughput (one point per offered rate)", "achieved throughput req/s",
              "latency ms", [x for x, _ in p50 + p99], [y for _, y in p50 + p99])
    c.line(p50, "p50", PALETTE[0], dots=True)
    c.line(p99, "p99", PALETTE[1], dots=True)
    knee = sw["knee"].get("knee_rps")
    for p in pts:
        if p["latency_ms"]["p99"] is not None:
            mark = " (knee)" if p["offered_rps"] == knee else ""
            c.label(p["throughput_rps"], p["latency_ms"]["p99"], f"{p['offered_rps']:g}/s{mark}")
    rows = [[p["offered_rps"], p["throughput_rps"], p["errors"], p["latency_ms"]["p50"], p["latency_ms"]["p99"],
             p["latency_ms"]["p999"], (p.get("late_sends") or {}).get("count"),
             {True: "yes", False: "no", None: "-"}[p.get("stable")]] for p in pts]
    table = _table(["offered req/s", "throughput", "errors", "p50 ms", "p99 ms", "p99.9 ms", "late sends",
                    "stable"], rows)
    return (f"<h2>Sweep</h2>{c.render()}{table}<p>Knee: <b>{_f(knee, 1)} req/s</b> &mdash; "
            f"{escape(sw['knee']['reason'])}</p>")


def render(res: dict[str, Any], run: Run | None) -> str:
    cfg = res.get("config") or {}
    if cfg.get("mode") == "open":
        load = f"open loop, {cfg.get('arrivals')} arrivals at {cfg.get('rate'):g} req/s"
    else:
        load = f"closed loop, concurrency {cfg.get('concurrency')}"
    title = f"loadtest {res.get('command')} {res.get('url')}"
    lat, jit = res.get("latency_ms") or {}, res.get("jitter_ms") or {}
    st = res.get("stability") or {}
    stable = {True: '<span class="ok">stable</span>', False: '<span class="bad">not stable</span>',
              None: "not judged"}[st.get("stable")]
    cards = [
        _card(f"{res.get('ok')} / {res.get('requests')}", "ok / measured requests"),
        _card(_f(res.get("throughput_rps"), 1), "throughput req/s (goodput)"),
        _card(_f(lat.get("p50")), "latency p50 ms"),
        _card(_f(lat.get("p99")), "latency p99 ms"),
        _card(_f(lat.get("p999")), "latency p99.9 ms"),
        _card(_f(jit.get("spread_p99_p50")), "jitter p99-p50 ms"),
        _card(_f(res.get("errors")), "errors"),
    ]
    if res.get("late_sends"):
        cards.append(_card(_f(res["late_sends"]["count"]), f"late sends (> {res['late_sends']['threshold_ms']:g} ms)"))
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{escape(title)}</h1><p class=sub>{escape(load)}; started {escape(str(res.get('started_at')))}; "
             f"{_f(res.get('duration_s'))} s measured, warm-up of {_f(cfg.get('warmup'))} s excluded"
             f"{'; label ' + escape(str(res['label'])) if res.get('label') else ''}</p>",
             '<div class="cards">' + "".join(cards) + "</div>"]
    if res.get("cause"):
        parts.append(f'<p class="cause">{escape(res["cause"])}</p>')
    if res.get("aborted"):
        parts.append(f'<p class="cause">{escape(res["aborted"])}</p>')
    parts.append(f"<p>Stability: {stable} &mdash; {escape(str(st.get('reason')))} ({escape(st.get('criterion', ''))})"
                 "</p>")

    parts.append(_sweep(res))
    parts.append("<h2>Latency</h2><p>Measured from the " + escape(res.get("latency_from", "")) +
                 "; failed requests are excluded and counted apart.</p>")
    parts.append(_table(["", *stats.FIELDS, "n"], _stats_rows([
        ("latency", lat), ("service time (from actual send)", res.get("service_time_ms")),
        ("jitter: PDV", jit), ("jitter: IPDV", jit.get("ipdv"))])))
    parts.append(f"<p>Jitter headline: p99&minus;p50 spread {_f(jit.get('spread_p99_p50'))} ms; mean IPDV "
                 f"{_f(jit.get('ipdv_mean'))} ms; RFC 3550 J {_f(jit.get('rfc3550'))} ms.</p>")
    parts.append(_latency_over_time(res, run))
    parts.append(_histogram(res))
    parts.append(_cdf(res))
    parts.append("<h2>Jitter</h2>" + _jitter(res))
    parts.append("<h2>Throughput</h2>" + _throughput(res))

    parts.append("<h2>Hop by hop</h2>")
    parts.append(_breakdown(res))
    hops = res.get("hops_ms") or {}
    if hops:
        parts.append(_table(["hop (ms)", *stats.FIELDS, "n"], _stats_rows(list(hops.items()))))
    if res.get("tunnel_rtt_ms"):
        parts.append("<p>Tunnel RTT from the edge's heartbeats: " + ", ".join(
            f"{escape(k)} {v:.2f} ms" for k, v in res["tunnel_rtt_ms"].items()) + "</p>")

    parts.append("<h2>Answers</h2>")
    parts.append(_table(["status", "count"], [[k, v] for k, v in (res.get("status_counts") or {}).items()]))
    if res.get("error_kinds"):
        details = res.get("error_details") or {}
        parts.append(_table(["error", "count", "detail"], [[k, v, details.get(k, "")]
                                                          for k, v in res["error_kinds"].items()]))
    if res.get("labels"):
        parts.append(_table(["label", "count"], [[k, v] for k, v in res["labels"].items()]))
    if res.get("late_sends"):
        ls = res["late_sends"]
        parts.append(f"<p>Send lag (actual minus intended send time): p50 {_f(ls['lag_ms']['p50'], 3)} ms, "
                     f"p99 {_f(ls['lag_ms']['p99'], 3)} ms, max {_f(ls['lag_ms']['max'], 3)} ms; "
                     f"{ls['count']} sends later than {ls['threshold_ms']:g} ms.</p>")
    if st.get("per_window"):
        parts.append(_table(["window from s", "throughput req/s", "mean latency ms"],
                            [[w["start_s"], w["throughput_rps"], w["latency_mean_ms"]] for w in st["per_window"]]))

    parts.append("<h2>Configuration and machine</h2>")
    parts.append("<details open><summary>config</summary><pre>" + escape(json.dumps(cfg, indent=1)) + "</pre></details>")
    parts.append("<details><summary>machine</summary><pre>" + escape(json.dumps(res.get("machine"), indent=1))
                 + "</pre></details>")
    parts.append("</body></html>\n")
    return "".join(p for p in parts if p)
