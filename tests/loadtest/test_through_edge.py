"""The load tester through the real system: edge, agent and upstream as
processes on loopback with a local PKI."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loadtest import report
from loadtest.runner import Run, RunConfig
from tests.harness import Pki, System, make_pki, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def edge(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[System, str]]:
    s = System(pki, tmp_path)
    try:
        _, up = await s.upstream()
        _, url = await s.edge()
        s.agent("w1", url, up, "--heartbeat-interval", "0.2")
        await s.wait_available(url, ["w1"])

        async def rtt_known() -> bool:
            return (await s.workers(url))["w1"].get("tunnel_rtt_ms") is not None

        await wait_for(rtt_known, 15, "the edge to measure the tunnel RTT")
        yield s, url
    finally:
        await s.close()


async def measure(**kw: Any) -> dict[str, Any]:
    run = Run(RunConfig(**kw))
    await run.execute()
    return report.analyse(run)


async def test_every_hop_of_the_edge_and_agent_is_reported(edge: tuple[System, str]):
    s, url = edge
    res = await measure(url=url + "/", api_key=s.pki.client_key, ca=str(s.pki.ca), concurrency=2, requests=60,
                        warmup=0.3)
    assert res["ok"] == 60, res["cause"]
    h = res["hops_ms"]
    for hop in ("lb", "tunnel", "edge", "upstream", "agent", "net_edge_worker", "net_client_edge", "client_ttfb",
                "client_total"):
        assert h[hop]["count"] == 60, hop
    # Nested hops: the inner can never exceed the outer.
    assert h["agent"]["p50"] <= h["tunnel"]["p50"] <= h["edge"]["p50"] <= res["latency_ms"]["p50"]
    assert h["net_edge_worker"]["p50"] >= 0 and h["net_client_edge"]["p50"] >= 0
    # The upstream of these tests is not an inference server: no app entry,
    # so agent_overhead is left out rather than invented.
    assert "app" not in h and "agent_overhead" not in h
    assert res["tunnel_rtt_ms"] and res["tunnel_rtt_ms"]["w1"] >= 0
    assert sum(v for _, v in res["breakdown_ms"]) == pytest.approx(res["latency_ms"]["mean"], rel=0.01)


async def test_a_key_without_admin_rights_says_why_the_per_worker_rtt_is_missing(
        edge: tuple[System, str], caplog: pytest.LogCaptureFixture):
    s, url = edge
    with caplog.at_level(logging.WARNING, logger="loadtest.client"):
        res = await measure(url=url + "/", api_key=s.pki.plain_key, ca=str(s.pki.ca), concurrency=1, requests=10,
                            warmup=0)
    assert res["ok"] == 10, res["cause"]
    assert res["tunnel_rtt_ms"] is None
    assert any("per-worker tunnel RTT not read" in r.getMessage() and "admin" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_a_wrong_key_at_the_edge_is_a_401_with_the_edges_reason(edge: tuple[System, str]):
    s, url = edge
    res = await measure(url=url + "/", api_key="eik_not-a-real-key", ca=str(s.pki.ca), rate=20, duration=5,
                        warmup=0)
    assert res["ok"] == 0 and res["status_counts"].keys() == {"401"}
    assert "401 Unauthorized" in res["cause"] and "API key" in res["cause"] and "--api-key" in res["cause"]
    assert res["tunnel_rtt_ms"] is None


async def test_the_edges_rate_limit_shows_as_429s_beside_the_successes(edge: tuple[System, str]):
    s, url = edge
    # This key may do 5 requests/s with a burst of 5; offer 40/s for 2 s.
    res = await measure(url=url + "/", api_key=s.pki.limited_key, ca=str(s.pki.ca), rate=40, duration=2, warmup=0)
    assert res["requests"] == 80
    assert res["status_counts"].get("429", 0) >= 50
    assert 5 <= res["ok"] <= 25
    assert res["latency_ms"]["count"] == res["ok"]
    assert "429 Too Many Requests" in res["cause"] and "rate limit" in res["cause"]


async def test_a_run_failing_in_its_warm_up_reports_its_failures_first_never_0_errors(edge: tuple[System, str]):
    s, url = edge
    # Every request is a 401 and the run stops (fail-fast) inside its 1 s warm-up.
    res = await measure(url=url + "/", api_key="eik_not-a-real-key", ca=str(s.pki.ca), rate=13, duration=5,
                        warmup=1)
    n = res["requests"]
    assert n >= 10 and res["errors"] == n and res["ok"] == 0
    assert res["cause"].startswith(f"{n} of {n} failed: 401 Unauthorized") and "check --api-key" in res["cause"]
    assert res["counts_note"] and "warm-up" in res["counts_note"]


async def test_an_unknown_pool_names_the_pool_option_not_the_url(edge: tuple[System, str]):
    s, url = edge
    res = await measure(url=url + "/", api_key=s.pki.client_key, ca=str(s.pki.ca), pool="no-such-pool",
                        concurrency=1, requests=3, warmup=0)
    assert res["errors"] == 3 and res["error_codes"] == {"HTTP 404": "unknown_pool"}
    assert "check --pool (sent as X-Pool)" in res["cause"] and "--url" not in res["cause"]
