"""Issue 15 end to end: `loadtest stream` as a real process, through a real
edge (TLS) and tunnel and agent, to the real inference server with its default
model. Frames are answered with labels and matched by seq; the 101's
Server-Timing hops reach the JSON; the drop policy of the query string
works through the edge under a burst."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Pki, System, make_pki, wait_for

from .conftest import loadtest

CAT_CLASSES = {"tabby", "tiger_cat", "Egyptian_cat", "Persian_cat", "Siamese_cat", "lynx"}
COFFEE_CLASSES = {"espresso", "cup", "coffee_mug"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture
async def edge(pki: Pki, model_cache: Path, tmp_path: Path) -> AsyncIterator[tuple[System, str]]:
    """edge + agent (pool `vision`) + inference server; the edge's https:// URL."""
    s = System(pki, tmp_path)
    try:
        _, infer = await s.inference(cache_dir=model_cache)
        _, url = await s.edge()
        s.agent("w1", url, infer, "--heartbeat-interval", "0.2", pool="vision", capacity=4)
        await s.wait_available(url, ["w1"])

        async def rtt_known() -> bool:
            return (await s.workers(url))["w1"].get("tunnel_rtt_ms") is not None

        await wait_for(rtt_known, 15, "the edge to measure the tunnel RTT")
        yield s, url
    finally:
        await s.close()


def run_stream(s: System, url: str, out: Path, *args: str) -> dict[str, Any]:
    r = loadtest("stream", "--url", url, "--api-key", s.pki.client_key, "--ca", str(s.pki.ca), "--json", str(out),
                 *args, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + s.logs()
    data: dict[str, Any] = json.loads(out.read_text())
    return data


async def test_frames_through_the_edge_are_answered_with_labels_and_the_upgrade_hops(edge: tuple[System, str],
                                                                                     tmp_path: Path) -> None:
    s, url = edge
    wss = url.replace("https://", "wss://") + "/pools/vision/stream"
    res = run_stream(s, wss, tmp_path / "run.json", "--fps", "10", "--duration", "3")
    assert res["streams_connected"] == 1 and res["cause"] is None, res["cause"]
    assert res["frames_sent"] == 30
    # Every frame answered by its own seq: nothing unmatched, nothing dropped.
    assert res["frames_answered"] == 30 and res["unmatched_answers"] == 0, res
    assert res["frames_dropped"] == 0 and res["frames_errors"] == 0
    # The samples (a cat, a coffee, an astronaut) cycled: the model's labels came back.
    labels = res["labels"]
    assert sum(labels.values()) == 30
    assert labels.keys() & CAT_CLASSES and labels.keys() & COFFEE_CLASSES, labels
    # Each answer's server phases were read.
    for phase in ("decode", "preprocess", "queue", "infer", "postprocess"):
        assert res["server_timing_ms"][phase]["count"] == 30, phase
    # The 101 carried the hops of the timing contract through the edge.
    st = res["streams"][0]
    assert st["upgrade_status"] == 101 and st["subprotocol"] == "inference.v1"
    hops = st["upgrade_hops_ms"]
    for hop in ("lb", "tunnel", "edge", "agent", "upstream", "tunnel_rtt", "net_edge_worker"):
        assert hop in hops and hops[hop] >= 0, (hop, hops)
    assert hops["agent"] <= hops["tunnel"] <= hops["edge"]
    assert res["upgrade_hops_ms"]["net_edge_worker"]["count"] == 1
    assert res["tunnel_rtt_ms"] and res["tunnel_rtt_ms"]["w1"] >= 0
    # Per frame through the edge: latency measured from the scheduled send.
    assert 0 < res["latency_ms"]["p50"] < 1000 and res["jitter_ms"]["rfc3550"] is not None


async def test_drop_latest_under_a_burst_through_the_edge(edge: tuple[System, str], tmp_path: Path) -> None:
    """200 fps is far more than one CPU model keeps up with: with ?drop=latest
    the server skips stale frames and says so, every frame is accounted for,
    and the answers stay fresh; ?drop=none reaches the server too (no drops)."""
    s, url = edge
    wss = url.replace("https://", "wss://") + "/pools/vision/stream"
    res = run_stream(s, wss + "?drop=latest", tmp_path / "latest.json", "--fps", "200", "--duration", "2")
    assert res["cause"] is None, res["cause"]
    sent = res["frames_sent"]
    assert sent == 400
    assert res["dropped_by_server"] > 0, res
    assert res["frames_answered"] > 0 and sum(res["labels"].values()) == res["frames_answered"]
    assert res["frames_answered"] + res["dropped_by_server"] == sent, res  # all answered, by their seq
    assert res["unanswered"] == 0 and res["unmatched_answers"] == 0 and res["frames_errors"] == 0
    # Fresh answers: never a backlog of seconds (the newest frame is always the next one processed).
    assert res["latency_ms"]["p50"] < 500, res["latency_ms"]

    res = run_stream(s, wss + "?drop=none", tmp_path / "none.json", "--fps", "200", "--frames", "60")
    assert res["frames_sent"] == 60 and res["dropped_by_server"] == 0, res
    assert res["frames_answered"] + res["unanswered"] == 60 and res["unmatched_answers"] == 0


async def test_a_refused_upgrade_through_the_edge_says_why(edge: tuple[System, str], tmp_path: Path) -> None:
    """?model= names a model the server does not run: the server refuses the
    upgrade with 404 before it, the edge relays the status, and loadtest
    prints the server's own reason (asked again as a plain GET)."""
    s, url = edge
    wss = url.replace("https://", "wss://") + "/pools/vision/stream?model=no-such-model"
    r = loadtest("stream", "--url", wss, "--api-key", s.pki.client_key, "--ca", str(s.pki.ca), "--fps", "10",
                 "--frames", "3", "--json", str(tmp_path / "refused.json"), timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads((tmp_path / "refused.json").read_text())
    assert res["streams_connected"] == 0 and res["streams"][0]["upgrade_status"] == 404
    assert "HTTP 404" in res["cause"] and "no-such-model" in res["cause"] and "not loaded" in res["cause"], res["cause"]
