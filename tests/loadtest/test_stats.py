"""The statistics against hand-computed sequences: percentiles, PDV, IPDV,
RFC 3550 J, stability windows and the knee."""

from __future__ import annotations

import random

import pytest

from loadtest import stats

# Latencies (ms) in intended-send order, used by several tests.
SEQ = [10.0, 12.0, 11.0, 15.0, 10.0]


def test_pdv_is_latency_minus_the_minimum():
    assert stats.pdv(SEQ) == [0.0, 2.0, 1.0, 5.0, 0.0]
    assert stats.pdv([]) == []


def test_ipdv_is_absolute_difference_of_consecutive_latencies():
    assert stats.ipdv(SEQ) == [2.0, 1.0, 4.0, 5.0]
    assert stats.ipdv([7.0]) == []


def test_rfc3550_jitter_follows_the_running_estimate_by_hand():
    # J1 = 0 + (2-0)/16 = 0.125
    # J2 = 0.125 + (1-0.125)/16 = 0.1796875
    # J3 = 0.1796875 + (4-0.1796875)/16 = 0.418457031...
    # J4 = 0.418457031 + (5-0.418457031)/16 = 0.704803466...
    j = stats.rfc3550_jitter(SEQ)
    assert j == pytest.approx(0.7048034668, abs=1e-9)
    assert stats.rfc3550_jitter([5.0]) == 0.0


def test_rfc3550_jitter_of_a_constant_latency_is_zero_and_of_alternation_tends_to_the_step():
    assert stats.rfc3550_jitter([20.0] * 100) == 0.0
    alternating = [10.0, 14.0] * 200
    assert stats.rfc3550_jitter(alternating) == pytest.approx(4.0, rel=1e-6)


def test_summary_percentiles_of_1_to_1000_ms():
    values = [float(i) for i in range(1, 1001)]
    s = stats.summary(values)
    assert s["count"] == 1000
    assert s["min"] == 1.0 and s["max"] == 1000.0
    assert s["mean"] == pytest.approx(500.5)
    # HdrHistogram with 3 significant digits: within 0.1% of the exact rank.
    assert s["p50"] == pytest.approx(500, rel=2e-3)
    assert s["p90"] == pytest.approx(900, rel=2e-3)
    assert s["p99"] == pytest.approx(990, rel=2e-3)
    assert s["p999"] == pytest.approx(999, rel=2e-3)


def test_summary_keeps_sub_millisecond_resolution():
    s = stats.summary([0.125, 0.250, 0.375, 0.500])
    assert s["min"] == 0.125 and s["max"] == 0.5
    assert s["p50"] == pytest.approx(0.25, abs=0.001)


def test_summary_of_nothing_is_all_none():
    s = stats.summary([])
    assert s["count"] == 0
    assert all(s[k] is None for k in stats.FIELDS)


def test_summary_percentiles_never_exceed_the_exact_max():
    s = stats.summary([1.0, 1234.5678])
    assert s["p999"] <= s["max"] == 1234.5678


def test_negative_values_keep_their_order_statistics():
    # A derived hop (tunnel - agent) can dip below 0; its percentiles must not collapse to 0 or the max.
    s = stats.summary([-0.5, 1.0, 2.0])
    assert s["min"] == -0.5 and s["p50"] == 1.0
    s = stats.summary([-3.0, -2.0, -1.0, 4.0, 5.0])
    assert s["p50"] == -1.0 and s["min"] == -3.0 and s["max"] == 5.0
    s = stats.summary([-3.0, -2.0, -1.0, -0.5])
    assert s["p50"] == -2.0 and s["p999"] == -0.5


def test_stability_is_not_judged_without_completions():
    out = stats.stability([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert out["stable"] is None and "nothing completed" in out["reason"]


def test_jitter_summary_fields_from_a_hand_sequence():
    j = stats.jitter_summary(SEQ)
    for k in stats.FIELDS:
        assert k in j
    assert j["max"] == 5.0  # PDV max = 15 - 10
    assert j["mean"] == pytest.approx(8.0 / 5)  # PDVs 0,2,1,5,0
    assert j["min_latency"] == 10.0
    assert j["ipdv_mean"] == pytest.approx(3.0)  # (2+1+4+5)/4
    assert j["ipdv"]["max"] == 5.0
    assert j["rfc3550"] == pytest.approx(0.7048, abs=1e-4)
    # p99 - p50 of the PDV: the p99 is 5, the p50 is 1.
    assert j["spread_p99_p50"] == pytest.approx(4.0, abs=0.01)


def test_jitter_of_no_latencies_is_empty_not_an_error():
    j = stats.jitter_summary([])
    assert j["count"] == 0 and j["p50"] is None and j["rfc3550"] is None and j["spread_p99_p50"] is None


def test_windows_cover_the_interval_evenly():
    assert stats.windows(0.0, 10.0, 5) == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0), (6.0, 8.0), (8.0, 10.0)]
    assert stats.windows(1.0, 1.0, 5) == []


@pytest.mark.parametrize(("throughputs", "latencies", "stable"), [
    ([50, 100, 100, 104, 97], [5, 5, 5.2, 5.1, 4.9], True),   # early ramp ignored, last 3 within 10%
    ([100, 100, 100, 100, 70], [5, 5, 5, 5, 5], False),       # throughput fell in the last window
    ([100, 100, 100, 100, 100], [5, 5, 5, 5, 9], False),      # latency grew
])
def test_stability_uses_the_last_three_windows(throughputs, latencies, stable):
    s = stats.stability(throughputs, latencies)
    assert s["stable"] is stable


def test_stability_with_too_few_windows_is_not_judged():
    s = stats.stability([100, 100], [5, 5])
    assert s["stable"] is None
    assert "need 3" in s["reason"]


def test_knee_is_the_last_sustained_rate():
    pts = [(100, 100, 5.0), (200, 199, 5.5), (400, 398, 7.0), (800, 610, 250.0), (1600, 620, 900.0)]
    k = stats.find_knee(pts)
    assert k["knee_rps"] == 400
    assert k["saturated_at_rps"] == 800
    assert "throughput" in k["reason"]


def test_knee_by_latency_even_when_throughput_keeps_up():
    pts = [(100, 100, 5.0), (200, 200, 6.0), (300, 300, 40.0)]
    k = stats.find_knee(pts)
    assert k["knee_rps"] == 200 and k["saturated_at_rps"] == 300
    assert "p99" in k["reason"]


def test_knee_beyond_the_sweep_and_already_saturated():
    assert stats.find_knee([(10, 10, 1.0), (20, 20, 1.1)])["knee_rps"] == 20
    assert stats.find_knee([(10, 10, 1.0), (20, 20, 1.1)])["saturated_at_rps"] is None
    k = stats.find_knee([(1000, 300, 50.0), (2000, 310, 90.0)])
    assert k["knee_rps"] is None and k["saturated_at_rps"] == 1000


def test_the_folded_histogram_equals_recording_every_value():
    # stats.histogram counts values with numpy after folding them onto the
    # histogram's resolution; it must give what one record_value per value gives.
    from hdrh.histogram import HdrHistogram

    rng = random.Random(11)
    values = [rng.lognormvariate(1.5, 1.8) for _ in range(20000)] + [0.0, 0.0004, 2.047, 2.048, 4.095, -1.0, 3.5e6]
    naive = HdrHistogram(stats.HDR_LOWEST_US, stats.HDR_HIGHEST_US, stats.HDR_DIGITS)
    for v in values:
        naive.record_value(min(stats.HDR_HIGHEST_US, max(0, round(v * 1000))))
    folded = stats.histogram(values)
    ps = [0, 0.1, 1, 10, 25, 50, 75, 90, 99, 99.9, 99.99, 100]
    assert folded.get_percentile_to_value_dict(ps) == naive.get_percentile_to_value_dict(ps)
    assert folded.get_total_count() == naive.get_total_count()
