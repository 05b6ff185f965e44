"""Turning a single-shot detector's raw outputs into boxes: the SSD anchor
generator, the box coder, sigmoid scores and non-maximum suppression. Pure
numpy, no model and no I/O, so every step is tested on plain arrays.

The conventions are those of the TensorFlow Object Detection API (which
trained the SSD MobileNetV2 shipped here) as MediaPipe restates them in its
`SsdAnchorsCalculator` and `TensorsToDetectionsCalculator`: anchors and boxes
are normalised to [0, 1] of the model input, centre form (y, x, h, w) inside,
corner form [x0, y0, x1, y1] outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class AnchorSpec:
    """Where the anchors sit: one grid per stride (ceil(input / stride) cells
    a side), several anchor shapes per cell. Consecutive layers of the same
    stride share one grid (BlazeFace)."""

    input_size: int
    strides: tuple[int, ...]
    min_scale: float
    max_scale: float
    aspect_ratios: tuple[float, ...]
    offset: float = 0.5
    reduce_boxes_in_lowest_layer: bool = False  # SSD: layer 0 has 3 anchors (0.1 x ratio 1, 2, 0.5)
    interpolated_scale_aspect_ratio: float = 1.0  # an extra anchor of scale sqrt(s_i * s_i+1); 0: none
    fixed_anchor_size: bool = False  # BlazeFace: every anchor is 1 x 1 (the regressor gives the size)


# The TF Object Detection API's ssd_mobilenet_v2 at 300 x 300: 1917 anchors.
SSD_MOBILENET_V2 = AnchorSpec(input_size=300, strides=(16, 32, 64, 128, 256, 512), min_scale=0.2, max_scale=0.95,
                              aspect_ratios=(1.0, 2.0, 0.5, 3.0, 1 / 3), reduce_boxes_in_lowest_layer=True)
# MediaPipe's BlazeFace short range at 128 x 128: 896 anchors.
BLAZEFACE_SHORT = AnchorSpec(input_size=128, strides=(8, 16, 16, 16), min_scale=0.1484375, max_scale=0.75,
                             aspect_ratios=(1.0,), fixed_anchor_size=True)


def _scale(spec: AnchorSpec, layer: int) -> float:
    n = len(spec.strides)
    if n == 1:
        return spec.min_scale
    return spec.min_scale + (spec.max_scale - spec.min_scale) * layer / (n - 1)


def anchors(spec: AnchorSpec) -> Array:
    """[N, 4] anchors (y_center, x_center, h, w), in the order the model's
    outputs are: layer by layer, row by row, column by column, shape by shape."""
    out: list[Array] = []
    n = len(spec.strides)
    layer = 0
    while layer < n:
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < n and spec.strides[last] == spec.strides[layer]:
            s = _scale(spec, last)
            if last == 0 and spec.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, s, s]
            else:
                ratios += list(spec.aspect_ratios)
                scales += [s] * len(spec.aspect_ratios)
                if spec.interpolated_scale_aspect_ratio > 0:
                    s_next = 1.0 if last == n - 1 else _scale(spec, last + 1)
                    scales.append(math.sqrt(s * s_next))
                    ratios.append(spec.interpolated_scale_aspect_ratio)
            last += 1
        r = np.sqrt(np.asarray(ratios, np.float64))
        s_arr = np.asarray(scales, np.float64)
        hw = np.ones((len(r), 2)) if spec.fixed_anchor_size else np.stack([s_arr / r, s_arr * r], axis=1)
        side = math.ceil(spec.input_size / spec.strides[layer])
        centres = (np.arange(side) + spec.offset) / side
        yy, xx = np.meshgrid(centres, centres, indexing="ij")
        grid = np.stack([yy.ravel(), xx.ravel()], axis=1)  # [cells, 2], row-major
        cells = np.repeat(grid, len(r), axis=0)
        shapes = np.tile(hw, (len(grid), 1))
        out.append(np.concatenate([cells, shapes], axis=1))
        layer = last
    return np.concatenate(out).astype(np.float32)


@dataclass(frozen=True)
class BoxCoding:
    """How a raw regression row encodes a box relative to its anchor.

    - "ssd" (FasterRcnnBoxCoder): (ty, tx, th, tw); centre = t / scale * anchor
      size + anchor centre; size = exp(t / scale) * anchor size.
    - "blazeface": (x, y, w, h, keypoints...) in input pixels from the anchor
      centre: divide by `scales` (the input size), no exp.
    """

    kind: str
    scales: tuple[float, float, float, float]  # y, x, h, w


SSD_CODING = BoxCoding("ssd", (10.0, 10.0, 5.0, 5.0))
BLAZEFACE_CODING = BoxCoding("blazeface", (128.0, 128.0, 128.0, 128.0))


def decode_boxes(raw: Array, anchor: Array, coding: BoxCoding) -> Array:
    """[N, >=4] raw regressions + [N, 4] anchors -> [N, 4] corner boxes
    [x0, y0, x1, y1], normalised to the model input (not clipped)."""
    ya, xa, ha, wa = (anchor[:, i].astype(np.float64) for i in range(4))
    sy, sx, sh, sw = coding.scales
    r = raw.astype(np.float64)
    if coding.kind == "ssd":
        yc = r[:, 0] / sy * ha + ya
        xc = r[:, 1] / sx * wa + xa
        # exp of a huge logit would overflow to inf: such a box is garbage anyway.
        h = np.exp(np.clip(r[:, 2] / sh, -30, 30)) * ha
        w = np.exp(np.clip(r[:, 3] / sw, -30, 30)) * wa
    elif coding.kind == "blazeface":
        xc = r[:, 0] / sx * wa + xa
        yc = r[:, 1] / sy * ha + ya
        w = r[:, 2] / sw * wa
        h = r[:, 3] / sh * ha
    else:
        raise ValueError(f"unknown box coding {coding.kind!r}")
    return np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1).astype(np.float32)


def sigmoid(x: Array) -> Array:
    """Numerically safe logistic function (no overflow warning for -1000)."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1 / (1 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1 + e)
    return out


def iou(box: Array, boxes: Array) -> Array:
    """Intersection over union of one [4] corner box with each of [N, 4]."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: Array, scores: Array, iou_threshold: float, max_out: int) -> list[int]:
    """Greedy hard non-maximum suppression: indices of kept boxes, best first.
    A box is dropped when it overlaps a kept, better one by more than
    `iou_threshold`. Ties in score keep the lower index first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[iou(boxes[i], boxes[rest]) <= iou_threshold]
    return keep


@dataclass(frozen=True)
class Detection:
    class_id: int
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 normalised to the model input


def detect(boxes: Array, logits: Array, *, min_score: float, max_out: int, iou_threshold: float = 0.5,
           background: bool = True) -> list[Detection]:
    """Boxes [N, 4] and class logits [N, C] -> the detections above
    `min_score`, best first, after per-class NMS. With `background`, column
    0 is the background class and never reported; each anchor reports its
    best other class (as MediaPipe does)."""
    classes = logits[:, 1:] if background else logits
    best = classes.argmax(axis=1)  # the sigmoid keeps the order: apply it to the winners only
    best_score = sigmoid(classes[np.arange(len(classes)), best])
    candidates = np.flatnonzero(best_score >= min_score)
    found: list[Detection] = []
    for cls in np.unique(best[candidates]):
        idx = candidates[best[candidates] == cls]
        for k in nms(boxes[idx], best_score[idx], iou_threshold, max_out):
            i = idx[k]
            found.append(Detection(int(cls) + (1 if background else 0), float(best_score[i]),
                                   tuple(float(v) for v in boxes[i])))  # type: ignore[arg-type]
    found.sort(key=lambda d: -d.score)
    return found[:max_out]
