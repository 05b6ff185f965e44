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


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """What to do after the edge refused our credentials once more."""

    attempt: int  # consecutive refusals so far, this one included
    delay: float  # seconds before the next attempt
    log: bool  # say so in the log (attempts 1, 2, 4, 8, ...: ever less often)
    give_up: bool  # --max-auth-failures reached: stop the agent


@dataclass(slots=True)
class AuthFailures:
    """Consecutive refusals of the worker token by one edge (HTTP 401).

    A wrong token does not fix itself, so retrying quickly only fills logs and
    the edge's failure counter: the wait doubles from `base` up to `cap` (with
    jitter, half to all of it), attempts are logged at 1, 2, 4, 8, ... and,
    when `max_failures` > 0, the agent gives up at that many. Any other outcome
    of a connection attempt calls `reset`. Pure: the random source is passed in."""

    max_failures: int = 0  # 0 = never give up
    base: float = 1.0
    cap: float = 60.0  # an edge whose token file gets fixed is retried at least this often
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def record(self) -> AuthVerdict:
        self.attempts += 1
        n = self.attempts
        full = min(self.cap, self.base * 2 ** min(n - 1, 32))
        return AuthVerdict(n, self.rng.uniform(full / 2, full), n & (n - 1) == 0,
                           self.max_failures > 0 and n >= self.max_failures)

    def reset(self) -> None:
        self.attempts = 0
