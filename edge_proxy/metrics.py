"""Prometheus metrics of the edge, on a registry of its own so that several
edges (tests) can live in one process."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .registry import RegistrySnapshot

TRIM_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def tasks_by_coroutine(tasks: set[asyncio.Task[object]]) -> dict[str, int]:
    """How many tasks run each coroutine, by qualified name. The names come
    from the code, not from requests, so the label set stays small."""
    counts: dict[str, int] = {}
    for t in tasks:
        coro = t.get_coro()
        name = getattr(coro, "__qualname__", None) or type(coro).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


M = TypeVar("M", Counter, Histogram)


class Children(Generic[M]):
    """A per-request metric's labelled children, kept by label values:
    prometheus_client's `labels()` validates and takes a lock on every call,
    a few microseconds per request for a lookup whose answer never changes.
    The label sets are as bounded as prometheus_client's own (which keeps
    every child it made anyway)."""

    __slots__ = ("metric", "_children")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Children(Counter("edge_requests", "Proxied requests by pool and status", ["pool", "status"],
                                         registry=r))
        self.duration = Children(Histogram("edge_request_duration_seconds", "Request received -> response finished",
                                  ["pool"], buckets=LATENCY_BUCKETS, registry=r))
        self.queue_wait = Children(Histogram("edge_queue_wait_seconds", "Wait for a worker slot (lb)", ["pool"],
                                    buckets=LATENCY_BUCKETS, registry=r))
        self.retries = Children(Counter("edge_retries", "Requests retried on another worker", ["pool"], registry=r))
        self.ejections = Counter("edge_ejections", "Workers ejected by outlier detection", ["pool"], registry=r)
        self.ejections_capped = Counter("edge_ejections_capped", "Ejections due by outlier detection that "
                                        "--max-ejection-percent (or the last available worker) prevented", ["pool"],
                                        registry=r)
        self.shed = Children(Counter("edge_upstream_shed", "Upstream answers saying busy (503 + Retry-After, 429): not "
                            "failures; handling = retried on another worker or returned to the client",
                            ["pool", "handling"], registry=r))
        self.effective_capacity = Gauge("edge_worker_effective_capacity", "Requests the edge lets in flight on a "
                                        "worker now: its capacity, lowered while it sheds load", ["worker", "pool"],
                                        registry=r)
        self.rejections = Children(Counter("edge_rejections", "Requests refused at the edge", ["reason"], registry=r))
        self.tunnel_refusals = Counter("edge_tunnel_refusals", "Agent handshakes refused (duplicate_id: another "
                                       "live agent process holds the id; version: no common protocol version)",
                                       ["reason"], registry=r)
        self.upload_aborts = Children(Counter("edge_upload_aborts", "Request bodies cut off by the client mid-upload",
                                     ["pool"], registry=r))
        self.worker_kind = Gauge("edge_worker_info", "One per worker, naming its kind: tunnel (an agent dialled in "
                                 "over WSS) or direct (the edge dials its URL, --direct)", ["worker", "pool", "kind"],
                                 registry=r)
        self.direct_connect_failures = Children(Counter(
            "edge_direct_connect_failures", "Connections to direct workers that could not be made (refused, "
            "unreachable, timed out): each request was tried on another worker", ["pool"], registry=r))
        self.tunnel_rtt = Gauge("edge_tunnel_rtt_seconds", "Smoothed tunnel RTT from heartbeats", ["worker", "pool"],
                                registry=r)
        self.workers = Gauge("edge_workers", "Connected workers by pool and health", ["pool", "state"], registry=r)
        self.outstanding = Gauge("edge_outstanding_requests", "Requests in flight to workers", ["pool"], registry=r)
        self.waiting = Gauge("edge_waiting_requests", "Requests queued for a worker slot", ["pool"], registry=r)
        self.tasks = Gauge("edge_asyncio_tasks", "asyncio tasks alive in the edge process (leak watch)", registry=r)
        self.tasks_by_coroutine = Gauge("edge_asyncio_tasks_by_coroutine",
                                        "asyncio tasks alive by the coroutine they run (leak watch: names the path "
                                        "that keeps them)", ["coroutine"], registry=r)
        self.ws_open = Gauge("edge_websockets_open", "Open client WebSockets by pool", ["pool"], registry=r)
        self.ws_messages = Counter("edge_websocket_messages", "WebSocket data messages relayed, by pool and direction "
                                   "(to_upstream, to_client)", ["pool", "direction"], registry=r)
        self.ws_bytes = Counter("edge_websocket_bytes", "WebSocket message payload bytes relayed, by pool and "
                                "direction", ["pool", "direction"], registry=r)
        self.ws_closes = Counter("edge_websocket_closes", "Closed WebSockets by pool and the first close code "
                                 "either side sent (1006: none)", ["pool", "code"], registry=r)
        self.tunnels = Gauge("edge_tunnels", "Open worker tunnels", registry=r)
        self.heap_trims = Histogram("edge_heap_trim_seconds", "Time the event loop spent returning freed heap pages "
                                    "to the system (malloc_trim)", buckets=TRIM_BUCKETS, registry=r)
        self.heap_trimmed = Counter("edge_heap_trim_released_bytes", "Resident memory returned to the system by "
                                    "malloc_trim", registry=r)
        self.heap_blocks = Gauge("edge_python_allocated_blocks",
                                 "Python objects' memory blocks in use (leak watch: RSS can grow from allocator "
                                 "high-water marks while this stays flat)", registry=r)

    def render(self, snap: RegistrySnapshot) -> bytes:
        """Refresh the gauges that describe current state, then serialise."""
        self.workers.clear()
        self.tunnel_rtt.clear()
        self.effective_capacity.clear()
        self.worker_kind.clear()
        states: dict[tuple[str, str], int] = {}
        outstanding: dict[str, int] = dict.fromkeys(snap.waiting, 0)
        for w in snap.workers:
            states[(w.pool, w.state)] = states.get((w.pool, w.state), 0) + 1
            outstanding[w.pool] = outstanding.get(w.pool, 0) + w.in_flight
            self.effective_capacity.labels(w.agent_id, w.pool).set(w.effective_capacity)
            self.worker_kind.labels(w.agent_id, w.pool, w.kind).set(1)
            if w.rtt is not None:
                self.tunnel_rtt.labels(w.agent_id, w.pool).set(w.rtt)
        for (pool, st), n in states.items():
            self.workers.labels(pool, st).set(n)
        for pool, n in outstanding.items():
            self.outstanding.labels(pool).set(n)
        for pool, n in snap.waiting.items():
            self.waiting.labels(pool).set(n)
        self.heap_blocks.set(sys.getallocatedblocks())
        tasks = asyncio.all_tasks()
        self.tasks.set(len(tasks))
        self.tasks_by_coroutine.clear()
        for name, n in tasks_by_coroutine(tasks).items():
            self.tasks_by_coroutine.labels(name).set(n)
        self.tunnels.set(sum(w.tunnels for w in snap.workers if w.kind == "tunnel"))
        return generate_latest(self.registry)
