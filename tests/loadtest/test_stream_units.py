"""The pure parts of `loadtest stream`: stream jitter (RFC 3550 J, |IPDV|
across losses), the frame ledger's matching, the capacity search, and the
generated JPEG frames."""

from __future__ import annotations

import io
import json

import pytest

from loadtest import stats
from loadtest.stream import (
    ANSWERED,
    DROPPED,
    ERROR,
    UNANSWERED,
    CapacitySearch,
    FrameLedger,
    jpeg_of_size,
)

# -- jitter -----------------------------------------------------------------------------


def test_ipdv_pairs_only_consecutive_answered_frames():
    # Frame 2 lost: the pairs (1,2) and (2,3) are undefined (RFC 5481), not |13 - 10|.
    assert stats.consecutive_ipdv([10.0, 12.0, None, 13.0, 11.0]) == [2.0, 2.0]
    assert stats.consecutive_ipdv([None, None]) == []
    assert stats.consecutive_ipdv([]) == []


def test_rfc3550_series_is_the_running_estimate_with_gain_one_sixteenth():
    lat = [10.0, 26.0, 26.0, 10.0]
    js = stats.rfc3550_series(lat)
    # J1 = 0 + (16 - 0)/16 = 1; J2 = 1 + (0 - 1)/16 = 0.9375; J3 = 0.9375 + (16 - 0.9375)/16
    assert js == pytest.approx([0.0, 1.0, 0.9375, 0.9375 + (16 - 0.9375) / 16])
    assert js[-1] == pytest.approx(stats.rfc3550_jitter(lat))
    assert stats.rfc3550_series([]) == []


def test_rfc3550_converges_to_the_constant_transit_difference():
    # An alternating +-4 ms transit: |D| = 8 every time, so J -> 8.
    lat = [20.0 + (4 if i % 2 else -4) for i in range(400)]
    assert stats.rfc3550_jitter(lat) == pytest.approx(8.0, rel=1e-6)


def test_constant_latency_has_zero_jitter():
    j = stats.stream_jitter([20.0] * 50)
    assert j["rfc3550"] == 0 and j["p99"] == 0 and j["max"] == 0 and j["count"] == 49


def test_streams_jitter_never_pairs_frames_of_different_streams():
    # Each stream steady, but at very different levels: interleaving them would invent 100 ms of IPDV.
    j = stats.streams_jitter([[10.0, 10.0, 10.0], [110.0, 110.0, 110.0]])
    assert j["max"] == 0 and j["count"] == 4
    assert j["rfc3550"] == 0 and j["rfc3550_max"] == 0
    assert j["pdv"]["max"] == 0  # PDV relative to each stream's own minimum


def test_streams_jitter_rfc3550_is_the_mean_and_max_of_the_streams_final_j():
    a = [10.0, 26.0]  # J = 1
    b = [10.0, 42.0]  # J = 2
    j = stats.streams_jitter([a, b, [None, 5.0]])
    assert j["rfc3550"] == pytest.approx(1.5) and j["rfc3550_max"] == pytest.approx(2.0)
    for k in stats.FIELDS:
        assert k in j
    empty = stats.streams_jitter([[None]])
    assert empty["rfc3550"] is None and empty["p50"] is None and empty["count"] == 0


# -- matching ------------------------------------------------------------------------------


def _ledger(n: int) -> FrameLedger:
    led = FrameLedger(0)
    for i in range(n):
        led.sent(i, i * 0.1, i * 0.1)
    return led


def test_json_answers_match_by_seq_whatever_their_order():
    led = _ledger(3)
    assert led.answer(json.dumps({"seq": 2, "label": "cat"}), 0.5).seq == 2  # type: ignore[union-attr]
    assert led.answer(json.dumps({"seq": 0}), 0.6).seq == 0  # type: ignore[union-attr]
    f2 = led.frames[2]
    assert f2.outcome == ANSWERED and f2.label == "cat"
    assert f2.latency_ms == pytest.approx(300.0)  # 0.5 s - its scheduled 0.2 s
    assert led.waiting == 1


def test_answers_without_seq_match_the_oldest_waiting_frame():
    led = _ledger(4)
    led.answer(json.dumps({"seq": 1}), 0.2)
    assert led.answer(b"\xff\xd8 echoed jpeg", 0.3).seq == 0  # type: ignore[union-attr]
    assert led.answer("plain text", 0.35).seq == 2  # type: ignore[union-attr]  # skips 1, already answered
    assert led.answer(json.dumps({"label": "no seq"}), 0.4).seq == 3  # type: ignore[union-attr]
    assert led.answer(b"one too many", 0.5) is None
    assert led.unmatched == 1


def test_dropped_and_error_answers_and_unknown_seqs():
    led = _ledger(4)
    led.answer('{"seq": 0, "dropped": true}', 0.1)
    led.answer('{"seq": 1, "error": "not an image"}', 0.2)
    led.answer('{"seq": 2, "timing": {"decode": 1.5, "infer": 10, "bogus": "x", "flag": true}}', 0.3)
    assert led.answer('{"seq": 2}', 0.3) is None  # repeated
    assert led.answer('{"seq": 99}', 0.3) is None  # never sent
    assert led.unmatched == 2
    assert [f.outcome for f in led.frames[:3]] == [DROPPED, ERROR, ANSWERED]
    assert led.frames[1].error == "not an image"
    assert led.frames[0].latency_ms is None and led.frames[1].latency_ms is None
    assert led.frames[2].timing == {"decode": 1.5, "infer": 10.0}
    assert led.close() == 1
    assert led.frames[3].outcome == UNANSWERED and led.waiting == 0


def test_a_transformation_answer_ends_its_frame_when_the_image_arrives():
    led = _ledger(3)
    assert led.answer(json.dumps({"seq": 0, "bytes": 4, "timing": {"encode": 2.0}}), 0.30) is None
    assert led.frames[0].outcome == ANSWERED and led.frames[0].timing == {"encode": 2.0}
    assert led.answer(b"\x89PNG", 0.35).seq == 0  # type: ignore[union-attr]  # its image, not frame 1's answer
    assert led.frames[0].latency_ms == pytest.approx(350.0)
    assert led.answer('{"seq": 1, "error": "not an image"}', 0.4).seq == 1  # type: ignore[union-attr]
    assert led.answer(b"stray image", 0.45).seq == 2  # type: ignore[union-attr]  # no image announced: oldest
    assert led.unmatched == 0


# -- capacity search ---------------------------------------------------------------------------


def _search(capacity: int, threshold: float = 0.01, max_streams: int = 64) -> tuple[CapacitySearch, list[int]]:
    s = CapacitySearch(threshold, max_streams)
    tried = []
    while (n := s.next_streams()) is not None:
        tried.append(n)
        s.record(n, 0.0 if n <= capacity else 0.5)
        assert len(tried) < 30
    return s, tried


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8, 13, 33, 63])
def test_capacity_search_finds_the_exact_capacity(capacity: int):
    s, tried = _search(capacity)
    assert s.sustained == capacity
    assert s.failed_at == capacity + 1
    assert tried[:2] == [1, 2]  # doubling first


def test_capacity_search_doubles_then_bisects():
    _, tried = _search(5)
    assert tried == [1, 2, 4, 8, 6, 5]


def test_capacity_search_stops_at_max_streams_and_when_one_stream_fails():
    s, tried = _search(1000, max_streams=20)
    assert tried == [1, 2, 4, 8, 16, 20] and s.sustained == 20 and s.failed_at is None
    s, tried = _search(0)
    assert tried == [1] and s.sustained is None and s.failed_at == 1


def test_capacity_threshold_is_inclusive_and_a_noisy_pass_above_a_failure_is_not_trusted():
    s = CapacitySearch(0.01)
    assert s.record(1, 0.01) is True
    assert s.record(2, 0.0101) is False
    s = CapacitySearch(0.01)
    for n, r in ((1, 0), (2, 0), (4, 0.2), (3, 0.0), (8, 0.0)):
        s.record(n, r)
    assert s.sustained == 3


# -- frames ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1_000, 5_000, 13_636, 13_639, 13_640, 50_000, 200_000])
def test_generated_frames_are_decodable_jpegs_of_the_asked_size(size: int):
    import cv2
    import numpy as np
    from PIL import Image

    data = jpeg_of_size(size)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    assert abs(len(data) - size) <= 3  # exact except when the gap is below one segment (4 bytes)
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "JPEG" and min(im.size) >= 8
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


def test_a_frame_size_below_the_smallest_jpeg_gives_the_smallest_jpeg():
    from PIL import Image

    data = jpeg_of_size(100)
    assert 100 < len(data) < 2_000
    Image.open(io.BytesIO(data)).load()


# -- figures of a set of frames ---------------------------------------------------------------


def test_figures_count_every_outcome_and_the_miss_ratio():
    from loadtest.streamreport import figures

    led = _ledger(10)  # frames scheduled every 0.1 s
    for i, latency in ((0, 0.010), (1, 0.020), (2, 0.250), (4, 0.030), (5, 0.040)):
        led.answer(json.dumps({"seq": i, "timing": {"infer": 5.0, "decode": 1.0}}), i * 0.1 + latency)
    led.answer('{"seq": 3, "dropped": true}', 0.31)
    led.answer('{"seq": 6, "error": "bad"}', 0.61)
    led.answer('{"seq": 7}', 0.7 + 0.05)
    led.close()  # 8 and 9 unanswered
    d = figures(led.frames, [led.frames], 1.0, deadline_ms=100.0, late_ms=1.0, not_sent=2)
    assert d["frames_sent"] == 10 and d["frames_answered"] == 6 and d["frames_errors"] == 1
    assert d["frames_dropped"] == 3 and d["dropped_by_server"] == 1 and d["unanswered"] == 2
    assert d["deadline_misses"] == 1  # frame 2, 250 ms
    # (1 miss + 3 dropped + 1 error + 2 not sent) / (10 sent + 2 not sent)
    assert d["miss_ratio"] == pytest.approx(7 / 12)
    assert d["achieved_fps"] == 6 and d["on_time_fps"] == 5
    assert d["latency_ms"]["count"] == 6 and d["latency_ms"]["max"] == pytest.approx(250.0)
    # |IPDV| only over the consecutive answered pairs (0,1), (1,2), (4,5): never across 3 or 6.
    assert d["jitter_ms"]["count"] == 3
    assert d["server_timing_ms"]["infer"]["mean"] == 5.0
    assert d["server_timing_ms"]["outside_phases"]["min"] == pytest.approx(10.0 - 6.0)


def test_images_are_files_or_directories_and_a_bad_path_is_a_usage_error(tmp_path):
    from loadtest.runner import SAMPLES, UsageError
    from loadtest.stream import load_frames

    one = tmp_path / "one.png"
    one.write_bytes(b"\x89PNG not really")
    frames = load_frames([str(SAMPLES), str(one)], None)
    assert [n for n, _ in frames] == ["astronaut.jpg", "cat.jpg", "coffee.jpg", "one.png"]
    assert [n for n, _ in load_frames(None, None)] == ["astronaut.jpg", "cat.jpg", "coffee.jpg"]
    assert len(load_frames(None, 5000)[0][1]) == 5000
    with pytest.raises(UsageError, match="no such file"):
        load_frames([str(tmp_path / "missing")], None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files"):
        load_frames([str(tmp_path / "empty")], None)
