"""Token-bucket rate limiting, keyed (per client key, per address). Pure:
time is passed in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second, at most `burst` stored."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 if allowed, else the seconds to wait before retrying."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else float("inf")


class RateLimiter:
    """One bucket per key; idle full buckets are dropped so memory stays
    bounded by the number of recently active keys (at most `max_keys`)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key: str, now: float, rate: float | None = None, burst: float | None = None) -> float:
        r = self.rate if rate is None else rate
        b = self.burst if burst is None else burst
        if r <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = self._buckets[key] = TokenBucket(r, b, b, now)
        return bucket.take(now)

    def _evict(self, now: float) -> None:
        full = [k for k, bk in self._buckets.items() if bk.tokens + (now - bk.updated) * bk.rate >= bk.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:  # all busy: drop the oldest
            oldest = min(self._buckets, key=lambda k: self._buckets[k].updated)
            del self._buckets[oldest]

    def __len__(self) -> int:
        return len(self._buckets)
