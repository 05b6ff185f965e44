"""The pictures of docs/inference.md for detection and transformation, drawn
from the real models on scikit-image's photos: decoded boxes (the model's in
colour, the hand-measured reference of the tests in white) and the three
transformations of `astronaut`. Needs the files of `make weights`.

    python bench/vision_figures.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw  # noqa: E402

from inference.detectors import draw_boxes, resolve_detector  # noqa: E402
from inference.segmenter import composite, full_mask, resolve_segmenter  # noqa: E402
from inference.weights import WeightsSettings  # noqa: E402

# The hand-measured boxes of tests/inference/test_vision.py.
REFERENCE = {"chelsea": (15.0, 0.0, 385.0, 300.0), "astronaut": (175.0, 70.0, 275.0, 180.0)}
HEIGHT = 300


def photo(name: str) -> tuple[Image.Image, bytes]:
    import skimage.data
    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return img, buf.getvalue()


def row(images: list[Image.Image]) -> Image.Image:
    scaled = [im.resize((round(im.size[0] * HEIGHT / im.size[1]), HEIGHT)) for im in images]
    out = Image.new("RGB", (sum(im.size[0] for im in scaled) + 8 * (len(scaled) - 1), HEIGHT), (255, 255, 255))
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.size[0] + 8
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    a = p.parse_args()
    out = Path(a.out)
    directory = WeightsSettings().path()
    ssd = resolve_detector("ssd-mobilenet-v2", directory).load(1)
    face = resolve_detector("blazeface", directory).load(1)
    panels = []
    for name, detectors in (("chelsea", [ssd]), ("astronaut", [ssd, face]), ("coffee", [ssd])):
        img, data = photo(name)
        found = []
        for det in detectors:
            prep = det.prepare(data, 40_000_000)
            found += det.decode(det.predict(prep.array[None])[0], prep.geometry, det.spec.min_score, 10)
        drawn = draw_boxes(img, found)
        if name in REFERENCE:
            ImageDraw.Draw(drawn).rectangle(REFERENCE[name], outline=(255, 255, 255), width=1)
        panels.append(drawn)
        print(name, [(d["label"], d["score"], d["box"]) for d in found])
    row(panels).quantize(256).save(out / "detections.png", optimize=True)

    seg = resolve_segmenter("selfie-segmentation", directory).load(1)
    img, data = photo("astronaut")
    prep = seg.prepare(data, 40_000_000)
    mask = full_mask(seg.predict(prep.array[None])[0], *img.size)
    checker = Image.new("RGB", img.size, (200, 200, 200))
    draw = ImageDraw.Draw(checker)
    for y in range(0, img.size[1], 32):
        for x in range((y // 32 % 2) * 32, img.size[0], 64):
            draw.rectangle((x, y, x + 31, y + 31), fill=(255, 255, 255))
    cut = composite(img, mask, "cutout")
    checker.paste(cut, (0, 0), cut)
    row([img, composite(img, mask, "blur"), composite(img, mask, "replace"), checker]).quantize(256).save(
        out / "transform.png", optimize=True)
    print("wrote", out / "detections.png", out / "transform.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
