"""OIP v2 inference for the detector and the transformer, and what every
kind's `/v2/.../infer` shares: decoding the N images of a request on the
decode pool, submitting them to the model's own batcher, and turning the
per-image phases into the request's Server-Timing.

The detector takes `image` (BYTES [N]) and answers named tensors, K being
the most detections any image of the request has (the rest padded):
`boxes` FP32 [N, K, 4] (x0, y0, x1, y1 in pixels of the image sent),
`scores` FP32 [N, K] (padding 0), `classes` INT32 [N, K] (class ids;
padding -1), `labels` BYTES [N, K] (padding ""), `count` INT32 [N].
Request parameters `min_score` (0-1) and `max` (1-1000), as on /detect.

The transformer takes `image` and answers `transformed` BYTES [N] (each the
encoded image, same size as sent) and `mask_coverage` FP32 [N]. Request
parameters `mode` (blur, replace, cutout), `format` (jpeg, png; cutout:
png) and `color` (RRGGBB for replace), as on /transform.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batcher import Batcher, BatchResult, QueueFull
from .detectors import Detector
from .imaging import BadImage
from .oipcodec import IMAGE, VERSION, InferRequest, OipError, Tensor, encode_tensors
from .segmenter import DEFAULT_COLOR, MODES, Segmenter, parse_color
from .state import State
from .vision_routes import MAX_DETECTIONS, finish_transform

DETECT_OUTPUTS = ("boxes", "scores", "classes", "labels", "count")
TRANSFORM_OUTPUTS = ("transformed", "mask_coverage")
IMAGE_INPUT = {"name": IMAGE, "datatype": "BYTES", "shape": [-1],
               "parameters": {"content": "encoded images, one per element: JPEG, PNG, WebP, BMP, GIF or TIFF"}}


# ---------------------------------------------------------------- shared by every kind

def _prepare_one(i: int, data: bytes, prepare: Callable[[bytes], Any]) -> Any:
    try:
        return prepare(data)
    except BadImage as exc:
        raise OipError(413 if exc.status == 413 else 400, f"input '{IMAGE}' element {i}: {exc.reason}") from None


async def prepare_all(st: State, prepare: Callable[[bytes], Any], images: list[bytes]) -> list[Any]:
    """Each image decoded and prepared on the decode pool; the first bad one
    is the request's 400 (or 413)."""
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(st.decode_pool, _prepare_one, i, data, prepare) for i, data in enumerate(images)]
    try:
        return list(await asyncio.gather(*jobs))
    finally:
        for j in jobs:
            j.cancel()  # a bad image: the rest are not decoded for nothing


async def submit_all(st: State, batcher: Batcher, arrays: list[np.ndarray[Any, Any]]) -> list[BatchResult]:
    limit = st.config.max_queue
    if len(arrays) > limit:
        raise OipError(400, f"a batch of {len(arrays)} exceeds this server's queue of {limit}; send at most "
                            f"{limit} per request")
    if batcher.depth + len(arrays) > limit:
        raise OipError(503, f"server busy: {batcher.depth} images queued; retry shortly", {"Retry-After": "1"})
    tasks = [asyncio.ensure_future(batcher.submit(x)) for x in arrays]
    try:
        return list(await asyncio.gather(*tasks))
    except QueueFull as exc:
        raise OipError(503, f"server busy: {exc}; retry shortly", {"Retry-After": "1"}) from None
    finally:
        for t in tasks:
            t.cancel()  # no-op once done; drops the rest from the queue if one failed


def input_phases(preps: list[Any], stage_s: float) -> tuple[float, float]:
    """(decode, preprocess) of a request's images: one image's own phases;
    for N decoded in parallel, the stage's wall time split by the work's shares."""
    dec, pre = sum(p.decode_s for p in preps), sum(p.preprocess_s for p in preps)
    if len(preps) == 1:
        return dec, pre
    decode_s = stage_s * dec / (dec + pre) if dec + pre > 0 else 0.0
    return decode_s, stage_s - decode_s


def batch_phases(results: list[BatchResult], since_ready_s: float) -> tuple[float, float]:
    """(queue, infer): one image's own; for N, the wait for the first forward
    pass, then until the last image's pass ended."""
    if len(results) == 1:
        return results[0].queue_s, results[0].infer_s
    queue_s = min(r.queue_s for r in results)
    return queue_s, max(0.0, since_ready_s - queue_s)


# ---------------------------------------------------------------- parameters

def _number(params: dict[str, Any], name: str, default: float, lo: float, hi: float, whole: bool = False) -> Any:
    v = params.get(name, default)
    ok = isinstance(v, int) if whole else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        raise OipError(400, f"parameter '{name}' must be a {'whole ' if whole else ''}number from {lo:g} to "
                            f"{hi:g}, got {v!r}")
    return v


@dataclass(frozen=True)
class TransformParams:
    mode: str
    fmt: str
    color: tuple[int, int, int]


def transform_params(params: dict[str, Any]) -> TransformParams:
    mode = params.get("mode", "blur")
    if mode not in MODES:
        raise OipError(400, f"parameter 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    fmt = params.get("format", "png" if mode == "cutout" else "jpeg")
    if fmt not in ("jpeg", "png") or (mode == "cutout" and fmt != "png"):
        raise OipError(400, f"parameter 'format' must be jpeg or png (cutout: png, for its alpha), got {fmt!r}")
    color = params.get("color")
    try:
        rgb = DEFAULT_COLOR if color is None else parse_color(color) if isinstance(color, str) else None
    except ValueError as exc:
        raise OipError(400, f"parameter 'color': {exc}") from None
    if rgb is None:
        raise OipError(400, f"parameter 'color' must be a string RRGGBB, got {color!r}")
    return TransformParams(mode, fmt, rgb)


# ---------------------------------------------------------------- answers

def detection_tensors(found: list[list[dict[str, Any]]]) -> dict[str, Tensor]:
    """The per-image detection lists as the detector's padded output tensors."""
    n, k = len(found), max((len(f) for f in found), default=0)
    boxes = np.zeros((n, k, 4), np.float32)
    scores = np.zeros((n, k), np.float32)
    classes = np.full((n, k), -1, np.int32)
    labels = [b""] * (n * k)
    for i, dets in enumerate(found):
        for j, d in enumerate(dets):
            boxes[i, j], scores[i, j], classes[i, j] = d["box"], d["score"], d["class_id"]
            labels[i * k + j] = d["label"].encode()
    return {"boxes": Tensor("FP32", [n, k, 4], boxes), "scores": Tensor("FP32", [n, k], scores),
            "classes": Tensor("INT32", [n, k], classes), "labels": Tensor("BYTES", [n, k], labels),
            "count": Tensor("INT32", [n], np.array([len(f) for f in found], np.int32))}


async def _run(st: State, model: Any, batcher: Batcher | None, req: InferRequest,
               ) -> tuple[list[Any], list[BatchResult], list[tuple[str, float]], float]:
    """Decode, prepare and infer every image: (inputs, results, the timing
    phases so far, the time the forward passes ended)."""
    assert req.images is not None and batcher is not None
    t_in = time.perf_counter()
    preps = await prepare_all(st, lambda data: model.prepare(data, st.config.max_pixels), req.images)
    t_ready = time.perf_counter()
    results = await submit_all(st, batcher, [p.array for p in preps])
    t_post = time.perf_counter()
    decode_s, preprocess_s = input_phases(preps, t_ready - t_in)
    queue_s, infer_s = batch_phases(results, t_post - t_ready)
    st.metrics.queue.observe(queue_s)
    return preps, results, [("decode", decode_s), ("preprocess", preprocess_s), ("queue", queue_s),
                            ("infer", infer_s)], t_post


async def infer_detect(st: State, det: Detector, name: str, req: InferRequest) -> tuple[bytes, int | None, list[tuple[str, float]]]:
    """(body, binary header length, Server-Timing phases) of a detector's answer."""
    min_score = _number(req.parameters, "min_score", det.spec.min_score, 0.0, 1.0)
    max_out = _number(req.parameters, "max", MAX_DETECTIONS, 1, 1000, whole=True)
    preps, results, phases, t_post = await _run(st, det, st.detect_batcher, req)
    found = [det.decode(r.probs, p.geometry, min_score, max_out) for p, r in zip(preps, results, strict=True)]
    payload, head_len = encode_tensors(name, req.id, req.outputs, detection_tensors(found))
    return payload, head_len, [*phases, ("postprocess", time.perf_counter() - t_post)]


async def infer_transform(st: State, seg: Segmenter, name: str,
                          req: InferRequest) -> tuple[bytes, int | None, list[tuple[str, float]]]:
    """(body, binary header length, Server-Timing phases) of a transformer's answer:
    compositing (postprocess) and encoding run on the decode pool, in parallel
    for the N images; the phases are their wall-clock shares."""
    p = transform_params(req.parameters)
    preps, results, phases, t_post = await _run(st, seg, st.transform_batcher, req)
    loop = asyncio.get_running_loop()
    done = await asyncio.gather(*(loop.run_in_executor(st.decode_pool, finish_transform, pr.image, r.probs, p.mode,
                                                       p.color, p.fmt) for pr, r in zip(preps, results, strict=True)))
    stage = time.perf_counter() - t_post
    post, enc = sum(d[2] for d in done), sum(d[3] for d in done)
    post_s = stage * post / (post + enc) if post + enc > 0 else 0.0
    values = {"transformed": Tensor("BYTES", [len(done)], [d[0] for d in done], text=False),
              "mask_coverage": Tensor("FP32", [len(done)], np.array([d[1] for d in done], np.float32))}
    payload, head_len = encode_tensors(name, req.id, req.outputs, values)
    return payload, head_len, [*phases, ("postprocess", post_s), ("encode", stage - post_s)]


# ---------------------------------------------------------------- metadata

def detector_metadata(det: Detector, name: str) -> dict[str, Any]:
    return {
        "name": name, "versions": [VERSION], "platform": det.backend,
        "inputs": [IMAGE_INPUT],
        "outputs": [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4],
             "parameters": {"content": "x0, y0, x1, y1 in pixels of the image sent; K = the most detections of "
                                       "any image of the request, the rest padded with 0"}},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "classes", "datatype": "INT32", "shape": [-1, -1], "parameters": {"padding": -1}},
            {"name": "labels", "datatype": "BYTES", "shape": [-1, -1],
             "parameters": {"classes": [lb for lb in det.labels if lb]}},
            {"name": "count", "datatype": "INT32", "shape": [-1]},
        ],
        "parameters": {"min_score": f"0-1, default {det.spec.min_score:g}",
                       "max": f"1-1000, default {MAX_DETECTIONS}"},
    }


def segmenter_metadata(seg: Segmenter, name: str) -> dict[str, Any]:
    return {
        "name": name, "versions": [VERSION], "platform": seg.backend,
        "inputs": [IMAGE_INPUT],
        "outputs": [
            {"name": "transformed", "datatype": "BYTES", "shape": [-1],
             "parameters": {"content": "the encoded transformed image (JPEG or PNG), the size of the one sent; "
                                       "base64 in JSON"}},
            {"name": "mask_coverage", "datatype": "FP32", "shape": [-1],
             "parameters": {"content": "share of the image the person mask covers, 0-1"}},
        ],
        "parameters": {"mode": f"{', '.join(MODES)}; default blur", "format": "jpeg or png; default jpeg "
                       "(cutout: png)", "color": "RRGGBB of replace; default 00B140"},
    }
