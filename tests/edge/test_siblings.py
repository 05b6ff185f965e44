"""The merged picture of several edge processes (edge_proxy/siblings.py,
edge_proxy/metrics.py): plain data in, plain data out."""

from __future__ import annotations

from typing import Any

from edge_proxy.metrics import EdgeMetrics
from edge_proxy.siblings import merge_workers


def worker(**over: Any) -> dict[str, Any]:
    w = {"id": "w1", "instance": "abc", "pool": "default", "capacity": 4, "announced_capacity": 8,
         "effective_capacity": 4, "in_flight": 1, "served": 10, "errors": 1, "shed": 0, "health": "healthy",
         "health_detail": "", "health_path": "/healthz", "available": True,
         "agent_report": {"healthy": True, "detail": ""}, "last_check_error": "", "ejections": 0,
         "ejections_capped": 0, "ewma_latency_ms": 1.0, "tunnel_rtt_ms": 0.5, "tunnels": ["0"], "software": "x",
         "labels": {}, "connected_for_s": 5.0, "check_age_s": 1.0}
    w.update(over)
    return w


def test_one_worker_seen_by_two_processes_is_one_entry_with_sums_and_the_freshest_health():
    snaps = [
        {"process": 0, "pid": 100, "workers": [worker(check_age_s=3.0, health="unhealthy",
                                                       health_detail="active check failed", tunnel_rtt_ms=0.9)]},
        {"process": 1, "pid": 101, "workers": [worker(tunnels=["1"], in_flight=2, served=5, check_age_s=0.2,
                                                       connected_for_s=9.0)]},
        {"process": 2, "pid": 102, "workers": [worker(id="w2", tunnels=["0"])]},
    ]
    merged = {w["id"]: w for w in merge_workers(snaps)}
    w1 = merged["w1"]
    assert w1["capacity"] == 8  # what the agent announced, not a process's share
    assert (w1["in_flight"], w1["served"], w1["errors"], w1["effective_capacity"]) == (3, 15, 2, 8)
    assert w1["health"] == "healthy" and w1["health_detail"] == ""  # process 1 checked last
    assert w1["tunnel_rtt_ms"] == 0.5 and w1["connected_for_s"] == 9.0
    assert w1["tunnels"] == ["0/0", "1/1"]
    assert set(w1["processes"]) == {"0", "1"}
    assert w1["processes"]["1"] == {"tunnels": ["1"], "in_flight": 2, "served": 5, "capacity": 4,
                                    "health": "healthy", "available": True, "pid": 101}
    assert "check_age_s" not in w1 and "announced_capacity" not in w1
    assert set(merged["w2"]["processes"]) == {"2"}


def test_merged_metrics_count_each_worker_once_and_name_missing_processes():
    snaps = [
        {"process": 0, "pid": 1, "workers": [worker()], "waiting": {"default": 2}, "tunnels": 1,
         "tasks": {"a": 3}, "heap_blocks": 10, "requests": 7},
        {"process": 1, "pid": 2, "workers": [worker(tunnels=["1"])], "waiting": {"default": 1}, "tunnels": 1,
         "tasks": {"a": 2, "b": 1}, "heap_blocks": 20, "requests": 12},
    ]
    text = EdgeMetrics(multiprocess=True).render_merged(snaps, merge_workers(snaps), 3, [2]).decode()
    assert 'edge_workers{pool="default",state="healthy"} 1.0' in text
    assert 'edge_outstanding_requests{pool="default"} 2.0' in text
    assert 'edge_waiting_requests{pool="default"} 3.0' in text
    assert "edge_tunnels 2.0" in text and "edge_asyncio_tasks 6.0" in text
    assert 'edge_worker_effective_capacity{pool="default",worker="w1"} 8.0' in text
    assert 'edge_processes{state="missing"} 1.0' in text
    assert 'edge_process_requests{process="0"} 7.0' in text and 'edge_process_requests{process="1"} 12.0' in text


def test_a_process_counts_its_own_requests_for_its_siblings():
    m = EdgeMetrics()
    assert m.requests_total() == 0
    m.requests.labels("p", "200").inc()
    m.requests.labels("p", "503").inc(2)
    assert m.requests_total() == 3


async def test_one_process_metrics_keep_their_gauges():
    m = EdgeMetrics()
    from edge_proxy.registry import RegistrySnapshot, WorkerSnapshot

    text = m.render(RegistrySnapshot((WorkerSnapshot("w1", "p", "healthy", 0.001, 2, 1, 4),), {"p": 0})).decode()
    for line in ('edge_workers{pool="p",state="healthy"} 1.0', 'edge_outstanding_requests{pool="p"} 2.0',
                 "edge_tunnels 1.0", 'edge_worker_effective_capacity{pool="p",worker="w1"} 4.0'):
        assert line in text
    assert "edge_processes" not in text
