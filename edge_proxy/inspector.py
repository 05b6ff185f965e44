"""What the inspector (/_edge/) shows that the registry does not keep: the
recent requests (a bounded ring, `--inspector-requests`), per-pool rolling
statistics (edge_proxy/rolling.py) and the open WebSockets with their
message rates. Plain data, no I/O; times are passed in.

Privacy: a record holds no body, no header value, no query string (the path
is kept, the query dropped: `query` says there was one) and names the client
key by its NAME only. See docs/operations.md, "The inspector"."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

from httpcontract.timing import parse as parse_server_timing

from .rolling import RateWindow, RollingStats, WindowStats

# request[...] keys set by the handlers for the recorder
WORKER: web.RequestKey[str] = web.RequestKey("edge_worker", str)  # the worker that answered (proxy.py, websocket.py)
KEY_NAME: web.RequestKey[str] = web.RequestKey("edge_key_name", str)  # the NAME of the client key (middleware.authenticate)

PATH_LIMIT = 256  # longer paths are cut (the record says so with a trailing "...")
TIMING_LIMIT = 2048  # characters of Server-Timing kept (a worker could send any length)
DEFAULT_LIMIT = 200  # records per query answer


@dataclass(frozen=True, slots=True)
class RequestRecord:
    seq: int  # increasing: clients ask for records after the last one they saw
    at: float  # wall-clock time it finished (for display only)
    request_id: str
    method: str
    path: str  # without the query string
    query: bool  # the request had a query string (dropped)
    pool: str  # the pool label: a known pool or "_unknown"
    worker: str  # "" when no worker was reached
    status: int
    duration_ms: float
    key: str  # the client key's name
    server_timing: str  # the response's Server-Timing, as sent: parsed only when someone looks
    websocket: bool

    def timing(self) -> list[tuple[str, float]]:
        """(entry, ms) in header order."""
        return list(parse_server_timing([self.server_timing]).items()) if self.server_timing else []

    def as_json(self) -> dict[str, object]:
        return {"seq": self.seq, "at": self.at, "request_id": self.request_id, "method": self.method,
                "path": self.path, "query": self.query, "pool": self.pool, "worker": self.worker,
                "status": self.status, "duration_ms": round(self.duration_ms, 3), "key": self.key,
                "timing": [[n, round(v, 3)] for n, v in self.timing()], "websocket": self.websocket}


def status_matches(status: int, wanted: str) -> bool:
    """`wanted`: "" (any), an exact status ("503"), a class ("5xx"), or "errors" (400 and up)."""
    w = wanted.strip().lower()
    if not w:
        return True
    if w == "errors":
        return status >= 400
    if len(w) == 3 and w.endswith("xx") and w[0].isdigit():
        return status // 100 == int(w[0])
    return w.isdigit() and status == int(w)


def strip_query(raw_path: str) -> tuple[str, bool]:
    path, sep, _ = raw_path.partition("?")
    if len(path) > PATH_LIMIT:
        path = path[:PATH_LIMIT] + "..."
    return path, bool(sep)


class RecentRequests:
    """The last `capacity` finished requests, oldest dropped first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 (0 turns the recorder off upstream of this class)")
        self._ring: deque[RequestRecord] = deque(maxlen=capacity)
        self._seq = 0

    @property
    def capacity(self) -> int:
        return self._ring.maxlen or 0

    @property
    def last_seq(self) -> int:
        return self._seq

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self._ring)

    def add(self, at: float, request_id: str, method: str, path: str, query: bool, pool: str, worker: str,
            status: int, duration_ms: float, key: str, server_timing: str, websocket: bool) -> RequestRecord:
        self._seq += 1
        rec = RequestRecord(self._seq, at, request_id, method, path, query, pool, worker, status, duration_ms, key,
                            server_timing, websocket)
        self._ring.append(rec)
        return rec

    def query(self, status: str = "", pool: str = "", worker: str = "", after: int = 0,
              limit: int = DEFAULT_LIMIT) -> list[RequestRecord]:
        """Newest first, at most `limit`, only those with seq > `after`."""
        out: list[RequestRecord] = []
        for rec in reversed(self._ring):
            if rec.seq <= after or len(out) >= limit:
                break
            if (pool and rec.pool != pool) or (worker and rec.worker != worker) or not status_matches(rec.status,
                                                                                                      status):
                continue
            out.append(rec)
        return out

    def find(self, request_id: str) -> RequestRecord | None:
        for rec in reversed(self._ring):
            if rec.request_id == request_id:
                return rec
        return None


@dataclass(eq=False)
class LiveSocket:
    """One open client WebSocket, as the inspector lists it."""

    request_id: str
    pool: str
    worker: str
    path: str
    key: str
    opened_at: float  # wall clock
    opened: float  # monotonic
    to_upstream: RateWindow
    to_client: RateWindow

    def as_json(self, now: float, wall: float) -> dict[str, object]:
        return {"request_id": self.request_id, "pool": self.pool, "worker": self.worker, "path": self.path,
                "key": self.key, "open_s": round(wall - self.opened_at, 1),
                "to_upstream": {"total": self.to_upstream.total, "rate": round(self.to_upstream.rate(now), 2)},
                "to_client": {"total": self.to_client.total, "rate": round(self.to_client.rate(now), 2)}}


@dataclass(eq=False)
class Inspector:
    """The inspector's own records, one per edge. `capacity` 0: no recent
    requests kept (statistics and sockets still are)."""

    capacity: int
    started: float  # monotonic
    recent: RecentRequests | None = None
    pools: dict[str, RollingStats] = field(default_factory=dict)
    sockets: dict[str, LiveSocket] = field(default_factory=dict)  # request id -> socket

    def __post_init__(self) -> None:
        if self.capacity > 0:
            self.recent = RecentRequests(self.capacity)

    def record(self, now: float, wall: float, *, request_id: str, method: str, raw_path: str, pool: str,
               worker: str, status: int, duration: float, key: str, server_timing: str, websocket: bool) -> None:
        stats = self.pools.get(pool)
        if stats is None:
            stats = self.pools[pool] = RollingStats(self.started)
        stats.record(now, status, None if websocket and status == 101 else duration)
        if self.recent is not None:
            path, query = strip_query(raw_path)
            self.recent.add(wall, request_id, method, path, query, pool, worker, status, duration * 1000, key,
                            server_timing[:TIMING_LIMIT], websocket)

    def windows(self, pool: str, now: float) -> tuple[WindowStats, WindowStats] | None:
        stats = self.pools.get(pool)
        if stats is None:
            return None
        return stats.last_minute(now), stats.last_hour(now)

    def socket_opened(self, now: float, wall: float, request_id: str, pool: str, worker: str, raw_path: str,
                      key: str) -> LiveSocket:
        s = LiveSocket(request_id, pool, worker, strip_query(raw_path)[0], key, wall, now, RateWindow(now),
                       RateWindow(now))
        self.sockets[request_id] = s
        return s

    def socket_closed(self, request_id: str) -> None:
        self.sockets.pop(request_id, None)
