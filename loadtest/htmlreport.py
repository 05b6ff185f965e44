"""The self-contained HTML report: failures first, the summary cards, the
stability verdict with its rule as a footnote, SLO verdicts, per-hop tree and
inline SVG plots (latency over time, histogram, percentile CDF, jitter,
throughput, hop breakdown, and the latency-vs-throughput curve of a sweep),
and a glossary of the derived names. A chart without enough data to mean
anything says so instead of drawing empty axes."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from . import hops as hoplib
from . import stats
from .runner import Run
from .series import MIN_BIN_COVER
from .summary import heartbeat_text, load_text, verdict
from .svg import PALETTE, Chart, spans_decades, stacked_bar

MAX_POINTS = 6000
MIN_SECONDS = 3  # per-second charts need this many (mostly) covered seconds
MIN_SAMPLES = 10  # distributions need this many successful requests
DOCS = Path(__file__).resolve().parent.parent / "docs" / "loadtesting.md"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
.sub{color:#666} .cards{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;min-width:9em}
.card b{display:block;font-size:1.25em} .card span{color:#666;font-size:.85em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right} th{background:#f6f6f6}
td:first-child,th:first-child{text-align:left} .cause{background:#fdecea;border:1px solid #f5c2c0;padding:.6em;
border-radius:6px;font-weight:bold} .ok{color:#1a7f37} .bad{color:#c62828} svg.plot{display:block;margin:1em 0;
max-width:100%;height:auto} details pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}
.nodata{border:1px dashed #bbb;border-radius:6px;padding:1em;margin:1em 0;color:#555;background:#fafafa}
.nodata b{display:block;color:#333} .foot{color:#666;font-size:.9em} td.tree{white-space:pre}
.card span.ok{color:#1a7f37} .card span.bad{color:#c62828} tr.top td{background:#fff4e5} dl.gloss dt{font-weight:bold;font-family:monospace} dl.gloss dd{margin:0 0 .4em 1.5em}
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


def too_little(title: str, why: str) -> str:
    """In place of a chart that would be empty or misleading: what it would
    show and why it does not."""
    return f'<div class="nodata"><b>{escape(title)}</b>too little data: {escape(why)}</div>'


def page(title: str, css: str, parts: list[str]) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<style>{css}</style></head><body>" + "".join(p for p in parts if p) + "</body></html>\n")


def _samples(res: dict[str, Any]) -> int:
    """How many latencies the distributions are made of (requests or frames)."""
    return int((res.get("latency_ms") or {}).get("count") or 0)


def _full_seconds(res: dict[str, Any]) -> int:
    return sum(1 for r in res.get("timeline") or [] if r.get("cover_s", 1.0) >= MIN_BIN_COVER)


def _short_run(res: dict[str, Any]) -> str:
    return (f"the run measured {res.get('duration_s') or 0:.2f} s; per-second figures need at least {MIN_SECONDS} s "
            "(run with --duration 10 or more)")


def _slo_lines(c: Chart, res: dict[str, Any]) -> None:
    for v in res.get("slo") or []:
        if v["metric"] != "error_rate":
            c.hline(v["limit"], f"SLO {v['slo']}", "#b00020" if not v["ok"] else "#1a7f37")


def _latency_over_time(res: dict[str, Any], run: Run | None) -> str:
    title = "Latency over time (by intended send time)"
    tl = res.get("timeline") or []
    enough = _full_seconds(res) >= MIN_SECONDS
    series: dict[str, list[tuple[float, float]]] = {"p50": [], "p99": [], "max": []}
    for row in tl if enough else []:
        for k in series:
            if k in row:
                series[k].append((row["t"] + 0.5, row[k]))
    pts = _scatter(res, run)
    xs = [x for x, _ in pts] + [x for s in series.values() for x, _ in s]
    ys = [y for _, y in pts] + [y for s in series.values() for _, y in s]
    if not xs:
        return too_little(title, _short_run(res) if res.get("ok") else "no request succeeded")
    ys += [v["limit"] for v in res.get("slo") or [] if v["metric"] != "error_rate"]
    c = Chart("plot-latency-time", title, "seconds since the first measured send", "latency ms", xs, ys)
    # Drawn back to front: the dots, then max (thin, grey), p50, and p99 on top.
    c.points(pts, "each request", "#7a95b0")
    # With under 100 requests in a second its p99 is its max: one line, named so.
    same = series["p99"] == series["max"]
    if not same:
        c.line(series["max"], "max per second", "#9e9e9e", width=1.0)
    c.line(series["p50"], "p50 per second", PALETTE[0], width=2.0)
    c.line(series["p99"], "p99 (= max) per second" if same else "p99 per second", PALETTE[1], width=2.4)
    _slo_lines(c, res)
    note = "" if enough else f'<p class="foot">No per-second lines: {escape(_short_run(res))}.</p>'
    return c.render() + note


def _scatter(res: dict[str, Any], run: Run | None) -> list[tuple[float, float]]:
    """(seconds since the first measured send, latency) of successful
    requests, thinned to MAX_POINTS (keeping the slowest 1%)."""
    if run is not None:
        measured = sorted((r for r in run.records if r.ok and not r.warmup), key=lambda r: r.intended)
        if not measured:
            return []
        t0 = min(r.intended for r in run.records if not r.warmup)
        step = max(1, len(measured) // MAX_POINTS)
        chosen = measured[::step]
        if step > 1:  # keep the tail visible when thinning
            cut = sorted(r.latency_ms for r in measured)[int(len(measured) * 0.99)]
            chosen += [r for r in measured if r.latency_ms >= cut]
        return [(r.intended - t0, r.latency_ms) for r in chosen]
    recs = [r for r in res.get("records") or [] if r.get("ok") and not r.get("warmup")]
    if not recs:
        return []
    t0 = min(r["intended_s"] for r in res["records"] if not r.get("warmup"))
    step = max(1, len(recs) // MAX_POINTS)
    return [(r["intended_s"] - t0, r["latency_ms"]) for r in recs[::step]]


def _histogram(res: dict[str, Any]) -> str:
    title = "Latency histogram (up to the p99.9)"
    h = (res.get("distribution") or {}).get("histogram")
    if not h or _samples(res) < MIN_SAMPLES:
        return too_little(title, f"{_samples(res)} answers; a histogram needs {MIN_SAMPLES}")
    edges = [h["start_ms"] + i * h["width_ms"] for i in range(len(h["counts"]) + 1)]
    c = Chart("plot-histogram", title[:-1] + (f"; {h['beyond']} beyond)" if h.get("beyond") else ")"),
              "latency ms", "requests", edges, h["counts"])
    c.bars(edges, h["counts"], "requests", PALETTE[0])
    return c.render()


def _cdf(res: dict[str, Any]) -> str:
    title = "Latency by percentile (CDF, tail spread out)"
    d = res.get("distribution") or {}
    lat = [(p, v) for p, v in d.get("latency_cdf", []) if p < 100]
    if not lat or _samples(res) < MIN_SAMPLES:
        return too_little(title, f"{_samples(res)} answers; percentiles need {MIN_SAMPLES}")
    ys = [v for _, v in lat] + [v["limit"] for v in res.get("slo") or [] if v["metric"] != "error_rate"]
    c = Chart("plot-cdf", title, "percentile", "latency ms", [p for p, _ in lat], ys, percentile_x=True)
    c.line(lat, "latency", PALETTE[0], dots=True)
    _slo_lines(c, res)
    return c.render()


def _jitter(res: dict[str, Any]) -> str:
    d = res.get("distribution") or {}
    pdv = [(p, v) for p, v in d.get("pdv_cdf", []) if p < 100]
    title = "Jitter: PDV (latency minus the minimum) by percentile"
    if pdv and _samples(res) >= MIN_SAMPLES:
        c = Chart("plot-jitter-pdv", title, "percentile", "PDV ms", [p for p, _ in pdv], [v for _, v in pdv],
                  percentile_x=True)
        c.line(pdv, "PDV", PALETTE[4], dots=True)
        out = c.render()
    else:
        out = too_little(title, f"{_samples(res)} answers; percentiles need {MIN_SAMPLES}")
    title = "Jitter: mean IPDV |L(i) - L(i-1)| per second"
    ipdv = [(row["t"] + 0.5, row["ipdv_mean"]) for row in res.get("timeline") or [] if "ipdv_mean" in row]
    if len(ipdv) < MIN_SECONDS or _full_seconds(res) < MIN_SECONDS:
        return out + too_little(title, _short_run(res))
    c = Chart("plot-jitter-ipdv", title, "seconds", "IPDV ms", [x for x, _ in ipdv], [y for _, y in ipdv])
    c.line(ipdv, "mean IPDV", PALETTE[5])
    return out + c.render()


def _throughput(res: dict[str, Any]) -> str:
    title = "Throughput per second"
    rows = [r for r in res.get("timeline") or [] if "ok_rps" not in r or r["ok_rps"] is not None]
    if _full_seconds(res) < MIN_SECONDS:
        return too_little(title, _short_run(res))

    def rate(k: str) -> list[tuple[float, float]]:
        # Older results have counts only: every bin a whole second.
        return [(r["t"] + 0.5, r[f"{k}_rps"] if f"{k}_rps" in r else r[k]) for r in rows]

    ok, errors, sent = rate("ok"), rate("errors"), rate("sent")
    c = Chart("plot-throughput", title, "seconds", "requests / s", [x for x, _ in ok], [y for _, y in ok + errors + sent])
    c.line(sent, "sent", "#9e9e9e", width=1.2)
    c.line(ok, "ok (goodput)", PALETTE[2], width=2.0)
    c.line(errors, "errors", PALETTE[1], width=2.0)
    partial = any(r.get("cover_s", 1.0) < 1.0 for r in res.get("timeline") or [])
    foot = (f'<p class="foot">Rates over the part of each second the run covered; a second covered less than '
            f"{MIN_BIN_COVER:.0%} is left out, so a partial last second is not drawn as a drop.</p>")
    return c.render() + (foot if partial else "")


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
    title = "Latency vs throughput (one point per offered rate)"
    if len(p99) < 2:
        chart = too_little(title, f"{len(p99)} rate(s) with successful requests; a curve needs 2")
    else:
        ys = [y for _, y in p50 + p99]
        c = Chart("plot-sweep", title, "achieved throughput req/s", "latency ms", [x for x, _ in p50 + p99], ys,
                  log_y=spans_decades(ys))
        c.line(p50, "p50", PALETTE[0], dots=True)
        c.line(p99, "p99", PALETTE[1], dots=True)
        _slo_lines(c, res)
        knee = sw["knee"].get("knee_rps")
        for p in pts:
            if p["latency_ms"]["p99"] is not None:
                mark = " (knee)" if p["offered_rps"] == knee else ""
                c.label(p["throughput_rps"], p["latency_ms"]["p99"], f"{p['offered_rps']:g}/s{mark}")
        chart = c.render()
    rows = [[p["offered_rps"], p["throughput_rps"], p["errors"], p["latency_ms"]["p50"], p["latency_ms"]["p99"],
             p["latency_ms"]["p999"], (p.get("late_sends") or {}).get("count"),
             {True: "yes", False: "no", None: "-"}[p.get("stable")]] for p in pts]
    table = _table(["offered req/s", "throughput", "errors", "p50 ms", "p99 ms", "p99.9 ms", "late sends",
                    "stable"], rows)
    return (f"<h2>Sweep</h2>{chart}{table}<p>Knee: <b>{_f(sw['knee'].get('knee_rps'), 1)} req/s</b> &mdash; "
            f"{escape(sw['knee']['reason'])}</p>")


def hop_tree_table(res: dict[str, Any]) -> str:
    """The hop tree: p50 and p99 per hop and the tail excess, the hop the p99
    comes from highlighted."""
    tree = res.get("hop_tree")
    if not tree or len(tree.get("nodes", [])) < 2:
        return ""
    top = (tree.get("tail_from") or {}).get("key")
    rows = "".join(
        f'<tr{" class=top" if nd["key"] == top else ""}><td class="tree">{"&nbsp;&nbsp;&nbsp;" * nd["depth"]}'
        f'{"&#x2514; " if nd["depth"] else ""}{escape(nd["label"])}'
        f'{"" if nd["key"] == nd["label"] else " <code>" + escape(nd["key"]) + "</code>"}</td><td>{_f(nd["p50"])}</td>'
        f'<td>{_f(nd["p99"])}</td><td>{_f(nd["tail_excess_ms"])}</td></tr>' for nd in tree["nodes"])
    return ("<table><tr><th>hop</th><th>p50 ms</th><th>p99 ms</th><th>tail excess ms</th></tr>"
            f"{rows}</table>")


def _hops_section(res: dict[str, Any]) -> str:
    tree = res.get("hop_tree") or {}
    parts = ["<h2>Hop by hop</h2>", hop_tree_table(res)]
    if tree.get("tail_from"):
        parts.append(f"<p><b>Where the p99 comes from:</b> {escape(tree['tail_from']['text'])}.</p>")
    hb = heartbeat_text(res)
    if hb:
        parts.append(f"<p>{escape(hb)}.</p>")
    parts.append(_breakdown(res))
    hops = res.get("hops_ms") or {}
    if hops:
        parts.append("<details><summary>every hop and client phase</summary>"
                     + _table(["hop (ms)", *stats.FIELDS, "n"], _stats_rows(list(hops.items()))) + "</details>")
    return "".join(parts)


def _glossary() -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in hoplib.GLOSSARY.items())
    link = (f'<a href="{DOCS.as_uri()}#hop-by-hop">docs/loadtesting.md</a>' if DOCS.is_file()
            else "docs/loadtesting.md")
    return f'<h2 id="glossary">Glossary</h2><dl class="gloss">{items}</dl><p>Every statistic and hop: {link}.</p>'


def _header(res: dict[str, Any], title: str) -> str:
    cfg = res.get("config") or {}
    label = "; label " + escape(str(res["label"])) if res.get("label") else ""
    return (f"<h1>{escape(title)}</h1><p class=sub>{escape(load_text(cfg))}; started "
            f"{escape(str(res.get('started_at')))}; {_f(res.get('duration_s'))} s measured, warm-up of "
            f"{_f(cfg.get('warmup'))} s excluded{label}</p>")


def _failures(res: dict[str, Any]) -> str:
    """Failures first: the count and the cause before any figure."""
    out = [f'<p class="cause">{escape(res[k])}</p>' for k in ("cause", "aborted", "counts_note") if res.get(k)]
    return "".join(out)


def _cards(res: dict[str, Any]) -> str:
    lat, jit = res.get("latency_ms") or {}, res.get("jitter_ms") or {}
    err = res.get("errors") or 0
    cards = [
        _card(f"{res.get('ok')} / {res.get('requests')}", "ok / measured requests"),
        _card(f'<span class="{"bad" if err else "ok"}">{_f(err)}</span>', "errors"),
        _card(_f(res.get("throughput_rps"), 1), "throughput req/s (goodput)"),
        _card(_f(lat.get("p50")), "latency p50 ms"),
        _card(_f(lat.get("p99")), "latency p99 ms"),
        _card(_f(lat.get("p999")), "latency p99.9 ms"),
        _card(_f(jit.get("spread_p99_p50")), "jitter p99-p50 ms"),
    ]
    if res.get("late_sends"):
        cards.append(_card(_f(res["late_sends"]["count"]), f"late sends (> {res['late_sends']['threshold_ms']:g} ms)"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _verdicts(res: dict[str, Any]) -> str:
    v, reason, _ = verdict(res.get("stability") or {})
    cls = {"stable": "ok", "NOT stable": "bad"}.get(v, "")
    out = [f'<p>Stability: <b class="{cls}">{escape(v)}</b> &mdash; {escape(reason)}<sup><a href="#rule">1</a>'
           "</sup></p>"]
    for s in res.get("slo") or []:
        mark = '<b class="ok">met</b>' if s["ok"] else '<b class="bad">VIOLATED</b>'
        unit = "" if s["metric"] == "error_rate" else " ms"
        value = "none measured" if s["value"] is None else f"{s['value']:g}{unit}"
        out.append(f"<p>SLO <code>{escape(s['slo'])}</code>: {mark} ({escape(s['metric'])} {escape(value)})</p>")
    return "".join(out)


def _latency_section(res: dict[str, Any], run: Run | None) -> str:
    lat, jit = res.get("latency_ms") or {}, res.get("jitter_ms") or {}
    return "".join([
        "<h2>Latency</h2><p>Measured from the " + escape(res.get("latency_from", "")) +
        "; failed requests are excluded and counted apart.</p>",
        _table(["", *stats.FIELDS, "n"], _stats_rows([
            ("latency", lat), ("service time (from actual send)", res.get("service_time_ms")),
            ("jitter: PDV", jit), ("jitter: IPDV", jit.get("ipdv"))])),
        f"<p>Jitter headline: p99&minus;p50 spread {_f(jit.get('spread_p99_p50'))} ms; mean IPDV "
        f"{_f(jit.get('ipdv_mean'))} ms; RFC 3550 J {_f(jit.get('rfc3550'))} ms.</p>",
        _latency_over_time(res, run), _histogram(res), _cdf(res)])


def _answers(res: dict[str, Any]) -> str:
    parts = ["<h2>Answers</h2>",
             _table(["status", "count"], [[k, v] for k, v in (res.get("status_counts") or {}).items()])]
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
    st = res.get("stability") or {}
    if st.get("per_window"):
        parts.append(_table(["window from s", "throughput req/s", "mean latency ms"],
                            [[w["start_s"], w["throughput_rps"], w["latency_mean_ms"]] for w in st["per_window"]]))
    return "".join(parts)


def _config(res: dict[str, Any]) -> str:
    _, _, rule = verdict(res.get("stability") or {})
    return "".join([
        f'<p class="foot" id="rule"><sup>1</sup> Stable when the {escape(rule)}.</p>',
        "<h2>Configuration and machine</h2>",
        "<details open><summary>config</summary><pre>" + escape(json.dumps(res.get("config") or {}, indent=1))
        + "</pre></details>",
        "<details><summary>machine</summary><pre>" + escape(json.dumps(res.get("machine"), indent=1))
        + "</pre></details>"])


def render(res: dict[str, Any], run: Run | None) -> str:
    title = f"loadtest {res.get('command')} {res.get('url')}"
    return page(title, CSS, [
        _header(res, title), _failures(res), _cards(res), _verdicts(res), _sweep(res),
        _latency_section(res, run), "<h2>Jitter</h2>" + _jitter(res), "<h2>Throughput</h2>" + _throughput(res),
        _hops_section(res), _answers(res), _glossary(), _config(res)])
