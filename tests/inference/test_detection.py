"""The detector's decoding (anchors, box coder, NMS) and the transformation's
image helpers, on plain arrays. Reference values: written out by hand from
the formulas, and a straightforward loop implementation of MediaPipe's
SsdAnchorsCalculator written once here, compared anchor by anchor."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from PIL import Image

from inference.detection import (
    BLAZEFACE_CODING,
    BLAZEFACE_SHORT,
    SSD_CODING,
    SSD_MOBILENET_V2,
    AnchorSpec,
    anchors,
    decode_boxes,
    detect,
    iou,
    nms,
    sigmoid,
)
from inference.detectors import Geometry, to_input
from inference.segmenter import choose_format, composite, coverage, full_mask, parse_color


def loop_anchors(spec: AnchorSpec) -> list[tuple[float, float, float, float]]:
    """MediaPipe's ssd_anchors_calculator.cc, transcribed loop for loop."""
    def scale(i: int) -> float:
        n = len(spec.strides)
        return spec.min_scale if n == 1 else spec.min_scale + (spec.max_scale - spec.min_scale) * i / (n - 1)

    out = []
    layer = 0
    while layer < len(spec.strides):
        heights, widths = [], []
        last = layer
        while last < len(spec.strides) and spec.strides[last] == spec.strides[layer]:
            pairs = []
            if last == 0 and spec.reduce_boxes_in_lowest_layer:
                pairs = [(1.0, 0.1), (2.0, scale(last)), (0.5, scale(last))]
            else:
                pairs = [(r, scale(last)) for r in spec.aspect_ratios]
                if spec.interpolated_scale_aspect_ratio > 0:
                    nxt = 1.0 if last == len(spec.strides) - 1 else scale(last + 1)
                    pairs.append((spec.interpolated_scale_aspect_ratio, math.sqrt(scale(last) * nxt)))
            for ratio, s in pairs:
                heights.append(s / math.sqrt(ratio))
                widths.append(s * math.sqrt(ratio))
            last += 1
        side = math.ceil(spec.input_size / spec.strides[layer])
        for y in range(side):
            for x in range(side):
                for h, w in zip(heights, widths, strict=True):
                    if spec.fixed_anchor_size:
                        h, w = 1.0, 1.0
                    out.append(((y + spec.offset) / side, (x + spec.offset) / side, h, w))
        layer = last
    return out


@pytest.mark.parametrize("spec, count", [(SSD_MOBILENET_V2, 1917), (BLAZEFACE_SHORT, 896)])
def test_anchor_grid_matches_the_straightforward_loops(spec: AnchorSpec, count: int) -> None:
    got = anchors(spec)
    assert got.shape == (count, 4)
    np.testing.assert_allclose(got, np.array(loop_anchors(spec), np.float32), rtol=0, atol=1e-6)


def test_ssd_anchors_by_hand() -> None:
    a = anchors(SSD_MOBILENET_V2)
    c = 0.5 / 19
    # Layer 0, cell (0, 0): 0.1 x 0.1, then scale 0.2 at ratio 2 (h = 0.2/sqrt 2, w = 0.2*sqrt 2) and 0.5.
    np.testing.assert_allclose(a[0], [c, c, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(a[1], [c, c, 0.2 / math.sqrt(2), 0.2 * math.sqrt(2)], atol=1e-6)
    np.testing.assert_allclose(a[2], [c, c, 0.2 * math.sqrt(2), 0.2 / math.sqrt(2)], atol=1e-6)
    np.testing.assert_allclose(a[3], [c, 3 * c, 0.1, 0.1], atol=1e-6)  # next cell to the right
    # Layer 1 starts after 19*19*3 anchors: stride 32 -> 10 x 10 cells, scale 0.35, 6 shapes.
    np.testing.assert_allclose(a[1083], [0.05, 0.05, 0.35, 0.35], atol=1e-6)
    # The last anchor: the 1 x 1 layer's interpolated shape, sqrt(0.95 * 1.0) square, centred.
    np.testing.assert_allclose(a[-1], [0.5, 0.5, math.sqrt(0.95), math.sqrt(0.95)], atol=1e-6)


def test_ssd_box_coding_by_hand() -> None:
    anchor = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
    # ty=1 -> centre y + 1/10 * 0.2; tx=-2 -> centre x - 2/10 * 0.2; th=0 -> h 0.2; tw=5 ln 2 -> w 0.4.
    raw = np.array([[1.0, -2.0, 0.0, 5 * math.log(2)]], np.float32)
    np.testing.assert_allclose(decode_boxes(raw, anchor, SSD_CODING)[0], [0.26, 0.42, 0.66, 0.62], atol=1e-6)


def test_blazeface_box_coding_by_hand() -> None:
    anchor = np.array([[0.25, 0.75, 1.0, 1.0]], np.float32)  # (y, x, h, w)
    raw = np.zeros((1, 16), np.float32)
    raw[0, :4] = [12.8, -6.4, 32.0, 64.0]  # x, y, w, h in input pixels of 128
    np.testing.assert_allclose(decode_boxes(raw, anchor, BLAZEFACE_CODING)[0],
                               [0.85 - 0.125, 0.2 - 0.25, 0.85 + 0.125, 0.2 + 0.25], atol=1e-6)


def test_huge_size_logits_do_not_overflow() -> None:
    anchor = np.array([[0.5, 0.5, 0.1, 0.1]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        box = decode_boxes(np.array([[0, 0, 1e6, 1e6]], np.float32), anchor, SSD_CODING)
        assert np.isfinite(box).all()
        s = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0])


def test_iou_by_hand() -> None:
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 6, 6], [0, 0, 2, 2]], np.float32)
    np.testing.assert_allclose(iou(boxes[0], boxes), [1.0, 1 / 7, 0.0, 1.0], atol=1e-6)


def test_nms_keeps_the_best_of_each_overlapping_group() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0.5, 0, 10.5, 10]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.85])
    assert nms(boxes, scores, 0.5, 10) == [1, 2]
    assert nms(boxes, scores, 0.5, 1) == [1]
    assert nms(boxes, scores, 0.99, 10) == [1, 3, 0, 2]  # nothing overlaps that much


def test_nms_overlap_exactly_at_the_threshold_is_kept() -> None:
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], np.float32)  # IoU 1/7
    assert nms(boxes, np.array([0.9, 0.8]), 1 / 7 + 1e-6, 10) == [0, 1]
    assert nms(boxes, np.array([0.9, 0.8]), 1 / 7 - 1e-6, 10) == [0]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_detect_is_per_class_skips_the_background_and_thresholds() -> None:
    boxes = np.array([[0, 0, .5, .5], [.01, 0, .51, .5], [0, 0, .5, .5], [.6, .6, .9, .9]], np.float32)
    logits = np.full((4, 3), -10.0)
    logits[0, 1] = logit(0.9)  # class 1
    logits[1, 1] = logit(0.8)  # class 1, overlaps anchor 0: suppressed
    logits[2, 2] = logit(0.7)  # class 2 on the same box: kept (NMS is per class)
    logits[3, 0] = 10.0  # background only: never reported
    logits[3, 2] = logit(0.3)  # below the threshold
    found = detect(boxes, logits, min_score=0.5, max_out=10)
    assert [(d.class_id, round(d.score, 6)) for d in found] == [(1, 0.9), (2, 0.7)]
    assert found[0].box == pytest.approx((0, 0, .5, .5))
    assert [d.class_id for d in detect(boxes, logits, min_score=0.25, max_out=10)] == [1, 2, 2]
    assert len(detect(boxes, logits, min_score=0.5, max_out=1)) == 1


def test_detect_without_background_reports_column_zero() -> None:
    found = detect(np.array([[0, 0, 1, 1]], np.float32), np.array([[logit(0.75)]]), min_score=0.5, max_out=5,
                   background=False)
    assert [(d.class_id, round(d.score, 6)) for d in found] == [(0, 0.75)]


def test_stretched_input_maps_boxes_back_to_image_pixels() -> None:
    img = Image.new("RGB", (600, 300))
    x, geo = to_input(img, 300, letterbox=False, mean=127.5, scale=1 / 127.5)
    assert x.shape == (300, 300, 3) and x.min() == pytest.approx(-1.0)
    assert geo.to_image((0.1, 0.2, 0.5, 1.2)) == [60.0, 60.0, 300.0, 300.0]  # clipped to the image


def test_letterboxed_input_maps_boxes_back_to_image_pixels() -> None:
    img = Image.new("RGB", (256, 128), (255, 255, 255))
    x, geo = to_input(img, 128, letterbox=True, mean=127.5, scale=1 / 127.5)
    # 256 x 128 -> 128 x 64 placed at y 32..96: padding rows stay -1, the image is +1.
    assert x[0, 0, 0] == pytest.approx(-1.0) and x[64, 64, 0] == pytest.approx(1.0)
    assert geo == Geometry(128, 0.5, 0.5, 0, 32, 256, 128)
    assert geo.to_image((0.25, 0.25, 0.75, 0.75)) == [64.0, 0.0, 192.0, 128.0]
    # A JPEG draft: the model saw a smaller decode, the boxes are in the sent image's pixels.
    _, big = to_input(img, 128, letterbox=True, mean=0, scale=1, original=(1024, 512))
    assert big.to_image((0.25, 0.25, 0.75, 0.75)) == [256.0, 0.0, 768.0, 512.0]


@pytest.mark.parametrize("accept, mode, expected", [
    (None, "blur", "jpeg"), ("", "replace", "jpeg"), ("*/*", "blur", "jpeg"), ("image/png", "blur", "png"),
    ("image/jpeg;q=0.5, image/png", "blur", "png"), ("image/png;q=0.4, image/*;q=0.9", "blur", "jpeg"),
    ("application/json", "blur", None), ("image/jpeg", "cutout", None), ("*/*", "cutout", "png"),
    ("image/png;q=0", "cutout", None), ("image/webp, image/png;q=0.1", "replace", "png"),
])
def test_answer_format_follows_accept(accept: str | None, mode: str, expected: str | None) -> None:
    assert choose_format(accept, mode) == expected


def test_parse_color() -> None:
    assert parse_color("#00b140") == (0, 177, 64)
    assert parse_color("FFFFFF") == (255, 255, 255)
    for bad in ("fff", "gg0000", "12345678"):
        with pytest.raises(ValueError, match="six hex digits"):
            parse_color(bad)


def test_composite_keeps_the_person_and_changes_only_the_background() -> None:
    img = Image.new("RGB", (40, 20), (200, 100, 50))
    mask = full_mask(np.pad(np.ones((8, 4, 1), np.float32), ((0, 0), (0, 4), (0, 0))), 40, 20)  # left half
    assert mask.shape == (20, 40) and coverage(mask) == pytest.approx(0.5, abs=0.06)
    out = np.asarray(composite(img, mask, "replace", (0, 0, 255)))
    assert out.shape == (20, 40, 3)
    assert tuple(out[10, 2]) == (200, 100, 50) and tuple(out[10, 37]) == (0, 0, 255)
    cut = composite(img, mask, "cutout")
    assert cut.mode == "RGBA" and cut.getpixel((2, 10))[3] == 255 and cut.getpixel((37, 10))[3] == 0
    blur = np.asarray(composite(img, mask, "blur"))
    assert blur.shape == (20, 40, 3) and tuple(blur[10, 2]) == (200, 100, 50)
    with pytest.raises(ValueError, match="unknown mode"):
        composite(img, mask, "sepia")
