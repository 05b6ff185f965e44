"""The capacity search (pure): how many real-time streams a system sustains."""

from __future__ import annotations

import time

perf = time.perf_counter



# -- the capacity search (pure) --------------------------------------------------------


class CapacitySearch:
    """How many real-time streams a system sustains.

    Steps: `start`, then doubling (1, 2, 4, 8, ...) while each step passes,
    up to `max_streams`; after the first failing step, bisection between the
    last passing and the first failing count, until they are adjacent. A step
    passes when its miss ratio (deadline misses plus drops, over frames sent)
    is at most `threshold`. The answer, `sustained`, is the largest passing
    count below the smallest failing one (None if even `start` fails): exact
    as long as more streams never do better."""

    def __init__(self, threshold: float = 0.01, max_streams: int = 64, start: int = 1) -> None:
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
        if start < 1 or max_streams < start:
            raise ValueError(f"need 1 <= start <= max_streams, got {start}, {max_streams}")
        self.threshold = threshold
        self.max_streams = max_streams
        self.start = start
        self.steps: list[tuple[int, float, bool]] = []  # (streams, miss ratio, passed)
        self._good: int | None = None  # largest passing count so far
        self._bad: int | None = None  # smallest failing count so far

    def next_streams(self) -> int | None:
        """The next number of streams to run, or None when the search is done."""
        if not self.steps:
            return self.start
        if self._good is None:  # even the first step failed
            return None
        if self._bad is None:  # still doubling
            return None if self._good >= self.max_streams else min(self._good * 2, self.max_streams)
        if self._bad - self._good <= 1:
            return None
        return (self._good + self._bad) // 2

    def record(self, streams: int, miss_ratio: float) -> bool:
        """The result of one step; whether it passed."""
        ok = miss_ratio <= self.threshold
        self.steps.append((streams, miss_ratio, ok))
        if ok:
            self._good = max(streams, self._good or 0)
        else:
            self._bad = streams if self._bad is None else min(streams, self._bad)
        if self._good is not None and self._bad is not None and self._good > self._bad:
            # Noise: a larger count passed after a smaller one failed. Trust the failure.
            self._good = max((s for s, _, passed in self.steps if passed and s < self._bad), default=None)
        return ok

    @property
    def sustained(self) -> int | None:
        return self._good

    @property
    def failed_at(self) -> int | None:
        return self._bad


# -- the run -----------------------------------------------------------------------------
