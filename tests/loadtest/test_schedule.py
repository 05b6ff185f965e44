"""The open-loop schedule and pacer, driven by a hand-made clock."""

from __future__ import annotations

import itertools
import statistics

import pytest

from loadtest.schedule import SPIN_S, Pacer, arrival_offsets, wait_plan


def test_fixed_arrivals_are_evenly_spaced():
    assert list(itertools.islice(arrival_offsets(4.0), 5)) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_poisson_arrivals_have_the_mean_rate_and_are_reproducible():
    a = list(itertools.islice(arrival_offsets(100.0, "poisson", seed=7), 20001))
    b = list(itertools.islice(arrival_offsets(100.0, "poisson", seed=7), 20001))
    assert a == b
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert statistics.fmean(gaps) == pytest.approx(0.01, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.pstdev(gaps) == pytest.approx(0.01, rel=0.05)
    assert a != list(itertools.islice(arrival_offsets(100.0, "poisson", seed=8), 20001))


def test_bad_rate_or_arrivals_are_refused():
    with pytest.raises(ValueError):
        next(arrival_offsets(0.0))
    with pytest.raises(ValueError):
        next(arrival_offsets(1.0, "bursty"))


def test_pacer_releases_on_time_and_says_how_long_to_wait():
    p = Pacer(arrival_offsets(100.0), end=0.05)
    assert p.poll(0.0) == ([(0, 0.0)], pytest.approx(0.01))
    assert p.poll(0.004) == ([], pytest.approx(0.006))
    assert p.poll(0.010) == ([(1, 0.01)], pytest.approx(0.01))


def test_a_late_poll_releases_every_overdue_send_with_its_original_intended_time():
    # Coordinated-omission safety: a stall of the generator never moves the
    # schedule; the overdue requests go out at once, stamped with the times
    # they were due, so their wait is charged to their latency.
    p = Pacer(arrival_offsets(100.0), end=1.0)
    p.poll(0.0)
    due, wait = p.poll(0.0355)
    assert due == [(1, 0.01), (2, 0.02), (3, 0.03)]
    assert wait == pytest.approx(0.0045)


def test_pacer_ends_at_the_end_time():
    p = Pacer(arrival_offsets(10.0), end=0.3)
    due, wait = p.poll(5.0)
    assert [s for s, _ in due] == [0, 1, 2]
    assert wait is None and p.done and p.sent == 3


def test_pacer_counts_only_requests_after_the_warmup():
    # 2 warm-up requests (t < 0.2 s) plus 3 measured.
    p = Pacer(arrival_offsets(10.0), count=3, count_from=0.2)
    due, wait = p.poll(10.0)
    assert [t for _, t in due] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert wait is None


def test_pacer_needs_an_end():
    with pytest.raises(ValueError):
        Pacer(arrival_offsets(1.0))


def test_wait_plan_sleeps_until_just_before_the_send_then_yields():
    assert wait_plan(0.010) == pytest.approx(0.010 - SPIN_S)
    assert wait_plan(SPIN_S / 2) == 0.0
    assert wait_plan(0.0) == 0.0
