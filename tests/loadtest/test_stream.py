"""`loadtest stream` as a user runs it, against WebSocket servers of known
behaviour (tests/loadtest/wsserver.py), over real TLS where it matters:
latency against a known delay, frame counts, drops, silent frames, plain
echo, deadline misses, errors, closes, the key, the JSON, the HTML, and the
capacity search against a server with a hard capacity."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from loadtest import stats
from tests.loadtest.conftest import TlsServer, loadtest
from tests.loadtest.wsserver import KEY

CONTRACT = ("frames_sent", "frames_answered", "frames_dropped", "deadline_misses", "achieved_fps", "latency_ms",
            "jitter_ms")


def run(tmp_path: Path, url: str, *args: str, name: str = "s", ok: bool = True) -> tuple[dict[str, Any], str, str]:
    out = tmp_path / f"{name}.json"
    r = loadtest("stream", "--url", url, "--json", str(out), "--quiet", *args)
    if ok:
        assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(out.read_text()), r.stdout, r.stderr


def _check_contract(d: dict[str, Any]) -> None:
    for k in CONTRACT:
        assert k in d, k
    for k in stats.FIELDS:
        assert k in d["latency_ms"], k
        assert k in d["jitter_ms"], k
    assert "rfc3550" in d["jitter_ms"]


def test_known_delay_over_tls_measures_the_delay_counts_every_frame_and_writes_json_and_html(
        wss_server: TlsServer, tmp_path: Path):
    page = tmp_path / "s.html"
    res, stdout, _ = run(tmp_path, wss_server.url + "/delay?ms=20&timing=1", "--ca", str(wss_server.ca),
                         "--fps", "25", "--duration", "2", "--streams", "2", "--frame-bytes", "50000",
                         "--html", str(page))
    _check_contract(res)
    assert res["frames_sent"] == 2 * 25 * 2
    assert res["frames_answered"] == 100 and res["frames_dropped"] == 0 and res["deadline_misses"] == 0
    # The server answers exactly 20 ms after each frame arrived; the rest is loopback, TLS and a busy machine.
    assert 19.5 <= res["latency_ms"]["p50"] <= 20 + 15, res["latency_ms"]
    assert res["latency_ms"]["min"] >= 19.5
    # Small jitter: a steady server. The bounds leave room for a busy 2-core
    # machine's stalls (|IPDV| p50 reached 3.4 ms with the suite sharing the
    # cores) yet stay well below the 20 ms a miscomputed jitter (from the
    # latencies themselves, not their differences) would show.
    assert res["jitter_ms"]["rfc3550"] < 10 and res["jitter_ms"]["p50"] < 8, res["jitter_ms"]
    assert res["achieved_fps"] == pytest.approx(50, rel=0.02)
    assert res["achieved_fps_per_stream"] == pytest.approx(25, rel=0.02)
    assert res["config"]["frame_sizes"] == [50000] and res["config"]["api_key"] is None
    assert len(res["streams"]) == 2
    for s in res["streams"]:
        _check_contract(s)
        assert s["frames_sent"] == 50 and s["frames_answered"] == 50
        assert s["subprotocol"] == "inference.v1" and s["upgrade_status"] == 101
        # The 101's Server-Timing, and the derived edge<->worker share: tunnel 3.5 - agent 2.0.
        assert s["upgrade_hops_ms"]["net_edge_worker"] == pytest.approx(1.5)
        assert s["upgrade_hops_ms"]["tunnel_rtt"] == pytest.approx(0.75)
    # Staggered evenly within one frame interval (40 ms at 25 fps).
    assert [s["offset_ms"] for s in res["streams"]] == [0, 20]
    assert res["upgrade_hops_ms"]["net_edge_worker"]["p50"] == pytest.approx(1.5)
    # The server's phases per frame, from each answer's `timing`.
    assert res["server_timing_ms"]["infer"]["mean"] == pytest.approx(10.0)
    assert res["server_timing_ms"]["decode"]["p99"] == pytest.approx(1.5)
    assert "upgrade net_edge_worker" in stdout and "server infer" in stdout

    html = page.read_text()
    for plot in ("plot-stream-latency", "plot-histogram", "plot-cdf", "plot-stream-jitter"):
        assert f'id="{plot}"' in html, plot
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)

    # `report` prints and draws a saved stream result (over time from its per-second timeline).
    again = tmp_path / "again.html"
    r = loadtest("report", str(tmp_path / "s.json"), "--html", str(again))
    assert r.returncode == 0, r.stderr
    assert "frames sent 100" in r.stdout
    for plot in ("plot-stream-latency", "plot-histogram", "plot-cdf", "plot-stream-jitter"):
        assert f'id="{plot}"' in again.read_text(), plot


def test_frames_option_sends_exactly_that_many_per_stream(ws_server: str, tmp_path: Path):
    res, _, _ = run(tmp_path, ws_server + "/delay?ms=2", "--fps", "40", "--frames", "30", "--streams", "3")
    assert res["frames_sent"] == 90 and [s["frames_sent"] for s in res["streams"]] == [30, 30, 30]
    assert res["frames_answered"] == 90


def test_frames_the_server_drops_are_counted_dropped(ws_server: str, tmp_path: Path):
    res, _, _ = run(tmp_path, ws_server + "/drop?every=3&ms=5", "--fps", "30", "--frames", "30")
    assert res["frames_sent"] == 30
    assert res["frames_dropped"] == res["dropped_by_server"] == 10
    assert res["frames_answered"] == 20 and res["unanswered"] == 0
    assert res["latency_ms"]["count"] == 20  # dropped frames have no latency


def test_frames_never_answered_are_dropped_after_the_deadline(ws_server: str, tmp_path: Path):
    res, _, _ = run(tmp_path, ws_server + "/silent?every=4&ms=5", "--fps", "40", "--frames", "40",
                    "--deadline-ms", "300")
    assert res["frames_dropped"] == res["unanswered"] == 10
    assert res["frames_answered"] == 30 and res["deadline_misses"] == 0
    # Waited no longer than two deadlines after the last frame (39 / 40 s) for the missing answers.
    assert res["duration_s"] < 39 / 40 + 2 * 0.3 + 1.0


def test_a_plain_echo_server_is_measured_by_order(wss_server: TlsServer, tmp_path: Path):
    res, _, _ = run(tmp_path, wss_server.url + "/echo", "--ca", str(wss_server.ca), "--fps", "30", "--frames",
                    "30", "--streams", "2", "--frame-bytes", "20000")
    assert res["frames_answered"] == 60 and res["frames_dropped"] == 0 and res["unmatched_answers"] == 0
    assert res["latency_ms"]["p50"] < 20


def test_answers_later_than_the_deadline_are_deadline_misses(ws_server: str, tmp_path: Path):
    # Late, but within the two deadlines a stream waits after its last frame: misses, not drops.
    res, _, _ = run(tmp_path, ws_server + "/delay?ms=90", "--fps", "20", "--frames", "20", "--deadline-ms", "60")
    assert res["frames_answered"] == 20 and res["deadline_misses"] == 20 and res["frames_dropped"] == 0
    assert res["miss_ratio"] == 1.0
    res, _, _ = run(tmp_path, ws_server + "/delay?ms=90", "--fps", "20", "--frames", "20", "--deadline-ms", "500",
                    name="t")
    assert res["deadline_misses"] == 0


def test_error_answers_are_counted_apart(ws_server: str, tmp_path: Path):
    res, _, _ = run(tmp_path, ws_server + "/error?every=5", "--fps", "50", "--frames", "25")
    assert res["frames_errors"] == 5 and res["frames_answered"] == 20 and res["frames_dropped"] == 0


def test_a_server_closing_the_stream_is_reported_with_its_code(ws_server: str, tmp_path: Path):
    res, _, stderr = run(tmp_path, ws_server + "/close?after=5&code=4321", "--fps", "50", "--frames", "20")
    s = res["streams"][0]
    assert s["close_code"] == 4321 and s["error"] == "closed"
    assert res["frames_sent"] == 5 and res["frames_not_sent"] == 15
    assert "4321" in stderr and "warning:" in stderr and stderr.count("\n") == 1


def test_the_key_is_sent_on_the_upgrade_and_a_refusal_is_one_line(ws_server: str, tmp_path: Path):
    res, _, _ = run(tmp_path, ws_server + "/key", "--api-key", KEY, "--fps", "20", "--frames", "5")
    assert res["frames_answered"] == 5
    assert KEY not in (tmp_path / "s.json").read_text() and res["config"]["api_key"] == "(set)"
    res, _, stderr = run(tmp_path, ws_server + "/key", "--api-key", "wrong", "--fps", "20", "--frames",
                         "5", "--streams", "2", ok=False)
    assert res["frames_sent"] == 0 and res["streams_connected"] == 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 401" in lines[0] and "--api-key" in lines[0] and "2 of 2 streams" in lines[0]
    assert "a valid key is required" in lines[0]  # the server's own reason, though aiohttp drops a refusal's body


def test_the_upgrade_offers_the_subprotocol_sends_key_and_pool_and_asks_for_no_compression(
        ws_server: str, tmp_path: Path):
    res, _, _ = run(tmp_path, ws_server + "/headers", "--api-key", "k-1", "--pool", "gpu", "--fps", "20",
                    "--frames", "3")
    (label,) = res["labels"]  # every frame saw the same upgrade request
    seen = json.loads(label)
    assert seen == {"Authorization": "Bearer k-1", "X-Pool": "gpu", "Sec-WebSocket-Protocol": "inference.v1",
                    "Sec-WebSocket-Extensions": None}
    assert res["labels"][label] == 3


def test_bad_options_and_unreachable_servers_are_one_line(tmp_path: Path):
    from tests.harness import free_port

    r = loadtest("stream", "--url", "http//nope", "--fps", "10", "--frames", "3")
    assert r.returncode == 2 and "ws://" in r.stderr
    r = loadtest("stream", "--url", "ws://127.0.0.1:1/x", "--fps", "10", "--frames", "3", "--images",
                 str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = loadtest("stream", "--url", f"ws://127.0.0.1:{free_port()}/x", "--fps", "10", "--frames", "3")
    assert r.returncode == 1 and "cannot connect" in r.stderr and r.stderr.count("\n") == 1


def test_capacity_finds_how_many_streams_a_serial_server_keeps_up_with(ws_server: str, tmp_path: Path):
    # One worker for all connections, 40 ms per frame: at 10 fps a stream needs 40% of it,
    # so 2 streams keep up (80%) and 3 do not (120%: the queue grows without end).
    res, stdout, _ = run(tmp_path, ws_server + "/serial?ms=40", "--fps", "10", "--duration", "2.5",
                         "--deadline-ms", "200", "--capacity", "--threshold", "0.05", "--max-streams", "16")
    cap = res["capacity"]
    # Within one step of the true 2 (a stall of the busy test machine can fail the 2-stream step);
    # the search's exactness is the unit tests' business.
    n = cap["sustained_streams"]
    assert n in (1, 2), cap["steps"]
    assert cap["failed_at_streams"] == n + 1
    steps = {s["streams"]: s for s in cap["steps"]}
    first_failed = steps[n + 1]
    assert steps[1]["passed"] and not first_failed["passed"] and first_failed["miss_ratio"] > 0.05
    if n == 2:
        assert [s["streams"] for s in cap["steps"]] == [1, 2, 4, 3]
        assert steps[4]["miss_ratio"] > 0.3  # 160%: most frames late
    assert res["streams_connected"] == n  # the top level is the sustained step
    assert f"sustained: {n} real-time stream(s)" in stdout
