"""Health state of one worker: active check thresholds, the agent's own
report, and passive outlier ejection (Envoy-style). Pure: time is passed in."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.settings import option

GROUP = "Health checks and outlier ejection"


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Defaults follow Envoy's outlier detection, scaled to real-time traffic.

    - `unhealthy_threshold`: consecutive failed active checks -> unhealthy.
    - `healthy_threshold`: consecutive passed checks -> healthy again.
    - `consecutive_failures`: consecutive 5xx/timeouts of real traffic -> ejected.
    - `base_ejection_time`: first ejection length; the n-th lasts n times it,
      capped at `max_ejection_time`.
    """

    check_interval: float = option(2.0, group=GROUP, help="seconds between active health checks of each worker")
    check_timeout: float = option(1.0, group=GROUP, help="seconds an active check may take")
    unhealthy_threshold: int = option(2, group=GROUP, help="failed checks in a row -> unhealthy")
    healthy_threshold: int = option(1, group=GROUP, help="passed checks in a row -> healthy")
    consecutive_failures: int = option(5, group=GROUP, help="5xx/timeouts in a row -> ejected")
    base_ejection_time: float = option(5.0, group=GROUP, help="first ejection in seconds (the n-th lasts n times it)")
    max_ejection_time: float = option(60.0, group=GROUP, help="longest ejection in seconds")


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

    def record_response(self, now: float, ok: bool) -> bool:
        """Feed one real request's outcome; True if this ejected the worker."""
        if ok:
            self.failure_streak = 0
            return False
        self.failure_streak += 1
        if self.failure_streak >= self.policy.consecutive_failures and not self.is_ejected(now):
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
