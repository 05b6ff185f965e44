"""Pure policies of the edge and agent, driven with a fake clock."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from edge_proxy import auth
from edge_proxy.balancer import Ewma, choose
from edge_proxy.health import HealthPolicy, WorkerHealth
from edge_proxy.ratelimit import RateLimiter, TokenBucket
from edge_proxy.registry import NoWorkerAvailable, Registry
from edge_proxy.routing import normalized_path
from runtime.cli import StartupError
from worker_agent.backoff import Backoff


@dataclass
class W:
    name: str
    in_flight: int = 0
    capacity: int = 1
    ewma_latency: float = 0.0

    @property
    def effective_capacity(self) -> int:
        return self.capacity


def test_choose_prefers_lower_load_relative_to_capacity():
    rng = random.Random(1)
    small = W("small", in_flight=1, capacity=2)  # 50 %
    big = W("big", in_flight=2, capacity=8)  # 25 %
    assert choose([small, big], rng) is big


def test_choose_never_exceeds_capacity_and_returns_none_when_full():
    rng = random.Random(2)
    a, b = W("a", 1, 1), W("b", 3, 3)
    assert choose([a, b], rng) is None
    c = W("c", 0, 1)
    for _ in range(50):
        assert choose([a, b, c], rng) is c


def test_choose_breaks_ties_on_clearly_lower_ewma_only():
    rng = random.Random(3)
    fast, slow = W("fast", ewma_latency=0.010), W("slow", ewma_latency=0.050)
    assert all(choose([fast, slow], rng) is fast for _ in range(20))
    near = W("near", ewma_latency=0.0105)
    picks = {choose([fast, near], rng).name for _ in range(100)}
    assert picks == {"fast", "near"}  # within 10 %: no pinning


def test_power_of_two_spreads_load_over_many_workers():
    rng = random.Random(4)
    ws = [W(str(i), capacity=100) for i in range(10)]
    for _ in range(500):
        choose(ws, rng).in_flight += 1
    loads = [w.in_flight for w in ws]
    assert max(loads) - min(loads) <= 3


def test_ewma_moves_towards_recent_samples_with_time():
    e = Ewma(tau=10.0)
    e.add(0.0, 0.100)
    e.add(30.0, 0.010)  # long after: mostly the new sample
    assert e.value < 0.02
    e.add(30.001, 1.0)  # an instant later: a small step only
    assert e.value < 0.1


def test_active_checks_thresholds():
    h = WorkerHealth(HealthPolicy(unhealthy_threshold=2, healthy_threshold=2))
    h.record_check(0, False)
    assert h.is_available(0)
    h.record_check(1, False)
    assert not h.is_available(1)
    h.record_check(2, True)
    assert not h.is_available(2)
    h.record_check(3, True)
    assert h.is_available(3)


def test_agent_report_takes_effect_at_once_and_checks_restore():
    h = WorkerHealth(HealthPolicy(healthy_threshold=1))
    h.record_agent_report(False, "upstream refused")
    assert not h.is_available(0) and h.state(0) == "unhealthy (agent)"
    h.record_agent_report(True, "")
    assert not h.is_available(0)  # the active check must confirm
    h.record_check(1, True)
    assert h.is_available(1)


@pytest.mark.parametrize(
    "ejection,expected_len",
    [(1, 5.0), (2, 10.0), (3, 15.0), (20, 60.0)],
)
def test_outlier_ejection_grows_per_repeat_and_is_capped(ejection, expected_len):
    h = WorkerHealth(HealthPolicy(consecutive_failures=3, base_ejection_time=5, max_ejection_time=60))
    now = 0.0
    for _ in range(ejection):
        ejected = False
        for _ in range(3):
            ejected = h.record_response(now, ok=False)
        assert ejected
        length = h.ejected_until - now
        assert not h.is_available(now) and h.is_available(now + length)
        now += length
    assert length == expected_len


def test_success_resets_the_failure_streak():
    h = WorkerHealth(HealthPolicy(consecutive_failures=3))
    for _ in range(10):
        h.record_response(0, False)
        h.record_response(0, False)
        assert not h.record_response(0, True)
    assert h.is_available(0)


def test_token_bucket_allows_burst_then_rate_and_says_when_to_retry():
    b = TokenBucket(rate=2.0, burst=3.0, tokens=3.0, updated=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(0.0)
    assert wait == pytest.approx(0.5)
    assert b.take(0.5) == 0.0


def test_rate_limiter_keys_are_independent_and_memory_bounded():
    rl = RateLimiter(rate=1.0, burst=1.0, max_keys=100)
    assert rl.check("a", 0.0) == 0.0
    assert rl.check("a", 0.0) > 0
    assert rl.check("b", 0.0) == 0.0
    for i in range(1000):
        rl.check(f"k{i}", 100.0 + i)
    assert len(rl) <= 100
    assert rl.check("x", 0.0, rate=0) == 0.0  # a per-key rate of 0 means unlimited


def test_backoff_quick_then_exponential_with_full_jitter_capped():
    b = Backoff(quick_retries=2, quick_delay=0.1, base=1.0, cap=8.0, rng=random.Random(5))
    delays = [b.next_delay() for _ in range(12)]
    assert all(d <= 0.1 for d in delays[:2])
    bounds = [1, 2, 4, 8, 8, 8, 8, 8, 8, 8]
    assert all(0 <= d <= hi for d, hi in zip(delays[2:], bounds, strict=True))
    assert max(delays) > 1.0  # it does grow
    b.reset()
    assert b.next_delay() <= 0.1


def test_credentials_are_stored_hashed_and_verified(tmp_path):
    f = tmp_path / "keys.json"
    secret = auth.create(f, "alice", auth.CLIENT_KEY_PREFIX)
    assert secret not in f.read_text()
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    store = auth.CredentialStore.load(f)
    assert store.verify(secret).name == "alice"
    assert store.verify(secret + "x") is None
    assert store.verify("") is None
    with pytest.raises(StartupError, match="already exists"):
        auth.create(f, "alice", auth.CLIENT_KEY_PREFIX)
    assert auth.presented_key("Bearer abc", None) == "abc"
    assert auth.presented_key(None, "k") == "k"
    assert auth.presented_key("Basic abc", None) is None


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("/_edge/workers", "/_edge/workers"),
        ("//_edge/workers", "/_edge/workers"),
        ("/%5F_edge/", "/__edge/"),
        ("/%5Fedge/workers", "/_edge/workers"),
        ("/a/../_edge/metrics?x=1", "/_edge/metrics"),
        ("/photo", "/photo"),
        ("/", "/"),
    ],
)
def test_normalized_path_sees_through_spellings(raw, expected):
    assert normalized_path(raw) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    accepting = True
    open_streams = 0
    rtt = None


async def test_admission_waits_fifo_and_times_out_with_retry_after():
    reg = Registry(max_queue=2, clock=FakeClock())
    w, _ = reg.attach(FakeSession(), "w", "p", 1, "0", "t")  # type: ignore[arg-type]
    first = await reg.acquire("p", 1.0)
    order = []

    async def waiter(name: str) -> None:
        lease = await reg.acquire("p", 5.0)
        order.append(name)
        lease.release(True, 0.01)

    t1 = asyncio.create_task(waiter("one"))
    await asyncio.sleep(0)
    t2 = asyncio.create_task(waiter("two"))
    await asyncio.sleep(0)
    with pytest.raises(NoWorkerAvailable):  # queue of 2 is full
        await reg.acquire("p", 5.0)
    first.release(True, 0.01)
    await asyncio.gather(t1, t2)
    assert order == ["one", "two"]
    assert w.in_flight == 0
    held = await reg.acquire("p", 1.0)
    with pytest.raises(NoWorkerAvailable) as info:
        await reg.acquire("p", 0.05)
    assert info.value.retry_after >= 1
    held.release()
    assert w.in_flight == 0


async def test_admission_fails_fast_when_no_worker_is_healthy():
    clock = FakeClock()
    reg = Registry(clock=clock)
    w, _ = reg.attach(FakeSession(), "w", "p", 1, "0", "t")  # type: ignore[arg-type]
    w.health.record_agent_report(False, "down")
    with pytest.raises(NoWorkerAvailable, match="no healthy worker"):
        await reg.acquire("p", 10.0)


async def test_reattach_with_same_id_replaces_the_stale_session():
    reg = Registry(clock=FakeClock())
    old, new = FakeSession(), FakeSession()
    w1, stale1 = reg.attach(old, "w", "p", 2, "0", "t")  # type: ignore[arg-type]
    w2, stale2 = reg.attach(new, "w", "p", 2, "0", "t")  # type: ignore[arg-type]
    assert w1 is w2 and stale1 is None and stale2 is old
    reg.detach(w1, "0", old)  # the stale session's late cleanup must not remove the new one
    assert "w" in reg.workers
    reg.detach(w1, "0", new)
    assert "w" not in reg.workers


def test_same_instance_reconnects_another_live_instance_is_refused():
    reg = Registry(clock=FakeClock())
    first = FakeSession()
    w, _ = reg.attach(first, "w", "p", 2, "0", "t", instance="aaaaaaaa")  # type: ignore[arg-type]
    # The same process, reconnecting (also on a reused tunnel index): admitted, replaces.
    assert reg.clash("w", "aaaaaaaa", "t") is None
    # Another process with the same id, while the first has a live tunnel: refused.
    assert reg.clash("w", "bbbbbbbb", "t") == "another worker process already uses it"
    # Another credential: refused whatever the instance.
    assert reg.clash("w", "aaaaaaaa", "other") == "agent id is in use by another credential"
    # Agents too old to send an instance keep the old rule.
    assert reg.clash("w", "", "t") is None
    # The first is draining (no tunnel accepting): the newcomer is admitted as
    # a worker of its own; the draining one finishes alone and its late
    # detach does not remove the newcomer.
    first.accepting = False
    assert reg.clash("w", "bbbbbbbb", "t") is None
    w2, stale = reg.attach(FakeSession(), "w", "p", 2, "0", "t", instance="bbbbbbbb")  # type: ignore[arg-type]
    assert w2 is not w and stale is None and reg.workers["w"] is w2
    reg.detach(w, "0", first)  # type: ignore[arg-type]
    assert reg.workers["w"] is w2 and reg.pools["p"].workers == [w2]


def test_backoff_after_a_refusal_skips_quick_retries_and_waits_at_least_the_floor():
    b = Backoff(quick_retries=3, quick_delay=0.1, base=0.5, cap=30.0, refused_floor=2.0, rng=random.Random(1))
    delays = [b.next_delay(refused=True) for _ in range(8)]
    assert all(d >= 2.0 for d in delays)
    assert all(d <= max(2.0, hi) for d, hi in zip(delays, [0.5, 1, 2, 4, 8, 16, 30, 30], strict=True))
    assert max(delays) > 4.0  # and it grows


# --------------------------------------------------------------- a refused worker token (worker_agent/backoff.py)
@pytest.mark.parametrize(("max_failures", "attempts", "gives_up_at"), [(0, 40, None), (3, 3, 3), (1, 1, 1)])
def test_refused_token_waits_double_to_a_cap_logs_ever_less_often_and_gives_up_at_the_limit(
        max_failures: int, attempts: int, gives_up_at: int | None) -> None:
    from worker_agent.backoff import AuthFailures

    policy = AuthFailures(max_failures, base=1.0, cap=60.0, rng=random.Random(7))
    verdicts = [policy.record() for _ in range(attempts)]
    for v in verdicts:
        full = min(60.0, 2.0 ** (v.attempt - 1))
        assert full / 2 <= v.delay <= full  # jittered, never above the doubling nor the cap
    assert [v.attempt for v in verdicts if v.log] == [n for n in (1, 2, 4, 8, 16, 32) if n <= attempts]
    assert [v.attempt for v in verdicts if v.give_up] == ([] if gives_up_at is None else [gives_up_at])
    policy.reset()
    assert policy.record().attempt == 1
