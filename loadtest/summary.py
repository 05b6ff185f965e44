"""The summary of a run on a terminal: failures first (count and cause),
then the load, the latency table, the hop tree with where the p99 comes
from, the stability verdict with its rule as a footnote, and a sweep's
table. Also the SLO verdicts (`--slo`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from . import stats

DOCS = "docs/loadtesting.md"


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def load_text(cfg: dict[str, Any]) -> str:
    if cfg.get("mode") == "open":
        return f"open loop, {cfg.get('arrivals')} arrivals at {cfg.get('rate') or 0:g} req/s"
    return f"closed loop, concurrency {cfg.get('concurrency')}"


def verdict(st: dict[str, Any]) -> tuple[str, str, str]:
    """(verdict, reason, rule) of the stability check, each on its own."""
    v = {True: "stable", False: "NOT stable", None: "not judged"}[st.get("stable")]
    return v, str(st.get("reason") or ""), str(st.get("criterion") or "")


def print_summary(res: dict[str, Any], console: Console) -> None:
    cfg = res["config"]
    console.print(f"{res['command']} {res['url']} - {load_text(cfg)}", style="bold", highlight=False)
    _print_failures(res, console)
    line = (f"requests {res['requests']} (+{res['warmup_requests']} warm-up), ok {res['ok']}, errors {res['errors']}"
            f", {res['duration_s']:.2f} s, throughput {res['throughput_rps']:.1f} req/s")
    if res.get("send_rate_rps"):
        line += f", sent {res['send_rate_rps']:.1f} req/s"
    console.print(line, highlight=False)
    if res.get("counts_note"):
        console.print(f"note: {res['counts_note']}", highlight=False)
    if res["ok"]:
        _print_latency(res, console)
        print_hop_tree(res, console)
    if res.get("late_sends"):
        ls = res["late_sends"]
        console.print(f"late sends (> {ls['threshold_ms']:g} ms after the intended time): {ls['count']}"
                      f", lag p50 {_f(ls['lag_ms']['p50'], 3)} ms, p99 {_f(ls['lag_ms']['p99'], 3)} ms",
                      highlight=False)
    v, reason, rule = verdict(res["stability"])
    console.print(f"stability: {v} - {reason} [1]", highlight=False)
    if res["status_counts"]:
        console.print("status: " + ", ".join(f"{k} x{v}" for k, v in res["status_counts"].items()), highlight=False)
    if res.get("labels"):
        console.print("labels: " + ", ".join(f"{k} x{v}" for k, v in list(res["labels"].items())[:10]),
                      highlight=False)
    if res.get("sweep"):
        print_sweep(res["sweep"], console)
    console.print(f"[1] stable when the {rule}. Derived names are explained in {DOCS} (and in the HTML "
                  "report's glossary).", style="dim", highlight=False)


def _print_failures(res: dict[str, Any], console: Console) -> None:
    """Failures first: the count and the cause before any figure."""
    if res.get("cause"):
        console.print(res["cause"], style="bold red", highlight=False)
    if res.get("aborted"):
        console.print(res["aborted"], style="red", highlight=False)
    if res.get("error_kinds"):
        console.print("errors: " + ", ".join(f"{k} x{v}" for k, v in res["error_kinds"].items()), highlight=False)


def _print_latency(res: dict[str, Any], console: Console) -> None:
    t = Table(title=f"latency (ms, from the {res['latency_from']})", title_justify="left")
    t.add_column("")
    for k in stats.FIELDS:
        t.add_column(k, justify="right")
    t.add_column("n", justify="right")

    def row(name: str, s: dict[str, Any] | None) -> None:
        if s:
            t.add_row(name, *(_f(s.get(k)) for k in stats.FIELDS), str(s.get("count", "")))

    row("latency", res["latency_ms"])
    if res["config"]["mode"] == "open":
        row("service time", res["service_time_ms"])
    j = res["jitter_ms"]
    row("jitter PDV", j)
    row("jitter IPDV", j.get("ipdv"))
    console.print(t)
    if j.get("count"):
        console.print(f"jitter: p99-p50 spread {_f(j['spread_p99_p50'])} ms, mean IPDV {_f(j['ipdv_mean'])} ms, "
                      f"RFC 3550 J {_f(j['rfc3550'])} ms", highlight=False)


def heartbeat_text(res: dict[str, Any]) -> str | None:
    """The tunnel's heartbeat RTT, once: a reading of the link, not a hop."""
    if res.get("tunnel_rtt_ms"):
        return "tunnel heartbeat RTT (the edge's reading of the link, not part of a request): " + ", ".join(
            f"{k} {v:.2f} ms" for k, v in res["tunnel_rtt_ms"].items())
    if res.get("heartbeat_rtt_ms") is not None:
        return (f"tunnel heartbeat RTT (the edge's reading of the link, not part of a request): "
                f"{res['heartbeat_rtt_ms']:.2f} ms")
    return None


def print_hop_tree(res: dict[str, Any], console: Console) -> None:
    tree = res.get("hop_tree")
    if not tree or len(tree["nodes"]) < 2:
        return
    t = Table(title="hop by hop (ms)", title_justify="left")
    for c, j in (("hop", "left"), ("p50", "right"), ("p99", "right"), ("tail excess", "right")):
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    for nd in tree["nodes"]:
        name = nd["label"] if nd["label"] == nd["key"] else f"{nd['label']} ({nd['key']})"
        t.add_row("  " * nd["depth"] + name, _f(nd["p50"]), _f(nd["p99"]), _f(nd["tail_excess_ms"]))
    console.print(t)
    if tree.get("tail_from"):
        console.print("p99: " + tree["tail_from"]["text"], highlight=False)
    hb = heartbeat_text(res)
    if hb:
        console.print(hb, highlight=False)


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
