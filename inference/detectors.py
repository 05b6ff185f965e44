"""The object detectors: which file each one is, how an image becomes its
input, and how its raw outputs become boxes in the pixels of the image the
client sent (the decoding itself is `detection.py`).

- ssd-mobilenet-v2: SSD MobileNetV2 trained on Open Images v4, 23 everyday
  classes (person, cat, dog, car, laptop, coffee cup, ...), 300 x 300, the
  image stretched to the square as it was trained.
- blazeface: MediaPipe's short-range face detector, 128 x 128, the image
  letterboxed (aspect kept, padded) as MediaPipe feeds it.

A file given with `--detector-weights` replaces the pinned one: any raw-output
SSD with the same anchors and input (and `--detector-labels` for its classes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import tflite, weights
from .detection import (
    BLAZEFACE_CODING,
    BLAZEFACE_SHORT,
    SSD_CODING,
    SSD_MOBILENET_V2,
    AnchorSpec,
    BoxCoding,
    anchors,
    decode_boxes,
    detect,
)
from .errors import ModelUnavailable
from .imaging import decode_sized

Array = np.ndarray[Any, Any]
BACKEND = "tflite"


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    weights: str  # pinned file name (inference/weights.py)
    labels: str | None  # pinned label file: one name per line, line 0 the background
    fixed_labels: tuple[str, ...]  # when there is no label file
    anchors: AnchorSpec
    coding: BoxCoding
    outputs: tuple[str, str]  # the regression and class outputs' names
    box_columns: int  # columns of a regression row (4 for SSD, 16 for BlazeFace: box + 6 keypoints)
    mean: float
    scale: float
    letterbox: bool  # keep the aspect ratio and pad, or stretch to the square
    background: bool  # class column 0 is the background
    iou_threshold: float
    min_score: float  # default threshold of an answer


DETECTORS = {
    "ssd-mobilenet-v2": DetectorSpec(
        "ssd-mobilenet-v2", "ssd-mobilenet-v2.tflite", "ssd-mobilenet-v2.labels.txt", (), SSD_MOBILENET_V2,
        SSD_CODING, ("raw_outputs/box_encodings", "raw_outputs/class_predictions"), 4, 127.5, 1 / 127.5,
        letterbox=False, background=True, iou_threshold=0.5, min_score=0.5),
    "blazeface": DetectorSpec(
        "blazeface", "face_detection_short_range.tflite", None, ("face",), BLAZEFACE_SHORT, BLAZEFACE_CODING,
        ("regressors", "classificators"), 16, 127.5, 1 / 127.5,
        letterbox=True, background=False, iou_threshold=0.3, min_score=0.5),
}


@dataclass(frozen=True)
class Geometry:
    """Where the image sits in the model input: model pixel = image pixel *
    scale + pad, per axis; `size` is the model input side."""
    size: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    width: int
    height: int

    def to_image(self, box: tuple[float, float, float, float]) -> list[float]:
        """A normalised model-input box -> [x0, y0, x1, y1] in image pixels,
        clipped to the image."""
        x0, y0, x1, y1 = box
        out = [(x0 * self.size - self.pad_x) / self.scale_x, (y0 * self.size - self.pad_y) / self.scale_y,
               (x1 * self.size - self.pad_x) / self.scale_x, (y1 * self.size - self.pad_y) / self.scale_y]
        return [round(min(max(v, 0.0), lim), 1) for v, lim in zip(out, (self.width, self.height) * 2, strict=True)]


@dataclass
class DetectorInput:
    array: Array  # HWC float32
    geometry: Geometry
    decode_s: float
    preprocess_s: float

    @property
    def width(self) -> int:
        return self.geometry.width

    @property
    def height(self) -> int:
        return self.geometry.height


def to_input(img: Image.Image, size: int, letterbox: bool, mean: float, scale: float,
             original: tuple[int, int] | None = None) -> tuple[Array, Geometry]:
    """An RGB image as a size x size model input, and how the `original`
    image (the one sent; `img` may be a JPEG draft of it) was placed."""
    w, h = original or img.size
    if letterbox:
        s = size / max(w, h)
        rw, rh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGB", (size, size))
        px, py = (size - rw) // 2, (size - rh) // 2
        canvas.paste(img.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=3.0), (px, py))
        geo = Geometry(size, rw / w, rh / h, px, py, w, h)
        img = canvas
    else:
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        geo = Geometry(size, size / w, size / h, 0.0, 0.0, w, h)
    x = (np.asarray(img, dtype=np.float32) - np.float32(mean)) * np.float32(scale)
    return np.ascontiguousarray(x), geo


@dataclass
class Detector:
    """A loaded detector: `predict` maps an NHWC batch to one packed row per
    image ([anchors, box columns + classes]); `decode` turns a row into the
    answer's detections."""
    spec: DetectorSpec
    model: str
    source: Path
    labels: tuple[str, ...]
    predict: Callable[[Array], Array]
    anchors: Array

    backend = BACKEND

    @property
    def size(self) -> int:
        return self.spec.anchors.input_size

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else f"class_{class_id}"

    def prepare(self, data: bytes, max_pixels: int) -> DetectorInput:
        t0 = time.perf_counter()
        img, original = decode_sized(data, max_pixels, draft=self.size)  # a large JPEG: decoded smaller
        t1 = time.perf_counter()
        x, geo = to_input(img, self.size, self.spec.letterbox, self.spec.mean, self.spec.scale, original)
        return DetectorInput(x, geo, t1 - t0, time.perf_counter() - t1)

    def decode(self, row: Array, geometry: Geometry, min_score: float, max_out: int) -> list[dict[str, Any]]:
        k = self.spec.box_columns
        boxes = decode_boxes(row[:, :k], self.anchors, self.spec.coding)
        found = detect(boxes, row[:, k:], min_score=min_score, max_out=max_out,
                       iou_threshold=self.spec.iou_threshold, background=self.spec.background)
        return [{"label": self.label(d.class_id), "class_id": d.class_id, "score": round(d.score, 4),
                 "box": geometry.to_image(d.box)} for d in found]


@dataclass
class DetectorPlan:
    """A detector whose files were found and checked; `load` is the slow part."""
    spec: DetectorSpec
    source: Path
    labels: tuple[str, ...]

    def load(self, threads: int | None = None) -> Detector:
        model = tflite.load(self.source, self.spec.outputs, threads)
        grid = anchors(self.spec.anchors)
        size = self.spec.anchors.input_size
        if model.input_shape[1:3] != (size, size):
            raise ModelUnavailable(f"{self.source}: input is {model.input_shape[1]}x{model.input_shape[2]}, "
                                   f"{self.spec.name} expects {size}x{size}")
        rows = model.output_shapes[0][1] if len(model.output_shapes[0]) == 3 else -1
        if rows != len(grid):
            raise ModelUnavailable(f"{self.source}: {rows} output rows, but {self.spec.name}'s anchors are "
                                   f"{len(grid)}; it is not this kind of detector")
        return Detector(self.spec, self.spec.name, self.source, self.labels, model.predict, grid)


def read_labels(path: Path) -> tuple[str, ...]:
    try:
        return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelUnavailable(f"cannot read the label file {path} ({exc}); one class name per line") from None


def resolve_detector(name: str, weights_dir: Path, weights_file: str | None = None,
                     labels_file: str | None = None) -> DetectorPlan:
    """Find and check the files of detector `name` (quick: before listening)."""
    spec = DETECTORS.get(name)
    if spec is None:
        raise ModelUnavailable(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if weights_file:
        source = Path(weights_file)
        if not source.is_file():
            raise ModelUnavailable(f"detector file {weights_file} not found; pass a TFLite SSD with "
                                   "--detector-weights or leave it out for the pinned one")
    else:
        source = weights.locate(spec.weights, weights_dir)
    if labels_file:
        labels = read_labels(Path(labels_file))
    elif spec.labels and not weights_file:
        labels = read_labels(weights.locate(spec.labels, weights_dir))
    else:
        labels = spec.fixed_labels
    return DetectorPlan(spec, source, labels)


PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))


def draw_boxes(img: Image.Image, detections: list[dict[str, Any]]) -> Image.Image:
    """A copy of `img` with each detection's box and "label score" drawn on it."""
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 250))
    for d in detections:
        color = PALETTE[d["class_id"] % len(PALETTE)]
        x0, y0, x1, y1 = d["box"]
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        ty = y0 - (bottom - top) - 4 if y0 >= (bottom - top) + 4 else y0
        draw.rectangle((x0, ty, x0 + (right - left) + 4, ty + (bottom - top) + 4), fill=color)
        draw.text((x0 + 2, ty + 2 - top), text, fill=(255, 255, 255))
    return out
