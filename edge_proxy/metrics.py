"""Prometheus metrics of the edge, on a registry of its own so that several
edges (tests) can live in one process.

With `--processes N` (N > 1) each process runs in prometheus_client's
multiprocess mode (its supervisor sets PROMETHEUS_MULTIPROC_DIR before
prometheus_client is imported): counters and histograms go to one mmap file
per process and a scrape of any process sums them (a dead process's counts
stay); `edge_websockets_open` is kept live per process and summed over the
live ones (`livesum`). The gauges that describe current state (workers,
tunnels, RTT, in flight...) are not kept in files, whose series could not be
removed when a worker leaves: they are computed at each scrape from the
merged snapshots of every process (siblings.py), like /_edge/workers."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


# Help texts of the state gauges, shared by the one-process gauges and the merged collector.
HELP = {
    "edge_worker_effective_capacity": "Requests the edge lets in flight on a worker now: its capacity, lowered while "
                                      "it sheds load",
    "edge_tunnel_rtt_seconds": "Smoothed tunnel RTT from heartbeats",
    "edge_workers": "Connected workers by pool and health",
    "edge_outstanding_requests": "Requests in flight to workers",
    "edge_waiting_requests": "Requests queued for a worker slot",
    "edge_asyncio_tasks": "asyncio tasks alive in the edge process (leak watch)",
    "edge_asyncio_tasks_by_coroutine": "asyncio tasks alive by the coroutine they run (leak watch: names the path "
                                       "that keeps them)",
    "edge_tunnels": "Open worker tunnels",
    "edge_worker_info": "One per worker, naming its kind: tunnel (an agent dialled in over WSS) or direct (the edge "
                        "dials its URL, --direct)",
    "edge_python_allocated_blocks": "Python objects' memory blocks in use (leak watch: RSS can grow from allocator "
                                    "high-water marks while this stays flat)",
}


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, when this process is one of several."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class EdgeMetrics:
    def __init__(self, multiprocess: bool = False) -> None:
        """`multiprocess`: one of the processes of `--processes N` (see the
        module's docstring): the state gauges are made at scrape time."""
        self.multiprocess = multiprocess
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
        self.rejections = Children(Counter("edge_rejections", "Requests refused at the edge", ["reason"], registry=r))
        self.tunnel_refusals = Counter("edge_tunnel_refusals", "Agent handshakes refused (duplicate_id: another "
                                       "live agent process holds the id; version: no common protocol version)",
                                       ["reason"], registry=r)
        self.upload_aborts = Children(Counter("edge_upload_aborts", "Request bodies cut off by the client mid-upload",
                                     ["pool"], registry=r))
        self.direct_connect_failures = Children(Counter(
            "edge_direct_connect_failures", "Connections to direct workers that could not be made (refused, "
            "unreachable, timed out): each request was tried on another worker", ["pool"], registry=r))
        self.ws_open = Gauge("edge_websockets_open", "Open client WebSockets by pool", ["pool"], registry=r,
                             multiprocess_mode="livesum")
        self.ws_messages = Counter("edge_websocket_messages", "WebSocket data messages relayed, by pool and direction "
                                   "(to_upstream, to_client)", ["pool", "direction"], registry=r)
        self.ws_bytes = Counter("edge_websocket_bytes", "WebSocket message payload bytes relayed, by pool and "
                                "direction", ["pool", "direction"], registry=r)
        self.ws_closes = Counter("edge_websocket_closes", "Closed WebSockets by pool and the first close code "
                                 "either side sent (1006: none)", ["pool", "code"], registry=r)
        self.heap_trims = Histogram("edge_heap_trim_seconds", "Time the event loop spent returning freed heap pages "
                                    "to the system (malloc_trim)", buckets=TRIM_BUCKETS, registry=r)
        self.heap_trimmed = Counter("edge_heap_trim_released_bytes", "Resident memory returned to the system by "
                                    "malloc_trim", registry=r)
        if multiprocess:
            return
        # The state gauges, refreshed by `render` (one process only: see the docstring).
        self.effective_capacity = Gauge("edge_worker_effective_capacity", HELP["edge_worker_effective_capacity"],
                                        ["worker", "pool"], registry=r)
        self.tunnel_rtt = Gauge("edge_tunnel_rtt_seconds", HELP["edge_tunnel_rtt_seconds"], ["worker", "pool"],
                                registry=r)
        self.workers = Gauge("edge_workers", HELP["edge_workers"], ["pool", "state"], registry=r)
        self.outstanding = Gauge("edge_outstanding_requests", HELP["edge_outstanding_requests"], ["pool"], registry=r)
        self.waiting = Gauge("edge_waiting_requests", HELP["edge_waiting_requests"], ["pool"], registry=r)
        self.tasks = Gauge("edge_asyncio_tasks", HELP["edge_asyncio_tasks"], registry=r)
        self.tasks_by_coroutine = Gauge("edge_asyncio_tasks_by_coroutine", HELP["edge_asyncio_tasks_by_coroutine"],
                                        ["coroutine"], registry=r)
        self.tunnels = Gauge("edge_tunnels", HELP["edge_tunnels"], registry=r)
        self.worker_kind = Gauge("edge_worker_info", HELP["edge_worker_info"], ["worker", "pool", "kind"], registry=r)
        self.heap_blocks = Gauge("edge_python_allocated_blocks", HELP["edge_python_allocated_blocks"], registry=r)

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

    def requests_total(self) -> float:
        """Requests this process has counted in `edge_requests` (any pool and status)."""
        return sum(sample.value for family in self.requests.metric.collect() for sample in family.samples
                   if sample.name.endswith("_total"))

    def render_merged(self, snaps: list[dict[str, Any]], workers: list[dict[str, Any]], processes: int,
                      missing: list[int]) -> bytes:
        """Every process's counters and histograms (multiprocess files) and the
        state gauges of the merged snapshots (siblings.py)."""
        from prometheus_client import multiprocess

        path = multiprocess_dir()
        reg = CollectorRegistry()
        reg.register(MergedState(snaps, workers, processes, missing))
        if path is None:  # started by hand without the supervisor: this process's counts only
            return generate_latest(self.registry) + generate_latest(reg)
        multiprocess.MultiProcessCollector(reg, path)  # type: ignore[no-untyped-call]
        return generate_latest(reg)


class MergedState(Collector):
    """The state gauges of several edge processes, from their snapshots."""

    def __init__(self, snaps: list[dict[str, Any]], workers: list[dict[str, Any]], processes: int,
                 missing: list[int]) -> None:
        self.snaps, self.merged, self.processes, self.missing = snaps, workers, processes, missing

    def collect(self) -> Iterator[Metric]:
        def family(name: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, HELP[name], labels=list(labels))

        cap, rtt = family("edge_worker_effective_capacity", ("worker", "pool")), family("edge_tunnel_rtt_seconds",
                                                                                          ("worker", "pool"))
        info = family("edge_worker_info", ("worker", "pool", "kind"))
        states: dict[tuple[str, str], int] = {}
        outstanding: dict[str, float] = {}
        waiting: dict[str, float] = {}
        for s in self.snaps:
            for pool, n in s.get("waiting", {}).items():
                waiting[pool] = waiting.get(pool, 0) + n
                outstanding.setdefault(pool, 0)
        for w in self.merged:
            cap.add_metric([w["id"], w["pool"]], w["effective_capacity"])
            info.add_metric([w["id"], w["pool"], w.get("kind", "tunnel")], 1)
            if w.get("tunnel_rtt_ms") is not None:
                rtt.add_metric([w["id"], w["pool"]], w["tunnel_rtt_ms"] / 1000)
            states[(w["pool"], w["health"])] = states.get((w["pool"], w["health"]), 0) + 1
            outstanding[w["pool"]] = outstanding.get(w["pool"], 0) + w["in_flight"]
        yield cap
        yield rtt
        yield info
        fam = family("edge_workers", ("pool", "state"))
        for (pool, st), n in states.items():
            fam.add_metric([pool, st], n)
        yield fam
        for name, values in (("edge_outstanding_requests", outstanding), ("edge_waiting_requests", waiting)):
            fam = family(name, ("pool",))
            for pool, n in values.items():
                fam.add_metric([pool], n)
            yield fam
        tasks: dict[str, int] = {}
        for s in self.snaps:
            for coro, n in s.get("tasks", {}).items():
                tasks[coro] = tasks.get(coro, 0) + n
        yield GaugeMetricFamily("edge_asyncio_tasks", HELP["edge_asyncio_tasks"], value=sum(tasks.values()))
        fam = family("edge_asyncio_tasks_by_coroutine", ("coroutine",))
        for coro, n in tasks.items():
            fam.add_metric([coro], n)
        yield fam
        yield GaugeMetricFamily("edge_tunnels", HELP["edge_tunnels"], value=sum(s.get("tunnels", 0) for s in self.snaps))
        yield GaugeMetricFamily("edge_python_allocated_blocks", HELP["edge_python_allocated_blocks"],
                                value=sum(s.get("heap_blocks", 0) for s in self.snaps))
        procs = GaugeMetricFamily("edge_processes", "Edge processes of --processes N by whether they answered this "
                                  "scrape (missing: restarting or stuck)", labels=["state"])
        procs.add_metric(["answered"], len(self.snaps))
        procs.add_metric(["missing"], len(self.missing))
        yield procs
        requests = GaugeMetricFamily("edge_process_requests", "Requests proxied by each edge process since it "
                                     "started, any status (shows how the kernel spreads connections)",
                                     labels=["process"])
        for s in self.snaps:
            requests.add_metric([str(s.get("process", 0))], s.get("requests", 0))
        yield requests
