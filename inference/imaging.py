"""Image bytes to a model input: decode with a decompression-bomb guard, then
resize, centre-crop and normalise. Every way an upload can be wrong becomes a
BadImage with an HTTP status and a reason a person can act on."""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .models import Preprocess

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7700 x 5200 photo; far beyond what a classifier needs


# 16-bit and float images: Pillow's convert("RGB") clips them instead of scaling.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def _to_8bit(img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    if img.mode.startswith("I;16"):
        a = a / 257.0
    else:  # 32-bit int or float: no fixed range, stretch what is there
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


class BadImage(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Prepared:
    array: np.ndarray[Any, Any]  # HWC float32
    decode_s: float
    preprocess_s: float
    width: int
    height: int


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    return decode_sized(data, max_pixels, draft)[0]


def decode_sized(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded RGB image and the size of the image sent: with `draft`, a
    large JPEG decodes at a reduced DCT scale, smaller than it was sent."""
    if not data:
        raise BadImage(400, "empty body: send the raw image bytes (JPEG, PNG, WebP, BMP, GIF or TIFF)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise BadImage(400, f"image has impossible dimensions {w}x{h}")
            if w * h > max_pixels:
                raise BadImage(413, f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}; "
                                    "downscale it before sending")
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))  # decode at a reduced DCT scale when the photo is large
            img.load()
            out: Image.Image = _to_8bit(img) if img.mode in HIGH_DEPTH_MODES else img
            return (out.convert("RGB") if out.mode != "RGB" else out), (w, h)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(415, "not an image in a supported format (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(413, f"image rejected as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImage(400, f"corrupt or truncated image: {exc}") from None


def preprocess(img: Image.Image, spec: Preprocess) -> np.ndarray[Any, Any]:
    w, h = img.size
    scale = spec.resize / min(w, h)
    rw, rh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=3.0 if scale < 0.5 else None)
    left, top = (rw - spec.size) // 2, (rh - spec.size) // 2
    img = img.crop((left, top, left + spec.size, top + spec.size))
    x = np.asarray(img, dtype=np.float32)
    if spec.bgr:
        x = x[..., ::-1]
    x = (x - np.float32(spec.mean)) * np.float32(spec.scale)
    return np.ascontiguousarray(x)


def prepare(data: bytes, spec: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    t0 = time.perf_counter()
    img, (w, h) = decode_sized(data, max_pixels, draft=spec.resize)
    t1 = time.perf_counter()
    x = preprocess(img, spec)
    return Prepared(x, t1 - t0, time.perf_counter() - t1, w, h)
