"""Reports that never mislead: partial bins, short runs, all-failed runs, the
hop tree and its tail, the stability verdict, SLO thresholds and exit codes,
and compare's differences (text and HTML). Record-level cases are built from
synthetic records (the analysis is a pure function of them); the exit codes
and files go through the real command line against a real server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from loadtest import compare, htmlreport, report, slo, summary
from loadtest.runner import Record, Run, RunConfig
from loadtest.svg import Chart, log_ticks, spans_decades
from tests.loadtest.conftest import loadtest


def _run(records: list[Record], **cfg: object) -> Run:
    run = Run(RunConfig(**{"url": "http://127.0.0.1:9/", "rate": 100.0, "duration": 3.0, "warmup": 0.0, **cfg}))
    run.records = records
    return run


def _ok(seq: int, t: float, latency_ms: float, server_timing: str | None = None) -> Record:
    r = Record(seq, t, False)
    r.sent, r.done, r.status, r.ok = t, t + latency_ms / 1000, 200, True
    r.server_timing = server_timing
    return r


def _text(res: dict) -> str:
    c = Console(record=True, width=160)
    summary.print_summary(res, c)
    return c.export_text()


def test_a_partial_last_second_is_weighted_or_dropped_never_drawn_as_a_collapse():
    # 100 req/s for 3.2 s: the fourth second is covered for 0.2 s only.
    res = report.analyse(_run([_ok(i, i / 100, 5.0) for i in range(320)]))
    tl = res["timeline"]
    assert [r["ok"] for r in tl] == [100, 100, 100, 20]
    assert [r["ok_rps"] for r in tl[:3]] == [100, 100, 100]
    assert tl[3]["ok_rps"] is None and tl[3]["cover_s"] == pytest.approx(0.195, abs=0.01)
    html = htmlreport.render(res, None)
    chart = html[html.index('id="plot-throughput"'):]
    chart = chart[:chart.index("</svg>")]
    goodput = re.findall(r"<title>ok \(goodput\): ([0-9.]+) at", chart)
    assert goodput and all(float(v) >= 99 for v in goodput)
    assert "partial last second is not drawn as a drop" in html


def test_a_short_run_says_too_little_data_instead_of_drawing_empty_axes():
    res = report.analyse(_run([_ok(i, i / 1000, 1.0) for i in range(8)]))
    html = htmlreport.render(res, None)
    for plot in ("plot-throughput", "plot-jitter-ipdv", "plot-histogram", "plot-cdf", "plot-jitter-pdv"):
        assert f'id="{plot}"' not in html, plot
    assert html.count("too little data") >= 5
    assert "per-second figures need at least 3 s" in html and "--duration 10" in html


def test_an_all_failed_run_opens_with_the_count_and_the_cause_and_never_says_0_errors():
    recs = []
    for i in range(13):  # all inside the warm-up: the run stopped before measuring
        r = Record(i, i / 13, True)
        r.done, r.status, r.error = r.intended + 0.001, 401, "HTTP 401"
        recs.append(r)
    run = _run(recs, warmup=1.0)
    run.details["HTTP 401"] = "Unauthorized: missing or unknown API key"
    run.codes["HTTP 401"] = "unauthorized"
    res = report.analyse(run)
    assert res["requests"] == 13 and res["errors"] == 13 and res["ok"] == 0
    assert res["cause"] == "13 of 13 failed: 401 Unauthorized: missing or unknown API key, check --api-key"
    lines = _text(res).splitlines()
    assert lines[1] == res["cause"]  # right under the title, before any figure
    assert any("ok 0, errors 13" in ln for ln in lines[2:5])
    html = htmlreport.render(res, None)
    assert html.index(res["cause"]) < html.index('class="cards"')


def test_an_unknown_pool_names_the_pool_option():
    r = Record(0, 0.0, False)
    r.done, r.status, r.error = 0.001, 404, "HTTP 404"
    run = _run([r])
    run.details["HTTP 404"] = "Not Found: no pool named 'gpu'; known pools: cpu"
    run.codes["HTTP 404"] = "unknown_pool"
    cause = report.analyse(run)["cause"]
    assert "check --pool (sent as X-Pool)" in cause and "--url" not in cause


def _chain(infer: float) -> str:
    return (f"infer;dur={infer}, decode;dur=1, app;dur={infer + 2}, upstream;dur={infer + 3}, agent;dur={infer + 4}, "
            f"lb;dur=0.1, tunnel;dur={infer + 5}, edge;dur={infer + 6}, tunnel_rtt;dur=0.3")


def test_the_hop_tree_nests_the_hops_and_names_where_the_p99_comes_from():
    # 200 requests; the slowest two spent 40 ms more in infer, nothing else changed.
    recs = [_ok(i, i / 100, 10.0 + (40 if i in (50, 150) else 0), _chain(5.0 + (40 if i in (50, 150) else 0)))
            for i in range(200)]
    res = report.analyse(_run(recs, url="http://127.0.0.1:9/"))
    tree = res["hop_tree"]
    keys = [n["key"] for n in tree["nodes"]]
    assert keys.index("edge") < keys.index("tunnel") < keys.index("agent") < keys.index("upstream") \
        < keys.index("app") < keys.index("infer")
    depth = {n["key"]: n["depth"] for n in tree["nodes"]}
    assert depth["edge"] == 1 and depth["tunnel"] == 2 and depth["agent"] == 3 and depth["app"] == 5 \
        and depth["infer"] == 6
    assert tree["tail_from"]["key"] == "infer" and tree["tail_from"]["share"] > 0.9
    # The heartbeat is a reading of the link, shown once, not a hop of a request.
    assert "tunnel_rtt" not in keys and "tunnel_rtt" not in res["hops_ms"]
    assert res["heartbeat_rtt_ms"] == pytest.approx(0.3)
    # Loopback is not network.
    labels = {n["key"]: n["label"] for n in tree["nodes"]}
    assert "loopback" in labels["net_client"] and "network" not in labels["net_client"].replace("(no network)", "")
    text = _text(res)
    assert "p99: the slowest 1%" in text and "in infer" in text
    assert text.count("heartbeat RTT") == 1
    html = htmlreport.render(res, None)
    assert "Where the p99 comes from" in html and 'id="glossary"' in html and "loadtesting.md" in html


def test_the_stability_line_is_a_verdict_and_a_reason_with_the_rule_as_a_footnote():
    # Throughput doubles half way: not stable.
    recs = [_ok(i, i / 50, 5.0) for i in range(150)] + [_ok(150 + i, 3 + i / 100, 5.0) for i in range(300)]
    res = report.analyse(_run(recs))
    line = next(ln for ln in _text(res).splitlines() if ln.startswith("stability:"))
    assert line.startswith("stability: NOT stable - throughput moved") and line.endswith("[1]")
    assert "within" not in line  # the rule is in the footnote, not beside the verdict
    assert any(ln.startswith("[1] stable when the last 3 windows") for ln in _text(res).splitlines())


def test_slo_specs_parse_into_limits_and_bad_ones_say_why():
    assert slo.parse("p99<100ms") == slo.Slo("p99", 100.0, False, "p99<100ms")
    assert slo.parse("p999<=0.5s").limit == 500.0 and slo.parse("p999<=0.5s").inclusive
    assert slo.parse("error_rate<1%").limit == pytest.approx(0.01)
    assert slo.parse("error_rate<0.02").limit == pytest.approx(0.02)
    for bad, why in (("p98<1ms", "unknown metric"), ("p99>1ms", "expected"), ("error_rate<3ms", "fraction"),
                     ("p99<3%", "ms or s")):
        with pytest.raises(ValueError, match=why):
            slo.parse(bad)
    res = {"latency_ms": {"p99": 120.0}, "error_rate": 0.0}
    v = slo.check([slo.parse("p99<100ms"), slo.parse("error_rate<1%")], res)
    assert [x["ok"] for x in v] == [False, True]
    assert slo.check([slo.parse("p50<1s")], {"latency_ms": {"p50": None}, "error_rate": 1.0})[0]["ok"] is False


def test_slo_thresholds_are_drawn_and_set_the_exit_code(server: str, tmp_path: Path):
    page = tmp_path / "r.html"
    ok = loadtest("ping", "--url", server + "/trivial", "--concurrency", "2", "--requests", "40", "--warmup", "0",
                  "--slo", "p99<30s", "--slo", "error_rate<1%", "--html", str(page))
    assert ok.returncode == 0, ok.stderr
    assert "SLO p99<30s: ok" in ok.stderr
    assert "stroke-dasharray" in page.read_text() and "SLO p99&lt;30s" in page.read_text()
    bad = loadtest("ping", "--url", server + "/trivial", "--concurrency", "2", "--requests", "40", "--warmup", "0",
                   "--slo", "p50<0.0001ms")
    assert bad.returncode == slo.EXIT_VIOLATED, bad.stderr
    assert "SLO p50<0.0001ms: VIOLATED" in bad.stderr
    usage = loadtest("ping", "--url", server + "/trivial", "--concurrency", "1", "--requests", "1", "--slo", "p98<1")
    assert usage.returncode == 2 and "unknown metric" in usage.stderr


def _result(p50: float, p99: float, name: str) -> dict:
    recs = [_ok(i, i / 100, p50 if i % 100 else p99, _chain(p50 / 2)) for i in range(300)]
    res = report.analyse(_run(recs, label=name))
    return json.loads(json.dumps(res))


def test_compare_prints_differences_against_the_first_run_and_draws_them():
    a, b = _result(10.0, 20.0, "direct"), _result(12.0, 30.0, "edge")
    rows = dict(compare.rows([a, b]))
    assert rows["latency p50"] == pytest.approx([10.0, 12.0], abs=0.02)
    assert compare.diff(10.0, 12.0) == "+2.00 (+20.0%)" and compare.diff(None, 1.0) == "-"
    c = Console(record=True, width=200)
    compare.print_compare([a, b], ["direct", "edge"], c)
    text = c.export_text()
    assert "edge - direct" in text and "+2.00 (+20.0%)" in text
    assert "infer p99" in text
    html = compare.render([a, b, _result(11.0, 25.0, "third")], ["direct", "edge", "third"])
    assert html.count('class="run-tree"') == 3 and 'id="plot-compare-cdf"' in html
    assert html.count("<polyline") == 3  # one percentile curve per run
    assert "&Delta; vs direct" in html and "<script" not in html


def test_compare_html_from_the_command_line(server: str, tmp_path: Path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.html"
    for f in (a, b):
        assert loadtest("ping", "--url", server + "/trivial", "--concurrency", "2", "--requests", "30", "--warmup",
                        "0", "--json", str(f)).returncode == 0
    r = loadtest("compare", str(a), str(b), "--html", str(out))
    assert r.returncode == 0, r.stderr
    assert "b - a" in r.stdout and "%" in r.stdout
    assert 'id="plot-compare-cdf"' in out.read_text()


def test_charts_hover_values_log_axis_for_decades_and_series_order():
    assert spans_decades([1, 5, 300]) and not spans_decades([10, 20, 40])
    assert log_ticks(0.7, 340) == [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]
    c = Chart("x", "t", "x", "y", [0, 1, 2], [1, 10, 1000], log_y=True)
    c.line([(0, 1), (1, 10), (2, 1000)], "p99", "#d62728")
    svg = c.render()
    assert "log scale" in svg and "<title>p99: 10 at 1</title>" in svg
    # The middle point sits half way up on a log axis (1 -> 10 -> 1000 is 1/3), not flattened at the bottom.
    ys = [float(y) for y in re.findall(r'cy="([0-9.]+)"', svg)]
    assert ys[0] > ys[1] > ys[2] and (ys[0] - ys[1]) > 0.2 * (ys[0] - ys[2])
    res = report.analyse(_run([_ok(i, i / 100, 5.0 + (i % 7) + (30 if i % 100 == 3 else 0)) for i in range(400)]))
    html = htmlreport.render(res, None)
    lt = html[html.index('id="plot-latency-time"'):]
    assert lt.index("max per second") > 0
    # Drawn back to front: max, then p50, then p99 on top.
    body = lt[:lt.index("</svg>")]
    assert body.index("<title>max per second") < body.index("<title>p50 per second") \
        < body.index("<title>p99 per second")


@pytest.mark.parametrize("command", ["ping", "classify", "stream", "compare", "report"])
def test_every_subcommand_help_has_examples_and_prints_each_default_once(command: str):
    r = loadtest(command, "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and f"loadtest {command} " in r.stdout
    assert "(default: None)" not in r.stdout and "(default: False)" not in r.stdout
    assert not re.search(r"default[^()]*\)\s*\(default:", r.stdout.replace("\n", " "))


def test_a_stream_report_opens_with_its_failure_and_says_when_it_has_too_little_data(ws_server: str, tmp_path: Path):
    out, page, again = tmp_path / "s.json", tmp_path / "s.html", tmp_path / "again.html"
    r = loadtest("stream", "--url", ws_server + "/key", "--api-key", "wrong", "--fps", "10", "--frames", "3",
                 "--json", str(out),
                 "--html", str(page), "--quiet")
    assert r.returncode == 1
    res = json.loads(out.read_text())
    lines = r.stdout.splitlines()
    assert lines[1] == res["cause"] and "check --api-key" in res["cause"]
    html = page.read_text()
    assert html.index(res["cause"]) < html.index('class="cards"')
    assert "too little data" in html
    assert loadtest("report", str(out), "--html", str(again)).returncode == 0
    assert "too little data" in again.read_text()
