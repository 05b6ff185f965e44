"""Two or more results side by side: the figures of each with their
difference from the first (absolute and %), and with `--html` overlaid
percentile curves and the hop trees next to each other."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from rich.console import Console
from rich.table import Table

from . import hops as hoplib
from .summary import _f, load_text
from .svg import PALETTE, Chart

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


def diff(base: Any, other: Any) -> str:
    """`+1.23 (+4.5%)` of `other` against `base`; `-` when either is missing."""
    if not isinstance(base, int | float) or not isinstance(other, int | float):
        return "-"
    d = other - base
    if isinstance(base, int) and isinstance(other, int):
        return f"{d:+d}" + (f" ({d / base:+.1%})" if base else "")
    pct = f" ({d / base:+.1%})" if base else ""
    return f"{d:+.2f}{pct}"


def _tree_nodes(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {nd["key"]: nd for nd in (r.get("hop_tree") or {}).get("nodes", [])}


def rows(results: Sequence[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """(label, value per result) of every compared figure: the table rows,
    then each hop's p50 and p99 (from the hop tree, else the per-hop table)."""
    out = [(label, [_get(r, path) for r in results]) for label, path in COMPARE_ROWS]
    keys: list[str] = []
    for r in results:
        for k in _tree_nodes(r) or r.get("hops_ms", {}):
            if k not in keys and k != "latency":
                keys.append(k)
    order = {k: i for i, k in enumerate(hoplib.TREE_ORDER)}
    keys.sort(key=lambda k: (order.get(k, len(order)), hoplib.order_key(k)))
    for k in keys:
        for p in ("p50", "p99"):
            out.append((f"{k} {p}", [(_tree_nodes(r).get(k) or _get(r, ("hops_ms", k)) or {}).get(p)
                                     for r in results]))
    return out


def print_compare(results: Sequence[dict[str, Any]], names: Sequence[str], console: Console) -> None:
    t = Table(title=f"comparison (ms unless noted; differences against {names[0]})", title_justify="left")
    t.add_column("")
    t.add_column(names[0], justify="right")
    for n in names[1:]:
        t.add_column(n, justify="right")
        t.add_column(f"{n} - {names[0]}", justify="right")
    for label, values in rows(results):
        cells = [_f(values[0])]
        for v in values[1:]:
            cells += [_f(v), diff(values[0], v)]
        t.add_row(label, *cells)
    console.print(t)
    for n, r in zip(names, results, strict=True):
        cfg = r.get("config", {})
        console.print(f"{n}: {r.get('command')} {r.get('url')} ({load_text(cfg)}, pool {cfg.get('pool') or '-'}"
                      f", started {r.get('started_at')})", highlight=False)
    cpus = {(r.get("machine") or {}).get("cpus_usable") for r in results}
    if any(c is not None and c <= 2 for c in cpus):
        console.print("note: on 2 cores the load tester, the edge, the agents and the servers share the CPU: the "
                      "tails (p99 and beyond) of identical runs differ by tens of percent; read the p50s, and repeat "
                      "a run before trusting a difference in the tail.", style="dim", highlight=False)


def render(results: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """A self-contained HTML page: the table, the percentile curves overlaid
    and the hop trees side by side."""
    from .htmlreport import CSS, page

    head = "".join(f"<th>{escape(n)}</th>" + (f"<th>&Delta; vs {escape(names[0])}</th>" if i else "")
                   for i, n in enumerate(names))
    body = []
    for label, values in rows(results):
        cells = f"<td>{_f(values[0])}</td>" + "".join(f"<td>{_f(v)}</td><td>{escape(diff(values[0], v))}</td>"
                                                      for v in values[1:])
        body.append(f"<tr><td>{escape(label)}</td>{cells}</tr>")
    table = f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"
    curves = [(n, [(p, v) for p, v in (r.get("distribution") or {}).get("latency_cdf", []) if p < 100])
              for n, r in zip(names, results, strict=True)]
    xs = [p for _, c in curves for p, _ in c]
    ys = [v for _, c in curves for _, v in c]
    chart = ""
    if xs:
        c = Chart("plot-compare-cdf", "Latency by percentile, every run", "percentile", "latency ms", xs, ys,
                  percentile_x=True)
        for i, (n, pts) in enumerate(curves):
            c.line(pts, n, PALETTE[i % len(PALETTE)], dots=True)
        chart = c.render()
    trees = "".join(f'<div class="run-tree"><h3>{escape(n)}</h3>{_tree_table(r)}</div>'
                    for n, r in zip(names, results, strict=True))
    runs = "".join(f"<li><b>{escape(n)}</b>: {escape(str(r.get('command')))} {escape(str(r.get('url')))} "
                   f"({escape(load_text(r.get('config') or {}))})</li>" for n, r in zip(names, results, strict=True))
    return page("loadtest compare: " + " vs ".join(names), CSS + ".trees{display:flex;gap:1em;flex-wrap:wrap}",
                [f"<h1>Comparison: {escape(' vs '.join(names))}</h1><ul>{runs}</ul>", table, chart,
                 f'<h2>Hop trees</h2><div class="trees">{trees}</div>'])


def _tree_table(r: dict[str, Any]) -> str:
    from .htmlreport import hop_tree_table

    return hop_tree_table(r) or "<p>no hops measured</p>"
