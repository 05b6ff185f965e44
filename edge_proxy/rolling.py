"""Rolling request statistics for the inspector: counts by status class,
rates and latency percentiles over the last minute and the last hour, in
bounded memory. Pure: every call takes the time (monotonic seconds).

The minute is 60 one-second buckets, the hour 60 one-minute buckets; a
bucket is reused (cleared) when its slot comes round again. Latencies go
into fixed histogram buckets growing by 25 % from 0.1 ms (`BOUNDS`), so a
percentile is accurate to within one bucket and merging windows is a sum."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

GROWTH = 1.25
BOUNDS: tuple[float, ...] = tuple(0.0001 * GROWTH**i for i in range(72))  # 0.1 ms .. ~1.0e3 s, upper bounds
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    """"2xx" for 204; statuses outside 100-599 count as 5xx (the edge's own failures)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "5xx"


@dataclass(slots=True)
class _Bucket:
    index: int = -1  # which second (or minute) since the clock's zero it holds
    classes: dict[str, int] = field(default_factory=dict)
    hist: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    timed: int = 0  # requests with a latency sample (not WebSocket sessions)
    low: float = math.inf
    high: float = 0.0

    def reset(self, index: int) -> None:
        self.index = index
        self.classes.clear()
        self.hist = [0] * (len(BOUNDS) + 1)
        self.timed = 0
        self.low, self.high = math.inf, 0.0


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One window: `covered_s` is the time it really spans (shorter while
    the edge is younger than the window), rates are per second of it."""

    span_s: float
    covered_s: float
    count: int
    by_class: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None

    @property
    def rate(self) -> float:
        return self.count / self.covered_s if self.covered_s > 0 else 0.0

    def rates(self) -> dict[str, float]:
        return {c: (n / self.covered_s if self.covered_s > 0 else 0.0) for c, n in self.by_class.items()}

    def as_json(self) -> dict[str, object]:
        return {"span_s": self.span_s, "covered_s": round(self.covered_s, 3), "count": self.count,
                "by_class": self.by_class, "rate_rps": round(self.rate, 3),
                "rates_rps": {c: round(r, 3) for c, r in self.rates().items()},
                "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 3),
                "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 3)}


class _Ring:
    def __init__(self, slots: int, width: float) -> None:
        self.width = width
        self.buckets = [_Bucket() for _ in range(slots)]

    def bucket(self, now: float) -> _Bucket:
        index = math.floor(now / self.width)
        b = self.buckets[index % len(self.buckets)]
        if b.index != index:
            b.reset(index)
        return b

    def current(self, now: float) -> tuple[int, list[_Bucket]]:
        """The index of `now`'s bucket and every bucket still inside the window."""
        index = math.floor(now / self.width)
        oldest = index - len(self.buckets) + 1
        return index, [b for b in self.buckets if oldest <= b.index <= index]


class RollingStats:
    """Requests of one pool over the last minute and the last hour.

    `started`: when counting began (the edge's start), so that a young edge's
    rates are per second it has been up, not per full window."""

    MINUTE = 60.0
    HOUR = 3600.0

    def __init__(self, started: float, seconds: int = 60, minutes: int = 60) -> None:
        self.started = started
        self._seconds = _Ring(seconds, 1.0)
        self._minutes = _Ring(minutes, 60.0)

    def record(self, now: float, status: int, duration: float | None) -> None:
        """One finished request; `duration` None: no latency sample (a
        WebSocket session's length says nothing about latency)."""
        cls = status_class(status)
        for ring in (self._seconds, self._minutes):
            b = ring.bucket(now)
            b.classes[cls] = b.classes.get(cls, 0) + 1
            if duration is not None:
                b.hist[bisect.bisect_left(BOUNDS, duration)] += 1
                b.timed += 1
                b.low = min(b.low, duration)
                b.high = max(b.high, duration)

    def last_minute(self, now: float) -> WindowStats:
        return self._window(self._seconds, now)

    def last_hour(self, now: float) -> WindowStats:
        return self._window(self._minutes, now)

    def _window(self, ring: _Ring, now: float) -> WindowStats:
        index, buckets = ring.current(now)
        span = ring.width * len(ring.buckets)
        window_start = (index - len(ring.buckets) + 1) * ring.width
        covered = max(0.0, now - max(self.started, window_start))
        by_class = {c: 0 for c in CLASSES}
        hist = [0] * (len(BOUNDS) + 1)
        timed = 0
        low, high = math.inf, 0.0
        for b in buckets:
            for c, n in b.classes.items():
                by_class[c] += n
            if b.timed:
                for i, n in enumerate(b.hist):
                    hist[i] += n
                timed += b.timed
                low, high = min(low, b.low), max(high, b.high)
        count = sum(by_class.values())
        p50 = percentile(hist, timed, 0.50, low, high)
        p99 = percentile(hist, timed, 0.99, low, high)
        return WindowStats(span, covered, count, by_class,
                           None if p50 is None else p50 * 1000, None if p99 is None else p99 * 1000)


def percentile(hist: list[int], total: int, q: float, low: float, high: float) -> float | None:
    """The q-quantile (seconds) of a histogram over `BOUNDS`, interpolated
    linearly inside its bucket and kept within the observed [low, high]."""
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            lo = BOUNDS[i - 1] if i > 0 else 0.0
            hi = BOUNDS[i] if i < len(BOUNDS) else high
            value = lo + (hi - lo) * max(0.0, rank - seen) / n
            return min(max(value, low), high)
        seen += n
    return high


class RateWindow:
    """Events per second over the last `span` seconds (one-second buckets),
    e.g. a WebSocket's messages. Pure: `now` is passed in."""

    def __init__(self, started: float, span: int = 10) -> None:
        self.started = started
        self.span = span
        self._counts = [0] * span
        self._index = [-1] * span
        self.total = 0

    def add(self, now: float, n: int = 1) -> None:
        index = math.floor(now)
        slot = index % self.span
        if self._index[slot] != index:
            self._index[slot], self._counts[slot] = index, 0
        self._counts[slot] += n
        self.total += n

    def rate(self, now: float) -> float:
        index = math.floor(now)
        oldest = index - self.span + 1
        count = sum(c for c, i in zip(self._counts, self._index, strict=True) if oldest <= i <= index)
        # At least one second: a socket opened 10 ms ago with one message is not at 100/s.
        covered = max(1.0, now - max(self.started, float(oldest)))
        return count / covered
