"""Reconnect policy: a few quick retries, then capped exponential backoff
with full jitter, so that a thousand agents losing one edge do not all come
back in the same millisecond. Pure: the random source is passed in."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    quick_retries: int = 3  # first retries after `quick_delay`, to ride out a blip
    quick_delay: float = 0.1
    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    refused_floor: float = 2.0  # least wait after the edge refused us (see `next_delay`)

    def next_delay(self, refused: bool = False) -> float:
        """Seconds to wait before the next attempt; call after each failure.

        `refused`: the edge answered and said no (another process holds our
        id). Quick retries cannot change its mind, so they are skipped and the
        wait is at least `refused_floor`, growing like any other failure."""
        if refused:
            self.failures = max(self.failures, self.quick_retries)
        self.failures += 1
        if self.failures <= self.quick_retries:
            return self.rng.uniform(0, self.quick_delay)
        exp = self.failures - self.quick_retries - 1
        delay = self.rng.uniform(0, min(self.cap, self.base * (2**exp)))
        return max(delay, self.refused_floor) if refused else delay

    def reset(self) -> None:
        """A connection succeeded (and stayed up): start over."""
        self.failures = 0
