"""Pure overload policies of the edge, driven with a fake clock: load signals,
the adaptive limit learned from shedding, the ejection cap, check jitter."""

from __future__ import annotations

import random

import pytest

from edge_proxy.health import (
    CHECK_JITTER,
    HealthPolicy,
    WorkerHealth,
    check_delay,
    ejection_allowed,
)
from edge_proxy.overload import AdaptiveLimit, LimitPolicy, is_load_signal
from edge_proxy.registry import Lease, Registry, Worker


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    accepting = True
    open_streams = 0
    rtt = None


@pytest.mark.parametrize(
    "status,headers,busy",
    [
        (503, [("Retry-After", "1")], True),
        (503, [("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")], True),
        (503, [("Content-Type", "text/plain")], False),  # a bare 503: a failure like any 5xx
        (429, [], True),  # any 429
        (429, [("Retry-After", "3")], True),
        (500, [("Retry-After", "1")], False),
        (502, [], False),
        (200, [("Retry-After", "1")], False),
    ],
)
def test_load_signals_are_503_with_retry_after_and_any_429(status, headers, busy):
    assert is_load_signal(status, headers) is busy


# ------------------------------------------------------------------ adaptive limit

P = LimitPolicy(decrease_factor=0.5, decrease_interval=0.5, recovery_time=10.0)


@pytest.mark.parametrize(
    "events,at,expected",
    [
        # (time, in flight) of each shed; the effective capacity of an 8-slot worker at `at`
        ([], 0.0, 8),  # nothing learned
        ([(0.0, 8)], 0.0, 4),  # halved
        ([(0.0, 8), (0.1, 8), (0.4, 8)], 0.4, 4),  # one overloaded moment is one halving
        ([(0.0, 8), (0.1, 4)], 0.1, 3),  # ... but a refusal with 4 in flight says it takes at most 3
        ([(0.0, 8), (0.1, 4), (0.2, 3), (0.3, 2)], 0.3, 1),
        ([(0.0, 8), (0.6, 4)], 0.6, 2),  # a later signal halves again (4 -> 2, -0.6 s of recovery rounded down)
        ([(0.0, 8), (0.6, 4), (1.2, 2), (1.8, 2)], 1.8, 1),  # never below one slot
        ([(0.0, 3)], 0.0, 1),  # only 3 of ours were in flight: 3 * 0.5 -> 1
        ([(0.0, 8)], 2.5, 6),  # regains 8 / 10 s = 0.8 slot per second: 4 + 2.0 -> 6
        ([(0.0, 8)], 5.0, 8),  # back to full after (8 - 4) / 0.8 = 5 s
        ([(0.0, 8)], 600.0, 8),  # and never above the capacity
    ],
)
def test_adaptive_limit_halves_on_shedding_and_regains_over_time(events, at, expected):
    lim = AdaptiveLimit(P)
    for t, in_flight in events:
        lim.record_shed(t, 8, in_flight)
    assert lim.effective(at, 8) == expected
    assert lim.sheds == len(events)


def test_adaptive_limit_follows_a_changed_capacity_and_can_be_turned_off():
    lim = AdaptiveLimit(P)
    assert lim.record_shed(0.0, 8, 8)
    assert lim.effective(0.0, 8) == 4
    assert lim.effective(0.0, 2) == 2  # the agent now advertises 2: never above it
    assert lim.effective(100.0, 16) == 16  # recovered towards the new ceiling
    off = AdaptiveLimit(LimitPolicy(recovery_time=0))
    assert not off.record_shed(0.0, 8, 8)
    assert off.effective(0.0, 8) == 8 and off.sheds == 1
    one = AdaptiveLimit(P)
    assert not one.record_shed(0.0, 1, 1) and one.effective(0.0, 1) == 1


# ------------------------------------------------------------------- ejection cap

@pytest.mark.parametrize(
    "pool_size,ejected,others_available,percent,allowed",
    [
        (3, 0, 2, 10.0, True),  # 10 % of 3 rounds down to 0: one is always allowed
        (3, 1, 1, 10.0, False),  # ... but only one
        (20, 1, 18, 10.0, True),  # 10 % of 20 = 2
        (20, 2, 17, 10.0, False),
        (10, 0, 9, 0.0, True),  # even 0 % allows one, as Envoy does
        (3, 1, 1, 100.0, True),
        (3, 2, 0, 100.0, False),  # never the last available worker
        (1, 0, 0, 100.0, False),  # a pool of one never loses its worker to outlier detection
        (2, 0, 0, 50.0, False),  # the other one is unhealthy or disconnected: this one stays
    ],
)
def test_ejection_cap_table(pool_size, ejected, others_available, percent, allowed):
    assert ejection_allowed(pool_size, ejected, others_available, percent) is allowed


def test_a_capped_worker_stays_in_and_starts_its_streak_over():
    h = WorkerHealth(HealthPolicy(consecutive_failures=3))
    assert not h.record_response(0, False, may_eject=False)
    assert not h.record_response(0, False, may_eject=False)
    assert not h.record_response(0, False, may_eject=False)  # due, but the cap says no
    assert h.is_available(0) and h.ejections_capped == 1 and h.capped and h.failure_streak == 0
    h.record_response(1, True)
    assert not h.capped
    for _ in range(3):
        ejected = h.record_response(2, False, may_eject=True)
    assert ejected and h.is_ejected(2) and h.times_ejected == 1


def _pool(reg: Registry, n: int, capacity: int = 4) -> list[Worker]:
    return [reg.attach(FakeSession(), f"w{i}", "p", capacity, "0", "t")[0]  # type: ignore[arg-type]
            for i in range(n)]


def _acquired(reg: Registry, w: Worker) -> Lease:
    """A slot on this very worker (the balancer would pick either)."""
    w.in_flight += 1
    return Lease(w, reg)


def _fail(reg: Registry, w: Worker, times: int) -> None:
    for _ in range(times):
        _acquired(reg, w).release(False, 0.01)


def test_registry_ejects_at_most_the_cap_and_the_next_one_after_the_first_returns():
    clock = FakeClock()
    ejected: list[str] = []
    capped: list[tuple[str, bool]] = []
    reg = Registry(HealthPolicy(consecutive_failures=3, base_ejection_time=10, max_ejection_percent=10), clock=clock,
                   on_ejection=lambda w: ejected.append(w.agent_id),
                   on_ejection_capped=lambda w, first: capped.append((w.agent_id, first)))
    w0, w1, w2 = _pool(reg, 3)
    for w in (w0, w1, w2):
        _fail(reg, w, 3)
    assert ejected == ["w0"]
    assert capped == [("w1", True), ("w2", True)]
    _fail(reg, w1, 3)  # still failing: counted again, logged once per spell
    assert capped[-1] == ("w1", False) and w1.health.ejections_capped == 2
    assert w1.available(clock.now) and w2.available(clock.now)
    clock.now = 10.0  # w0's ejection is over: room for one ejection again
    _fail(reg, w2, 3)
    assert ejected == ["w0", "w2"] and not w2.available(10.0)


def test_registry_never_ejects_the_last_available_worker():
    clock = FakeClock()
    reg = Registry(HealthPolicy(consecutive_failures=2, max_ejection_percent=100), clock=clock)
    a, b = _pool(reg, 2)
    _fail(reg, a, 2)
    assert a.health.is_ejected(0)
    _fail(reg, b, 10)
    assert b.available(0) and b.health.times_ejected == 0 and b.health.ejections_capped == 5
    solo = Registry(HealthPolicy(consecutive_failures=2), clock=clock)
    (only,) = _pool(solo, 1)
    _fail(solo, only, 10)
    assert only.available(0)


def test_shedding_neither_ejects_nor_resets_a_failure_streak_and_lowers_the_slots():
    clock = FakeClock()
    limited: list[str] = []
    reg = Registry(HealthPolicy(consecutive_failures=3), clock=clock,
                   limit_policy=LimitPolicy(decrease_factor=0.5, decrease_interval=0.5, recovery_time=10.0),
                   on_limited=lambda w: limited.append(w.agent_id))
    busy, other = _pool(reg, 2, capacity=4)
    leases = [reg.try_acquire("p", exclude=other) for _ in range(4)]
    assert all(lease is not None and lease.worker is busy for lease in leases)
    leases[0].release(None, None, shed=True)  # with 4 in flight: halved to 2
    for lease in leases[1:]:
        lease.release(True, 0.01)
    for _ in range(50):  # however many "busy" answers: never an ejection, never an error
        _acquired(reg, busy).release(None, None, shed=True)
    assert busy.shed == 51 and busy.served == 3 and busy.errors == 0 and busy.health.times_ejected == 0
    assert busy.limit.effective(0, 4) == 1 and limited == ["w0"]  # one refusal with 1 in flight: 1 slot
    clock.now = 1.25  # 1 + 1.25 s * 4 / 10 s = 1.5: still one
    assert busy.limit.effective(clock.now, 4) == 1
    clock.now = 2.5  # 2 slots
    # Only 2 requests now go to it; the third waits for a slot.
    got = [reg.try_acquire("p", exclude=other) for _ in range(3)]
    assert [g is not None for g in got] == [True, True, False]
    for g in got:
        if g is not None:
            g.release(True, 0.01)
    # A failure streak survives the shedding in between.
    _fail(reg, busy, 2)
    _acquired(reg, busy).release(None, None, shed=True)
    _fail(reg, busy, 1)
    assert busy.health.is_ejected(clock.now)
    clock.now = 10.0  # 1 + 7.5 s * 4 / 10 s: 4 slots again
    assert busy.limit.effective(clock.now, 4) == 4


def test_balancer_counts_load_against_the_effective_capacity():
    clock = FakeClock()
    reg = Registry(clock=clock, rng=random.Random(5))
    shedder, steady = _pool(reg, 2, capacity=8)
    shedder.limit.record_shed(0.0, 8, 8)  # 4 effective slots
    for _ in range(6):
        assert reg.try_acquire("p") is not None
    # 6 requests: 2 of 4 on the shedder (50 %) and 4 of 8 on the other (50 %):
    # both equally loaded relative to what each can take now.
    assert (shedder.in_flight, steady.in_flight) == (2, 4)


# ------------------------------------------------------------------- check jitter

def test_check_delay_adds_up_to_ten_percent_and_spreads_tunnels_apart():
    rng = random.Random(7)
    delays = [check_delay(2.0, rng) for _ in range(500)]
    assert all(2.0 <= d < 2.0 * (1 + CHECK_JITTER) for d in delays)
    assert max(delays) - min(delays) > 0.18  # spread over (nearly) the whole 0-10 %
    assert check_delay(2.0, random.Random(7)) == delays[0]  # deterministic for a seed
    # 300 tunnels that connected together: after 10 checks each, no 10 ms
    # window holds more than a handful of the next probes.
    starts = []
    for i in range(300):
        r = random.Random(i)
        starts.append(sum(check_delay(2.0, r) for _ in range(10)))
    per_window: dict[int, int] = {}
    for s in starts:
        per_window[int(s * 100)] = per_window.get(int(s * 100), 0) + 1
    assert max(per_window.values()) <= 12, sorted(per_window.values())[-5:]
