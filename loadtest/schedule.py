"""Open-loop arrival schedules (fixed rate or Poisson) and the pacing policy
that releases each request at its intended send time.

Pure: the pacer is given the current time and answers what to send now and
how long to wait, so tests drive it with a hand-made clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

ARRIVALS = ("fixed", "poisson")


def arrival_offsets(rate: float, arrivals: str = "fixed", seed: int = 1) -> Iterator[float]:
    """Intended send times in seconds from the start, without end.

    fixed: i / rate. poisson: the first at 0, then exponential gaps of mean
    1/rate drawn from a seeded generator (the same seed gives the same run)."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    if arrivals == "fixed":
        i = 0
        while True:
            yield i / rate
            i += 1
    elif arrivals == "poisson":
        rng = random.Random(seed)
        t = 0.0
        while True:
            yield t
            t += rng.expovariate(rate)
    else:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")


class Pacer:
    """Releases requests at their intended send times.

    `poll(now)` returns every request whose intended time has come, each with
    its ORIGINAL intended time (a late release never shifts the schedule:
    that is what keeps latency coordinated-omission safe), and the seconds
    until the next one, or None once the schedule is exhausted.

    The schedule ends at the first intended time >= `end` (seconds), or after
    `count` requests intended at or after `count_from` (the warm-up's end),
    whichever comes first.
    """

    def __init__(self, offsets: Iterator[float], end: float | None = None, count: int | None = None,
                 count_from: float = 0.0) -> None:
        if end is None and count is None:
            raise ValueError("a schedule needs an end time or a count")
        self._offsets = offsets
        self._end = end
        self._count = count
        self._count_from = count_from
        self._counted = 0
        self._seq = 0
        self._next: float | None = None
        self._advance()

    def _advance(self) -> None:
        if self._count is not None and self._counted >= self._count:
            self._next = None
            return
        t = next(self._offsets)
        self._next = None if self._end is not None and t >= self._end else t
        if self._next is not None and t >= self._count_from:
            self._counted += 1

    @property
    def sent(self) -> int:
        return self._seq

    @property
    def done(self) -> bool:
        return self._next is None

    def poll(self, now: float) -> tuple[list[tuple[int, float]], float | None]:
        due: list[tuple[int, float]] = []
        while self._next is not None and self._next <= now:
            due.append((self._seq, self._next))
            self._seq += 1
            self._advance()
        return due, None if self._next is None else self._next - now


# How the asyncio driver waits: a timer sleep that ends SPIN_S before the
# intended time (epoll's timeout has a 1 ms granularity and rounds up), then
# zero-length yields to the event loop until the time has come. The loop
# keeps serving I/O during those yields, so the spin costs CPU, not latency.
SPIN_S = 0.0012


def wait_plan(wait: float, spin: float = SPIN_S) -> float:
    """Seconds to sleep on a timer before the next release, given `wait`
    seconds until it: 0 means yield once and poll again."""
    return wait - spin if wait > spin else 0.0
