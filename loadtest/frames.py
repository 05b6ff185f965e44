"""The frames a stream sends: the sample images or a valid JPEG padded to a
given size."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path

from .client import (
    IMAGE_SUFFIXES,
    SAMPLES,
    UsageError,
)

perf = time.perf_counter



def _com_segments(n: int) -> bytes:
    """JPEG comment (COM) segments adding exactly `n` bytes (n >= 4)."""
    out = bytearray()
    while n > 0:
        payload = min(n - 4, 65533)
        if 0 < n - 4 - payload < 4:  # leave at least a whole segment for the rest
            payload -= 4
        out += b"\xff\xfe" + (payload + 2).to_bytes(2, "big") + bytes(payload)
        n -= payload + 4
    return bytes(out)


def _small_jpeg(limit: int) -> bytes:
    """The sample cat re-encoded, as large as fits in `limit` bytes (or the smallest)."""
    from PIL import Image

    src = Image.open(SAMPLES / "cat.jpg")
    best = b""
    for side in (224, 160, 112, 80, 56, 32, 16, 8):
        im = src.copy()
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=70)
        best = buf.getvalue()
        if len(best) <= limit:
            break
    return best


def jpeg_of_size(size: int) -> bytes:
    """A valid JPEG (the sample cat, so a model server can decode and
    classify it) of `size` bytes: padded with comment segments after SOI,
    or re-encoded smaller first. Below the smallest JPEG (a few hundred
    bytes) it is that JPEG, a little larger than asked."""
    base = (SAMPLES / "cat.jpg").read_bytes()
    if len(base) + 4 > size:
        base = _small_jpeg(size - 4)
    pad = size - len(base)
    if pad < 4:
        return base
    return base[:2] + _com_segments(pad) + base[2:]


def load_frames(images: Sequence[str] | None, frame_bytes: int | None) -> list[tuple[str, bytes]]:
    """(name, bytes) of the frames to cycle through."""
    if frame_bytes is not None:
        return [(f"generated-{frame_bytes}.jpg", jpeg_of_size(frame_bytes))]
    paths = [Path(p) for p in images] if images else [SAMPLES]
    out: list[tuple[str, bytes]] = []
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"--images {p}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend((f.name, f.read_bytes()) for f in files)
        elif p.is_file():
            try:
                out.append((p.name, p.read_bytes()))
            except OSError as exc:
                raise UsageError(f"--images {p}: {exc.strerror or exc}") from None
        else:
            raise UsageError(f"--images {p}: no such file or directory")
    return out
