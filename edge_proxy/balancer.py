"""Load-balancing policy: least outstanding requests relative to capacity,
power of two random choices, EWMA latency as tie-breaker. Pure. The capacity
is the effective one: the advertised capacity, lowered while the worker sheds
load (overload.AdaptiveLimit)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Candidate(Protocol):
    @property
    def in_flight(self) -> int: ...

    @property
    def effective_capacity(self) -> int: ...

    @property
    def ewma_latency(self) -> float: ...


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted moving average with time decay: each sample
    weighs `1 - exp(-dt/tau)`, so an idle worker's old figure fades."""

    tau: float = 10.0
    value: float = 0.0
    updated: float | None = None

    def add(self, now: float, sample: float) -> float:
        if self.updated is None:
            self.value = sample
        else:
            w = 1.0 - math.exp(-max(0.0, now - self.updated) / self.tau) if self.tau > 0 else 1.0
            # At least a little weight so bursts within one tick still count.
            w = max(w, 0.05)
            self.value += w * (sample - self.value)
        self.updated = now
        return self.value


T = TypeVar("T", bound=Candidate)

# EWMA figures closer than this are treated as equal, so that noise does not
# pin all low-concurrency traffic on one worker.
EWMA_TIE = 0.10


def _load(c: Candidate) -> float:
    return c.in_flight / c.effective_capacity


def _better(a: T, b: T, rng: random.Random) -> T:
    la, lb = _load(a), _load(b)
    if la != lb:
        return a if la < lb else b
    ea, eb = a.ewma_latency, b.ewma_latency
    if abs(ea - eb) > EWMA_TIE * max(ea, eb):
        return a if ea < eb else b
    return a if rng.random() < 0.5 else b


def choose(candidates: Sequence[T], rng: random.Random, choice_count: int = 2) -> T | None:
    """Pick a worker with free capacity: sample `choice_count` of them and take
    the least loaded (in_flight / effective capacity); on a tie the clearly faster one
    (EWMA latency), else either at random. None when every worker is full."""
    free = [c for c in candidates if c.in_flight < c.effective_capacity]
    if not free:
        return None
    picked = free if len(free) <= choice_count else rng.sample(free, choice_count)
    best = picked[0]
    for c in picked[1:]:
        best = _better(best, c, rng)
    return best
