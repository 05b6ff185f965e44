"""Runs against the deterministic test server (a real process on loopback):
latency and per-hop attribution, schedule accuracy, coordinated omission,
closed loop, classification and error accounting."""

from __future__ import annotations

import hashlib
import itertools
import uuid
from typing import Any

import pytest

from loadtest import report
from loadtest.runner import SAMPLES, Run, RunConfig
from loadtest.schedule import arrival_offsets
from tests.loadtest.server import CHAIN


async def measure(**kw: Any) -> tuple[Run, dict[str, Any]]:
    run = Run(RunConfig(**kw))
    await run.execute()
    return run, report.analyse(run)


async def test_known_per_phase_delays_are_attributed_to_their_hops(server: str):
    _, res = await measure(url=server + "/chain", rate=25, duration=2.0, warmup=0.4)
    assert res["errors"] == 0 and res["requests"] == 50
    h = res["hops_ms"]
    want = dict(CHAIN)
    # The server sleeps each phase; asyncio.sleep overshoots by a little,
    # never undershoots. Generous upper tolerance for a noisy 2-core CI box.
    for hop in ("decode", "preprocess", "queue", "infer", "postprocess", "lb"):
        assert want[hop] <= h[hop]["p50"] <= want[hop] + 6, (hop, h[hop])
    assert want["net_edge_worker"] <= h["net_edge_worker"]["p50"] <= want["net_edge_worker"] + 6
    assert want["agent_overhead"] <= h["agent_overhead"]["p50"] <= want["agent_overhead"] + 6
    total_chain = sum(want.values())
    assert total_chain <= h["edge"]["p50"] <= total_chain + 40
    # The client sees the edge's time plus loopback: the rest is net_client_edge.
    assert h["edge"]["p50"] <= res["latency_ms"]["p50"] <= h["edge"]["p50"] + 30
    assert 0 <= h["net_client_edge"]["p50"] <= 30
    # The heartbeat RTT is a reading of the link, reported once, not a hop.
    assert "tunnel_rtt" not in h and res["heartbeat_rtt_ms"] == pytest.approx(0.25)
    for phase in ("client_send", "client_ttfb", "client_body", "client_total"):
        assert h[phase]["count"] == 50
    # Per-hop percentiles, not only means.
    assert set(h["infer"]) >= {"p50", "p90", "p99", "p999", "max", "mean"}
    # The stacked breakdown adds up to the mean latency.
    assert sum(v for _, v in res["breakdown_ms"]) == pytest.approx(res["latency_ms"]["mean"], rel=0.01)
    assert [k for k, _ in res["breakdown_ms"]][:3] == ["client_wait", "net_client", "lb"]


async def test_open_loop_at_500_per_second_keeps_its_schedule(server: str):
    run, res = await measure(url=server + "/trivial", rate=500, duration=3.0, warmup=0.5)
    assert res["requests"] == 1500
    assert res["errors"] == 0
    lag = res["late_sends"]["lag_ms"]
    # The schedule is 500/s. A stall of this process (the suite's pytest
    # process holds TensorFlow and more) can only make the last sends late,
    # by at most the measured lag: within 5% of the rate that explains.
    stalled = 1499 / (2.998 + lag["max"] / 1000)
    assert stalled * 0.95 <= res["send_rate_rps"] <= 500 * 1.05, (res["send_rate_rps"], lag)
    done = 1500 / (3.0 + (lag["max"] + res["latency_ms"]["max"]) / 1000)
    assert done * 0.95 <= res["throughput_rps"] <= 500 * 1.05, (res["throughput_rps"], lag)
    # The bench holds the p99 to 1 ms; a test on a shared 2-core box only
    # catches a broken pacer: the median must be tight, the tail bounded.
    assert lag["p50"] < 5, lag
    assert lag["p99"] < 50, lag
    assert res["latency_ms"]["count"] == 1500
    # Every measured request kept its intended time: i / rate.
    intended = sorted(r.intended for r in run.records)
    assert intended[:3] == pytest.approx([0.0, 0.002, 0.004])


async def test_poisson_arrivals_send_exactly_the_seeded_schedule(server: str):
    run, res = await measure(url=server + "/trivial", rate=200, arrivals="poisson", seed=42, duration=2.0, warmup=0.5)
    expected = list(itertools.takewhile(lambda t: t < 2.5, arrival_offsets(200, "poisson", 42)))
    assert sorted(r.intended for r in run.records) == pytest.approx(expected)
    assert res["requests"] == sum(1 for t in expected if t >= 0.5)
    assert res["errors"] == 0


async def test_a_one_second_stall_shows_in_the_open_loop_p99_not_just_the_max(server: str):
    # The server blocks for 1 s once, at its 150th request (1 s into the
    # measured part). Open loop: the ~100 requests due during the stall each
    # wait for it, from their intended send times.
    key = uuid.uuid4().hex
    url = f"{server}/co?key={key}&stall_at=150&stall_ms=1000"
    _, res = await measure(url=url, rate=100, duration=4.0, warmup=0.5)
    assert res["errors"] == 0
    assert res["latency_ms"]["max"] >= 900
    assert res["latency_ms"]["p99"] >= 500, res["latency_ms"]
    assert res["latency_ms"]["p90"] >= 100, res["latency_ms"]
    # The stall is in the jitter too, and the latency-over-time shows it.
    assert res["jitter_ms"]["spread_p99_p50"] >= 400
    assert max(row.get("max", 0) for row in res["timeline"]) >= 900


async def test_a_closed_loop_hides_the_same_stall_in_one_sample(server: str):
    # Why the open loop matters: one connection waits out the stall and
    # sends nothing meanwhile, so only one sample of thousands sees it.
    key = uuid.uuid4().hex
    url = f"{server}/co?key={key}&stall_after=1.0&stall_ms=1000"
    _, res = await measure(url=url, concurrency=1, duration=3.0, warmup=0.3)
    assert res["latency_ms"]["max"] >= 900
    assert res["latency_ms"]["p99"] < 500, res["latency_ms"]


async def test_closed_loop_measures_exactly_the_requests_asked_after_warmup(server: str):
    run, res = await measure(url=server + "/trivial", concurrency=4, requests=200, warmup=0.3)
    assert res["requests"] == 200 and res["ok"] == 200
    assert res["warmup_requests"] == len(run.records) - 200 > 0
    assert res["late_sends"] is None  # no schedule in a closed loop
    assert res["latency_from"].startswith("send time")
    # Request ids are unique per request.
    assert len({r.seq for r in run.records}) == len(run.records)


async def test_classify_posts_every_sample_and_counts_labels(server: str):
    _, res = await measure(command="classify", url=server + "/photo", concurrency=3, requests=60, warmup=0)
    assert res["ok"] == 60
    samples = sorted(p for p in SAMPLES.iterdir() if p.suffix == ".jpg")
    assert len(samples) >= 2
    expected = {hashlib.sha256(p.read_bytes()).hexdigest()[:8] for p in samples}
    assert set(res["labels"]) == expected
    assert sum(res["labels"].values()) == 60
    # Round robin over the samples: equal counts.
    assert max(res["labels"].values()) - min(res["labels"].values()) <= 1
    assert "infer" in res["hops_ms"] and "app" in res["hops_ms"]
    assert "net_client_edge" not in res["hops_ms"]  # no edge: left out, not zero


async def test_classify_from_an_images_directory(server: str, tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake a")
    (tmp_path / "notes.txt").write_text("not an image")
    _, res = await measure(command="classify", url=server + "/photo", concurrency=1, requests=5, warmup=0,
                           images=str(tmp_path))
    assert res["labels"] == {hashlib.sha256(b"\x89PNG fake a").hexdigest()[:8]: 5}


async def test_failed_requests_are_counted_apart_and_left_out_of_latency(server: str):
    key = uuid.uuid4().hex
    _, res = await measure(url=f"{server}/flaky?key={key}&every=5", concurrency=1, requests=100, warmup=0)
    assert res["requests"] == 100
    assert res["errors"] == 20 and res["ok"] == 80
    assert res["status_counts"] == {"200": 80, "503": 20}
    assert res["error_kinds"] == {"HTTP 503": 20}
    assert res["latency_ms"]["count"] == 80
    assert res["error_rate"] == pytest.approx(0.2)
    assert sum(row["errors"] for row in res["timeline"]) == 20
    assert sum(row["ok"] for row in res["timeline"]) == 80
    assert "503" in res["cause"] and "20 of 100" in res["cause"]


async def test_bad_answers_to_classify_are_errors(server: str):
    _, res = await measure(command="classify", url=server + "/photo?bad=1", concurrency=1, requests=20, warmup=0,
                           keep_going=True)
    assert res["ok"] == 0 and res["errors"] == 20
    assert res["error_kinds"] == {"bad answer": 20}
    assert res["status_counts"] == {"200": 20}


async def test_all_failing_run_stops_early_with_its_cause(server: str):
    run, res = await measure(url=server + "/status/401", rate=50, duration=10, warmup=0)
    assert run.aborted and res["requests"] < 100
    assert res["ok"] == 0
    assert "401 Unauthorized" in res["cause"] and "--api-key" in res["cause"]


async def test_records_carry_every_request(server: str):
    run, _ = await measure(url=server + "/chain?scale=0.1", rate=50, requests=20, warmup=0.2)
    recs = report.records_json(run)
    assert len(recs) == len(run.records) == 30
    assert sum(1 for r in recs if r.get("warmup")) == 10
    r = recs[-1]
    assert {"seq", "intended_s", "sent_s", "done_s", "latency_ms", "service_ms", "status", "ok", "hops_ms"} <= set(r)
    assert r["hops_ms"]["net_edge_worker"] > 0
