"""The agent's "which processes of an edge do I hold" policy (worker_agent/coverage.py):
plain calls with a fake clock and a seeded random source."""

from __future__ import annotations

import random

from worker_agent.coverage import EdgeCoverage


def test_one_process_edge_keeps_every_tunnel_and_never_reports():
    cov = EdgeCoverage(per_process=2)
    assert cov.claim(0, 0, 1) and cov.claim(1, 0, 1)
    assert cov.missing() == [] and cov.wanted == 2
    assert cov.report(0.0) == "processes 1/1"  # (the agent logs these only when the edge has N > 1)
    assert cov.report(1.0) is None


def test_two_processes_duplicate_is_refused_and_the_missing_index_named():
    cov = EdgeCoverage(per_process=1)
    assert cov.claim(0, 0, 2)  # first tunnel: process 0 of 2
    assert cov.wanted == 2 and cov.missing() == [1]
    assert cov.report(10.0) == "processes 1/2 (missing 1)"
    assert not cov.claim(1, 0, 2)  # slot 1 landed on process 0 too: a duplicate
    assert cov.duplicate_delay(1) == 0.0  # dial again at once
    assert cov.claim(1, 1, 2)
    assert cov.missing() == []
    assert cov.report(12.5) == "processes 2/2 (complete after 2.5 s)"
    assert cov.report(13.0) is None  # nothing changed


def test_after_a_drop_only_the_missing_index_is_taken_back():
    cov = EdgeCoverage(per_process=1)
    cov.claim(0, 0, 2)
    cov.claim(1, 1, 2)
    cov.report(0.0)
    cov.release(1)  # process 1 died with its tunnel
    assert cov.missing() == [1]
    assert cov.report(5.0) == "processes 1/2 (missing 1)"
    assert not cov.claim(1, 0, 2)  # the re-dial landed on the process still held
    assert cov.claim(1, 1, 2)  # the restarted process 1
    assert cov.report(8.0) == "processes 2/2 (complete after 3.0 s)"


def test_tunnels_per_edge_counts_per_process():
    cov = EdgeCoverage(per_process=2)
    assert cov.claim(0, 1, 2) and cov.claim(1, 1, 2)
    assert not cov.claim(2, 1, 2)  # process 1 has its two
    assert cov.missing() == [0]
    assert cov.claim(2, 0, 2) and cov.claim(3, 0, 2)
    assert cov.missing() == [] and cov.wanted == 4


def test_a_reconnecting_slot_does_not_count_twice():
    cov = EdgeCoverage(per_process=1)
    assert cov.claim(0, 0, 2)
    assert cov.claim(0, 1, 2)  # slot 0 came back on process 1: it left process 0
    assert cov.missing() == [0]


def test_many_duplicates_in_a_row_back_off_with_a_cap_and_a_success_resets():
    cov = EdgeCoverage(per_process=1, rng=random.Random(7))
    cov.claim(0, 0, 2)
    delays = []
    for _ in range(30):
        assert not cov.claim(1, 0, 2)  # e.g. process 1 is being restarted: everything lands on 0
        d = cov.duplicate_delay(1)
        assert d is not None
        delays.append(d)
    assert delays[:8] == [0.0] * 8  # 4 x N quick re-dials
    assert any(d > 0 for d in delays[8:]) and max(delays) <= cov.cap
    assert cov.claim(1, 1, 2)
    cov.release(1)
    assert not cov.claim(1, 0, 2)
    assert cov.duplicate_delay(1) == 0.0  # the streak started over


def test_fewer_processes_after_an_edge_restart_stop_the_extra_slots():
    cov = EdgeCoverage(per_process=1)
    for slot, proc in ((0, 0), (1, 1), (2, 2)):
        assert cov.claim(slot, proc, 3)
    for slot in (0, 1, 2):
        cov.release(slot)  # the edge restarted ...
    assert cov.claim(0, 0, 2) and cov.claim(1, 1, 2)  # ... with 2 processes
    assert not cov.claim(2, 0, 2)
    assert cov.duplicate_delay(2) is None  # slot 2 is not wanted any more: it stops
    assert cov.duplicate_delay(1) is not None
