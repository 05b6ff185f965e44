"""Health state of one worker: active check thresholds, the agent's own
report, and passive outlier ejection (Envoy-style) with its per-pool cap, and
the jitter of active checks. Pure: time and randomness are passed in."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from runtime.settings import option

GROUP = "Health checks and outlier ejection"

# Each pause between two active checks of a tunnel is the interval plus a
# random 0-10 % of it, so that tunnels which connected together (an edge
# restart) drift apart instead of probing their workers in lockstep.
CHECK_JITTER = 0.10


def check_delay(interval: float, rng: random.Random) -> float:
    """The pause before the next active check: `interval` plus up to 10 %."""
    return interval * (1.0 + CHECK_JITTER * rng.random())


def parse_percent(value: str) -> float:
    p = float(value)
    if not 0 <= p <= 100:
        raise ValueError(f"expected a percentage from 0 to 100, got {value!r}")
    return p


def ejection_allowed(pool_size: int, ejected: int, others_available: int, max_percent: float) -> bool:
    """May outlier detection eject one more worker of a pool of `pool_size`
    of which `ejected` are ejected now and `others_available` (besides the
    candidate) can serve? At most `max_percent` of the pool at once, rounded
    down but always allowing one (Envoy's max_ejection_percent), and never the
    last available worker: a pool answering its upstream's errors is better
    than a pool answering 503 no_worker."""
    if others_available < 1:
        return False
    # The epsilon keeps 100 % of 3 workers at 3, not 2.9999.
    most = max(1, math.floor(pool_size * max_percent / 100.0 + 1e-9))
    return ejected < most


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Defaults follow Envoy's outlier detection, scaled to real-time traffic.

    - `unhealthy_threshold`: consecutive failed active checks -> unhealthy.
    - `healthy_threshold`: consecutive passed checks -> healthy again.
    - `consecutive_failures`: consecutive 5xx/timeouts of real traffic -> ejected.
    - `base_ejection_time`: first ejection length; the n-th lasts n times it,
      capped at `max_ejection_time`.
    - `max_ejection_percent`: at most this share of a pool is ejected at once
      (at least one worker; never the last available one).
    """

    check_interval: float = option(2.0, group=GROUP, help="seconds between active health checks of each worker")
    check_timeout: float = option(1.0, group=GROUP, help="seconds an active check may take")
    unhealthy_threshold: int = option(2, group=GROUP, help="failed checks in a row -> unhealthy")
    healthy_threshold: int = option(1, group=GROUP, help="passed checks in a row -> healthy")
    consecutive_failures: int = option(5, group=GROUP, help="5xx/timeouts in a row -> ejected")
    base_ejection_time: float = option(5.0, group=GROUP, help="first ejection in seconds (the n-th lasts n times it)")
    max_ejection_time: float = option(60.0, group=GROUP, help="longest ejection in seconds")
    max_ejection_percent: float = option(10.0, group=GROUP, parse=parse_percent,
                                         help="most workers of a pool ejected at once, in percent (always allows one; "
                                              "never the last available worker)")


@dataclass(slots=True)
class WorkerHealth:
    policy: HealthPolicy
    checks_healthy: bool = True  # active checks (optimistic until proven otherwise)
    agent_healthy: bool = True  # the agent's own report
    agent_detail: str = ""
    check_streak: int = 0  # >0 passes in a row, <0 failures in a row
    failure_streak: int = 0  # consecutive failed real requests
    ejected_until: float = 0.0
    times_ejected: int = 0
    ejections_capped: int = 0  # ejections the pool's cap prevented
    capped: bool = False  # failing on, kept in by the cap (until a success or an ejection)
    last_check: float | None = None
    last_check_error: str = ""

    def record_check(self, now: float, ok: bool, error: str = "") -> None:
        self.last_check = now
        self.last_check_error = "" if ok else error
        if ok:
            self.check_streak = self.check_streak + 1 if self.check_streak > 0 else 1
            if self.check_streak >= self.policy.healthy_threshold:
                self.checks_healthy = True
        else:
            self.check_streak = self.check_streak - 1 if self.check_streak < 0 else -1
            if -self.check_streak >= self.policy.unhealthy_threshold:
                self.checks_healthy = False

    def record_agent_report(self, healthy: bool, detail: str) -> None:
        self.agent_healthy = healthy
        self.agent_detail = detail
        if not healthy:
            # The agent knows first; make the checks prove recovery.
            self.checks_healthy = False
            self.check_streak = min(self.check_streak, 0)

    def record_response(self, now: float, ok: bool, may_eject: bool = True) -> bool:
        """Feed one real request's outcome; True if this ejected the worker.
        When the streak calls for an ejection that `may_eject` (the pool's
        cap) forbids, the worker stays in, `ejections_capped` counts it and
        the streak starts over. Load signals (overload.py) are not outcomes:
        they are never fed here."""
        if ok:
            self.failure_streak = 0
            self.capped = False
            return False
        self.failure_streak += 1
        if self.failure_streak >= self.policy.consecutive_failures and not self.is_ejected(now):
            if not may_eject:
                self.ejections_capped += 1
                self.capped = True
                self.failure_streak = 0
                return False
            self.capped = False
            self.times_ejected += 1
            duration = min(self.policy.base_ejection_time * self.times_ejected, self.policy.max_ejection_time)
            self.ejected_until = now + duration
            self.failure_streak = 0
            return True
        return False

    def is_ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def is_available(self, now: float) -> bool:
        return self.checks_healthy and self.agent_healthy and not self.is_ejected(now)

    def state(self, now: float) -> str:
        if self.is_ejected(now):
            return "ejected"
        if not self.agent_healthy:
            return "unhealthy (agent)"
        if not self.checks_healthy:
            return "unhealthy"
        return "healthy"
