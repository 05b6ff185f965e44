"""Image transformation: MediaPipe's selfie segmentation gives a person mask,
and the mask turns the photo into another one of the same size: the
background blurred (`blur`), replaced by a flat colour (`replace`), or made
transparent (`cutout`, PNG with alpha). Also how the answer image is encoded
(JPEG or PNG, chosen from the request's Accept header)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from . import tflite, weights
from .errors import ModelUnavailable
from .imaging import decode

Array = np.ndarray[Any, Any]
BACKEND = "tflite"
MODES = ("blur", "replace", "cutout")
DEFAULT_COLOR = (0, 177, 64)  # chroma-key green: obviously replaced, easy to key out again


@dataclass(frozen=True)
class SegmenterSpec:
    name: str
    weights: str
    size: int  # square input side
    scale: float  # input = RGB * scale


SEGMENTERS = {"selfie-segmentation": SegmenterSpec("selfie-segmentation", "selfie_segmentation.tflite", 256, 1 / 255)}


@dataclass
class SegmenterInput:
    array: Array  # HWC float32
    image: Image.Image  # the decoded photo, composited once the mask is back
    decode_s: float
    preprocess_s: float

    @property
    def width(self) -> int:
        return self.image.size[0]

    @property
    def height(self) -> int:
        return self.image.size[1]


@dataclass
class Segmenter:
    """A loaded segmenter: `predict` maps an NHWC batch to masks [N, S, S, 1] in 0-1."""
    spec: SegmenterSpec
    model: str
    source: Path
    predict: Callable[[Array], Array]

    backend = BACKEND

    def prepare(self, data: bytes, max_pixels: int) -> SegmenterInput:
        t0 = time.perf_counter()
        img = decode(data, max_pixels)
        t1 = time.perf_counter()
        small = img.resize((self.spec.size, self.spec.size), Image.Resampling.BILINEAR)
        x = np.asarray(small, dtype=np.float32) * np.float32(self.spec.scale)
        return SegmenterInput(np.ascontiguousarray(x), img, t1 - t0, time.perf_counter() - t1)


@dataclass
class SegmenterPlan:
    spec: SegmenterSpec
    source: Path

    def load(self, threads: int | None = None) -> Segmenter:
        model = tflite.load(self.source, (), threads)
        s = self.spec.size
        if model.input_shape[1:3] != (s, s) or model.output_shapes[0][1:3] != (s, s):
            raise ModelUnavailable(f"{self.source}: input {model.input_shape}, output {model.output_shapes[0]}; "
                                   f"{self.spec.name} expects a {s}x{s} image in and a {s}x{s} mask out")
        return Segmenter(self.spec, self.spec.name, self.source, model.predict)


def resolve_segmenter(name: str, weights_dir: Path, weights_file: str | None = None) -> SegmenterPlan:
    spec = SEGMENTERS.get(name)
    if spec is None:
        raise ModelUnavailable(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
    if weights_file:
        source = Path(weights_file)
        if not source.is_file():
            raise ModelUnavailable(f"segmenter file {weights_file} not found; pass a TFLite mask model with "
                                   "--segmenter-weights or leave it out for the pinned one")
        return SegmenterPlan(spec, source)
    return SegmenterPlan(spec, weights.locate(spec.weights, weights_dir))


# ------------------------------------------------------------------ the transformation

def full_mask(mask: Array, width: int, height: int) -> Array:
    """The model's square mask (0-1) resized to the photo: [height, width] float32."""
    m = np.clip(np.asarray(mask, np.float32).reshape(mask.shape[0], mask.shape[1]), 0, 1)
    img = Image.fromarray(m, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, np.float32), 0, 1)


def coverage(mask: Array) -> float:
    """Share of the photo the person covers (mask above one half)."""
    return float((mask > 0.5).mean())


def parse_color(text: str) -> tuple[int, int, int]:
    """RRGGBB (with or without #) -> (r, g, b); ValueError with the reason."""
    t = text.strip().lstrip("#")
    if len(t) != 6:
        raise ValueError(f"color must be six hex digits RRGGBB, got {text!r}")
    try:
        v = int(t, 16)
    except ValueError:
        raise ValueError(f"color must be six hex digits RRGGBB, got {text!r}") from None
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def composite(img: Image.Image, mask: Array, mode: str, color: tuple[int, int, int] = DEFAULT_COLOR) -> Image.Image:
    """The transformed photo (same size): the person kept where `mask` is 1.
    Blending is Pillow's uint8 `composite` (not float numpy: 5x faster), and
    the blur runs on a quarter-size copy (the background is to be blurry)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    alpha = Image.fromarray((mask * 255 + 0.5).astype(np.uint8), mode="L")
    if mode == "cutout":
        out = img.convert("RGBA")
        out.putalpha(alpha)
        return out
    w, h = img.size
    if mode == "blur":
        radius = max(2.0, max(w, h) / 60)
        small = img.resize((max(1, w // 4), max(1, h // 4)), Image.Resampling.BILINEAR, reducing_gap=2.0)
        background = small.filter(ImageFilter.GaussianBlur(radius / 4)).resize((w, h), Image.Resampling.BILINEAR)
    else:
        background = Image.new("RGB", (w, h), color)
    return Image.composite(img, background, alpha)


def choose_format(accept: str | None, mode: str) -> str | None:
    """"png" or "jpeg" for the answer, or None when the client accepts
    neither. `cutout` needs alpha: PNG only. Otherwise the type with the
    higher q in Accept wins; a tie or a wildcard gives JPEG (smaller)."""
    allowed: tuple[str, ...] = ("png",) if mode == "cutout" else ("jpeg", "png")
    if not accept or not accept.strip():
        return allowed[0]
    q: dict[str, float] = {}
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        kind = fields[0].lower()
        weight = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    weight = float(f[2:])
                except ValueError:
                    weight = 0.0
        q[kind] = max(q.get(kind, 0.0), weight)
    wild = max(q.get("*/*", 0.0), q.get("image/*", 0.0))
    scores = {fmt: q.get(f"image/{fmt}", wild) for fmt in allowed}
    best = max(allowed, key=lambda f: scores[f])  # max keeps the first (JPEG) on a tie
    return best if scores[best] > 0 else None


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=1)  # speed over size: the answer is on the latency path
    else:
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()
