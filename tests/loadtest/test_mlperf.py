"""`loadtest mlperf`: MLCommons' LoadGen driving the real inference server
through our HTTP client, every scenario in a short run (LoadGen's own
min_duration_ms and min_query_count lowered), and the peak search as a pure
policy."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.mlperfjudge import PeakSearch, queries_needed, read_summary
from tests.harness import PY, ROOT
from tests.inference.conftest import Server, start_server
from tests.loadtest.conftest import loadtest

pytest.importorskip("mlperf_loadgen")

MODEL = "efficientnet-lite0"
SERVER_HOPS = ("decode", "preprocess", "queue", "infer", "postprocess", "app", "client_total")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server("onnxruntime", tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("cache"))
    try:
        yield s
    finally:
        s.proc.stop()


def mlperf(out: Path, *args: str, timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    r = loadtest("mlperf", "--out", str(out), *args, timeout=timeout)
    res = json.loads((out / "loadtest_mlperf.json").read_text()) if (out / "loadtest_mlperf.json").exists() else {}
    return r.returncode, res, r.stdout + r.stderr


def check_run(code: int, res: dict[str, Any], text: str, out: Path, scenario: str) -> None:
    assert res, text
    assert (out / "mlperf_log_summary.txt").is_file() and (out / "mlperf_log_detail.txt").is_file()
    summary = (out / "mlperf_log_summary.txt").read_text()
    assert f"Scenario : {scenario}" in summary
    assert res["scenario"] == scenario and res["loadgen_result"] in summary
    assert res["result"] in ("VALID", "INVALID") and code == (0 if res["result"] == "VALID" else 1)
    if res["result"] == "INVALID":
        assert res["why"], "an INVALID run says why"
    assert res["errors"] == {}, res["errors"]
    assert isinstance(res["metric"]["value"], float) and res["metric"]["value"] > 0, res["metric"]
    # The hops of the very requests LoadGen timed.
    for hop in SERVER_HOPS:
        assert res["hops_ms"][hop]["count"] == res["requests"], hop
    assert res["hops_ms"]["app"]["p50"] <= res["hops_ms"]["client_total"]["p50"]
    assert f"{res['result']}" in text and res["metric"]["name"] in text


SHORT = ("--duration", "1", "--min-queries", "16")


def test_single_stream(server: Server, tmp_path: Path) -> None:
    code, res, text = mlperf(tmp_path, "--scenario", "SingleStream", "--url", server.url + "/photo", *SHORT)
    check_run(code, res, text, tmp_path, "SingleStream")
    assert res["metric"]["unit"] == "ms" and res["requests"] >= 16
    detail = res["loadgen"]
    # SingleStream: one sample in flight at a time, so queries == requests.
    assert detail["result_query_count"] == res["requests"]


def test_multi_stream_over_oip(server: Server, tmp_path: Path) -> None:
    code, res, text = mlperf(tmp_path, "--scenario", "MultiStream", "--url", server.url, "--protocol", "oip",
                             "--model", MODEL, *SHORT)
    check_run(code, res, text, tmp_path, "MultiStream")
    # Eight samples per query, each its own OIP request.
    assert res["requests"] == 8 * res["loadgen"]["result_query_count"]


def test_server(server: Server, tmp_path: Path) -> None:
    code, res, text = mlperf(tmp_path, "--scenario", "Server", "--url", server.url + "/photo", "--target-qps", "5",
                             "--target-latency-ms", "2000", *SHORT)
    check_run(code, res, text, tmp_path, "Server")
    assert res["metric"]["unit"] == "QPS" and res["target_qps"] == 5


def test_offline(server: Server, tmp_path: Path) -> None:
    code, res, text = mlperf(tmp_path, "--scenario", "Offline", "--url", server.url + "/photo", "--target-qps", "20",
                             "--concurrency", "4", *SHORT)
    check_run(code, res, text, tmp_path, "Offline")
    # Offline: one query of expected QPS x min duration x 1.1 samples at least.
    assert res["requests"] >= 22 and res["metric"]["unit"] == "samples/s"


def test_server_find_peak(server: Server, tmp_path: Path) -> None:
    # A coarse search (stop once the bracket is within half its top) at a loose bound, to stay short:
    # each step runs the 662 queries early stopping needs for a p99.
    code, res, text = mlperf(tmp_path, "--scenario", "Server", "--url", server.url + "/photo", "--find-peak",
                             "--target-qps", "40", "--target-latency-ms", "3000", "--peak-precision", "0.5", *SHORT,
                             timeout=600)
    fp = res["find_peak"]
    steps = fp["steps"]
    assert len(steps) >= 2 and "find-peak: 40 QPS" in text
    valid = [s["target_qps"] for s in steps if s["result"] == "VALID"]
    invalid = [s["target_qps"] for s in steps if s["result"] == "INVALID"]
    assert fp["peak_qps"] == (max(valid) if valid else None)
    if valid and invalid:
        assert min(invalid) > fp["peak_qps"], "the peak is below every INVALID rate tried"
    for s in steps:  # each step has its own LoadGen logs
        assert (tmp_path / f"server-{s['target_qps']:g}qps" / "mlperf_log_summary.txt").is_file()
    assert code == (0 if res["result"] == "VALID" else 1)


def test_usage_errors(server: Server, tmp_path: Path) -> None:
    r = loadtest("mlperf", "--scenario", "Offline", "--url", server.url + "/photo", "--find-peak")
    assert r.returncode == 2 and "--find-peak searches the Server scenario" in r.stderr
    r = loadtest("mlperf", "--scenario", "Server", "--url", server.url, "--protocol", "oip", "--model", "nope",
                 "--out", str(tmp_path))
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr


def test_peak_search_doubles_then_bisects() -> None:
    s = PeakSearch(10, precision=0.1)
    truth = 37.0  # VALID at or below
    seen = []
    while (q := s.next_qps()) is not None:
        seen.append(q)
        s.record(q, q <= truth)
    assert seen[:3] == [10, 20, 40]
    assert s.peak is not None and truth * 0.9 <= s.peak <= truth
    assert len(seen) <= s.max_steps


def test_peak_search_when_the_first_rate_fails() -> None:
    s = PeakSearch(8, floor=1)
    assert s.next_qps() == 8
    s.record(8, False)
    assert s.next_qps() == 4
    s.record(4, False)
    s.record(2, False)
    s.record(1, False)
    assert s.next_qps() is None and s.peak is None


def test_read_summary_says_why(tmp_path: Path) -> None:
    (tmp_path / "mlperf_log_summary.txt").write_text(
        "Scenario : Server\nResult is : INVALID\n  Performance constraints satisfied : NO\n"
        "  Min duration satisfied : Yes\n  Min queries satisfied : Yes\n  Early stopping satisfied: NO\n"
        "Recommendations:\n * Reduce target QPS to improve latency.\nEarly Stopping Result:\n"
        " * Run unsuccessful.\n * Processed 40 queries.\n\nAdditional Stats\n")
    res = read_summary(tmp_path)
    assert res["result"] == "INVALID"
    assert res["why"] == ["Performance constraints satisfied: NO", "Early stopping satisfied: NO",
                          "Reduce target QPS to improve latency.", "Run unsuccessful.", "Processed 40 queries."]
    assert res["early_stopping"] == ["Run unsuccessful.", "Processed 40 queries."]


def test_early_stopping_short_of_queries_asks_for_them() -> None:
    run = {"errors": {}, "why": ["Early stopping satisfied: NO", "Run unsuccessful."],
           "early_stopping": ["Run unsuccessful.", "Processed 662 queries.",
                              "Would need to run at least 495 more queries, with the run being successful if every "
                              "additional query were under latency."]}
    assert queries_needed(run) == 1157
    assert queries_needed(run | {"early_stopping": ["Only processed 125 queries.",
                                                    "Need to process at least 662 queries for early stopping."]}) == 662
    # Too slow is not too early: no second run.
    assert queries_needed(run | {"why": ["Performance constraints satisfied: NO", "Early stopping satisfied: NO"]}) \
        is None
    assert queries_needed(run | {"errors": {"HTTP 503": 3}}) is None


def test_ctrl_c_ends_at_once(server: Server, tmp_path: Path) -> None:
    p = subprocess.Popen([PY, "-m", "loadtest", "mlperf", "--scenario", "Server", "--url", server.url + "/photo",
                          "--target-qps", "10", "--duration", "60", "--out", str(tmp_path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "mlperf_log_detail.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # LoadGen has started once its log exists
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
