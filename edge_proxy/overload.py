"""Load signals from upstreams and the concurrency the edge learns from them.

An upstream that answers `503` with `Retry-After`, or `429`, is busy, not
broken: it declared the request unprocessed. Such an answer never counts
towards outlier ejection (health.py); instead it lowers that worker's
effective capacity at this edge for a while (AIMD: halve on shedding, regain
linearly over time; in between, each refusal caps the limit below the load
the worker refused), so the edge queues the excess itself rather than sending
it to a worker that would refuse it. Pure: time is passed in."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from runtime.settings import option


def parse_seconds(value: str) -> float:
    s = float(value)
    if s < 0:
        raise ValueError(f"expected seconds (0 or more), got {value!r}")
    return s


def is_load_signal(status: int, headers: Iterable[tuple[str, str]]) -> bool:
    """True for an upstream answer that says "busy, try later": any 429, or a
    503 carrying Retry-After. A bare 503 stays a failure (a broken upstream or
    proxy says 503 too, without promising anything)."""
    if status == 429:
        return True
    return status == 503 and any(name.lower() == "retry-after" for name, _ in headers)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """How the effective capacity of a shedding worker moves.

    - `decrease_factor`: on shedding, the limit becomes this fraction of
      min(current limit, requests this edge had on the worker) (at least 1).
    - `decrease_interval`: at most one such decrease per this many seconds;
      the answers of one overloaded moment arrive together and are one
      signal. Every shed in between still caps the limit below the number of
      requests the worker refused to take on top of (it took fewer).
    - `recovery_time`: seconds to climb linearly from 0 to the advertised
      capacity again (capacity / recovery_time slots per second); 0 turns the
      adaptive limit off (shedding is then only retried, never remembered).
    """

    decrease_factor: float = 0.5
    decrease_interval: float = 0.5
    recovery_time: float = option(10.0, flag="--shed-recovery-time", env="EDGE_SHED_RECOVERY_TIME", parse=parse_seconds,
                                  group="Health checks and outlier ejection",
                                  help="seconds for a worker that shed load (503 with Retry-After, or 429) to regain "
                                       "its full capacity at this edge; 0 = never lower it")


@dataclass(slots=True)
class AdaptiveLimit:
    """The learned concurrency of one worker. The advertised capacity (which
    the agent may change) is passed in, never stored: the limit is the
    ceiling minus what shedding took away, recovering with time."""

    policy: LimitPolicy = field(default_factory=LimitPolicy)
    limit: float | None = None  # None: nothing learned, the advertised capacity applies
    updated: float = 0.0
    last_decrease: float | None = None
    sheds: int = 0  # load signals seen
    decreases: int = 0

    def value(self, now: float, capacity: int) -> float:
        """The limit at `now`, recovered since the last decrease, as a real number."""
        if self.limit is None or self.policy.recovery_time <= 0:
            return float(capacity)
        regained = max(0.0, now - self.updated) * capacity / self.policy.recovery_time
        return min(float(capacity), self.limit + regained)

    def effective(self, now: float, capacity: int) -> int:
        """Requests the edge may have in flight on the worker now: never above
        the advertised capacity, never below 1 (shedding alone never makes a
        worker unavailable; that is health's business)."""
        return max(1, min(capacity, math.floor(self.value(now, capacity) + 1e-9)))

    def limited(self, now: float, capacity: int) -> bool:
        return self.effective(now, capacity) < capacity

    def record_shed(self, now: float, capacity: int, in_flight: int) -> bool:
        """One load signal from the worker while this edge had `in_flight`
        requests on it (this one included). True if the limit went down."""
        self.sheds += 1
        if self.policy.recovery_time <= 0 or capacity <= 1:
            return False
        current = self.value(now, capacity)
        halve = self.last_decrease is None or now - self.last_decrease >= self.policy.decrease_interval
        if halve:
            new = min(current, float(in_flight)) * self.policy.decrease_factor
        else:
            # Same overloaded moment: no second halving, but with `in_flight`
            # requests on it the worker refused one, so it takes fewer.
            new = min(current, float(in_flight - 1))
        new = max(1.0, new)
        if new >= current:
            return False
        if halve:
            self.last_decrease = now
            self.decreases += 1
        self.limit = new
        self.updated = now
        return True
