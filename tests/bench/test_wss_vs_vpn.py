"""bench/wss_vs_vpn.py's pure parts: its arguments, the plan of runs (each
path next to the other, the order alternating) and the report assembled from
loadtest results. The bench itself builds namespaces as root and runs for
minutes; it is not run here."""

from __future__ import annotations

import pytest

from bench import wss_vs_vpn as bench


def test_defaults_are_the_issue_s_wan_and_frame_rates() -> None:
    a = bench.parse_args([])
    assert (a.delay_ms, a.jitter_ms, a.loss, a.fps) == (20.0, 5.0, 0.0, [15.0, 30.0])
    a = bench.parse_args(["--fps", "10,60", "--loss", "2.5", "--no-inference"])
    assert a.fps == [10.0, 60.0] and a.loss == 2.5 and a.no_inference


@pytest.mark.parametrize("args", [["--fps", "0"], ["--fps", "x"], ["--loss", "100"], ["--delay-ms", "-1"],
                                  ["--seconds", "0"], ["--concurrency", "0"]])
def test_bad_arguments_exit_2_with_a_message(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(args)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_plan_pairs_every_test_across_paths_and_alternates_the_order() -> None:
    runs = bench.plan(bench.parse_args(["--fps", "15,30", "--seconds", "4"]), "https://10.231.1.1:8443")
    assert [(r.path, r.test) for r in runs] == [
        ("wss", "echo"), ("vpn", "echo"), ("vpn", "infer"), ("wss", "infer"),
        ("wss", "stream@15"), ("vpn", "stream@15"), ("vpn", "stream@30"), ("wss", "stream@30")]
    by = {(r.path, r.test): r.args for r in runs}
    assert by[("vpn", "echo")][:3] == ["ping", "--url", "https://10.231.1.1:8443/"]
    assert by[("vpn", "echo")][by[("vpn", "echo")].index("--pool") + 1] == "vpn-echo"
    assert by[("wss", "infer")][:3] == ["classify", "--url", "https://10.231.1.1:8443/photo"]
    stream = by[("wss", "stream@30")]
    assert stream[:3] == ["stream", "--url", "wss://10.231.1.1:8443/delay?ms=5"]
    assert stream[stream.index("--pool") + 1] == "wss-ws" and stream[stream.index("--fps") + 1] == "30"
    assert len({r.file for r in runs}) == len(runs)
    assert all("infer" not in r.test for r in bench.plan(bench.parse_args(["--no-inference"]), "https://e"))


def fake(path: str, test: str, result: dict, cpu: dict[str, float]) -> bench.Run:
    run = bench.Run(path, test, [])
    run.result, run.cpu_s = result, cpu
    return run


def test_report_rows_from_results() -> None:
    lat = {"p50": 55.0, "p99": 68.9}
    runs = [
        fake("wss", "echo", {"requests": 100, "errors": 0, "throughput_rps": 20.0, "latency_ms": lat,
                             "jitter_ms": {"rfc3550": 8.4}, "hops_ms": {"tunnel": {"p50": 51.8},
                                                                        "upstream": {"p50": 5.2}}},
             {"edge": 0.2, "link": 0.1}),
        fake("vpn", "echo", {"requests": 50, "errors": 1, "throughput_rps": 19.9, "latency_ms": lat,
                             "jitter_ms": {"rfc3550": 7.0}, "hops_ms": {"upstream": {"p50": 49.6}}},
             {"edge": 0.2, "link": 0.3}),
        fake("wss", "stream@15", {"frames_answered": 150, "miss_ratio": 0.02, "latency_ms": lat,
                                  "jitter_ms": {"rfc3550": 4.8}}, {"edge": 0.3, "link": 0.15}),
    ]
    rows = {r[0]: r[1:] for r in bench.table(runs)}
    assert rows["echo: edge<->worker leg p50 ms"] == ["51.8", "49.6"]  # tunnel through an agent, else upstream
    assert rows["echo: CPU ms/request edge / link"] == ["2.00 / 1.00", "4.00 / 6.00"]
    assert rows["echo: throughput req/s, errors"] == ["20.0, 0", "19.9, 1"]
    assert rows["stream 15 fps: frames within deadline %"] == ["98.00", "-"]  # no WireGuard run: a dash
    assert rows["stream 15 fps: CPU ms/frame edge / link"][0] == "2.00 / 1.00"
    text = bench.markdown(bench.table(runs))
    assert text.splitlines()[0] == "|  | WSS tunnel | WireGuard |"
    assert "| echo: latency p50 / p99 ms | 55.0 / 68.9 | 55.0 / 68.9 |" in text


def test_leg_prefers_the_load_tester_s_derived_hops() -> None:
    assert bench.leg_ms({"hops_ms": {"tunnel": {"p50": 50}, "agent": {"p50": 6}, "upstream": {"p50": 5},
                                     "net_edge_worker": {"p50": 44}}}) == 44
    assert bench.leg_ms({"hops_ms": {"upstream": {"p50": 49}, "net_edge_direct": {"p50": 43}}}) == 43
    assert bench.leg_ms({"hops_ms": {"upstream": {"p50": 49}}}) == 49
    assert bench.leg_ms({"hops_ms": {"upstream": {"p50": 5}, "agent": {"p50": 6}}}) is None  # the agent's own


def test_report_again_from_a_saved_run(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    (tmp_path / "wss-echo.json").write_text(json.dumps({"requests": 10, "latency_ms": {"p50": 1.0, "p99": 2.0}}))
    (tmp_path / "runs.json").write_text(json.dumps([{"label": "wss echo", "file": "wss-echo.json",
                                                     "cpu_s": {"edge": 0.01, "link": 0.02}}]))
    assert bench.main(["--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| echo: latency p50 / p99 ms | 1.0 / 2.0 | - |" in out and "| 1.00 / 2.00 | - |" in out
    assert bench.main(["--report", str(tmp_path / "nothing")]) == 2
