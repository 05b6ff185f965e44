"""What `GET /stream` does with one frame, per model kind: `?model=` names a
loaded model (the classifier, the detector or the segmenter; unset: the
classifier, or the only model loaded), and the stream runs that model's
frame function. Each returns the frame's JSON answer (without `seq`, which
the scheduler adds). A transformation answer also carries the transformed
image under `IMAGE_KEY`: the writer sends the JSON text message, then the
image as one binary message.

Query parameters besides `model`: detection `min_score`, `max` (as POST
/detect); transformation `mode`, `color` (as POST /transform) and `format`
(`jpeg` or `png`; a WebSocket has no Accept header; cutout is always png)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .answers import classification, error
from .imaging import prepare
from .segmenter import DEFAULT_COLOR, MODES, parse_color
from .state import State
from .vision_routes import MAX_DETECTIONS, BadQuery, finish_transform, query_number

FrameRun = Callable[[bytes, float], Awaitable[dict[str, Any]]]
IMAGE_KEY = "_image"  # bytes of a transformation's answer image; never sent as JSON


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def choose(st: State, request: web.Request) -> FrameRun | web.Response:
    """The frame function of the stream `request` asks for, or the error
    answer (before the upgrade) when the model is not here or a parameter is
    wrong."""
    loaded = {m.model: kind for kind, m in (("classify", st.classifier), ("detect", st.detector),
                                            ("transform", st.segmenter)) if m is not None}
    model = request.query.get("model")
    if not st.ready:
        return error(503, "model is still loading; retry shortly", {"Retry-After": "1"})
    if model is None:
        kind = "classify" if "classify" in loaded.values() else next(iter(loaded.values()))
    elif model in loaded:
        kind = loaded[model]
    else:
        names = ", ".join(repr(n) for n in loaded)
        return error(404, f"model {model!r} is not loaded here; this server runs {names}")
    try:
        if kind == "detect":
            return _detect(st, request)
        if kind == "transform":
            return _transform(st, request)
    except BadQuery as exc:
        return error(400, str(exc), code="bad_query")
    return _classify(st)


def _classify(st: State) -> FrameRun:
    clf, batcher = st.classifier, st.batcher
    assert clf is not None and batcher is not None
    loop = asyncio.get_running_loop()

    async def run(data: bytes, received: float) -> dict[str, Any]:
        prep = await loop.run_in_executor(st.decode_pool, prepare, data, clf.preprocess, st.config.max_pixels)
        res = await batcher.submit(prep.array)
        t_post = time.perf_counter()
        answer = {**classification(clf, res.probs), "model": clf.model, "backend": clf.backend,
                  "batch_size": res.batch_size}
        t_end = time.perf_counter()
        answer["timing"] = {"decode": _ms(prep.decode_s), "preprocess": _ms(prep.preprocess_s),
                            "queue": _ms(res.queue_s), "infer": _ms(res.infer_s),
                            "postprocess": _ms(t_end - t_post), "app": _ms(t_end - received)}
        st.metrics.queue.observe(res.queue_s)
        return answer
    return run


def _detect(st: State, request: web.Request) -> FrameRun:
    det, batcher = st.detector, st.detect_batcher
    assert det is not None and batcher is not None
    min_score = query_number(request, "min_score", det.spec.min_score, 0.0, 1.0)
    max_out = query_number(request, "max", MAX_DETECTIONS, 1, 1000, int)
    loop = asyncio.get_running_loop()

    async def run(data: bytes, received: float) -> dict[str, Any]:
        prep = await loop.run_in_executor(st.decode_pool, det.prepare, data, st.config.max_pixels)
        res = await batcher.submit(prep.array)
        t_post = time.perf_counter()
        found = det.decode(res.probs, prep.geometry, min_score, max_out)
        t_end = time.perf_counter()
        return {"detections": found, "model": det.model, "backend": det.backend,
                "image": {"width": prep.width, "height": prep.height}, "batch_size": res.batch_size,
                "timing": {"decode": _ms(prep.decode_s), "preprocess": _ms(prep.preprocess_s),
                           "queue": _ms(res.queue_s), "infer": _ms(res.infer_s),
                           "postprocess": _ms(t_end - t_post), "app": _ms(t_end - received)}}
    return run


def _transform(st: State, request: web.Request) -> FrameRun:
    seg, batcher = st.segmenter, st.transform_batcher
    assert seg is not None and batcher is not None
    mode = request.query.get("mode", "blur")
    if mode not in MODES:
        raise BadQuery(f"?mode= must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        color = parse_color(request.query["color"]) if "color" in request.query else DEFAULT_COLOR
    except ValueError as exc:
        raise BadQuery(f"?color=: {exc}") from None
    fmt = request.query.get("format", "png" if mode == "cutout" else "jpeg")
    if fmt not in ("jpeg", "png") or (mode == "cutout" and fmt != "png"):
        raise BadQuery(f"?format= must be jpeg or png (cutout: png), got {fmt!r}")
    loop = asyncio.get_running_loop()

    async def run(data: bytes, received: float) -> dict[str, Any]:
        prep = await loop.run_in_executor(st.decode_pool, seg.prepare, data, st.config.max_pixels)
        res = await batcher.submit(prep.array)
        body, covered, post_s, encode_s = await loop.run_in_executor(
            st.decode_pool, finish_transform, prep.image, res.probs, mode, color, fmt)
        t_end = time.perf_counter()
        return {"model": seg.model, "backend": seg.backend, "mode": mode, "format": fmt,
                "mask_coverage": round(covered, 4), "bytes": len(body),
                "image": {"width": prep.width, "height": prep.height}, "batch_size": res.batch_size,
                "timing": {"decode": _ms(prep.decode_s), "preprocess": _ms(prep.preprocess_s),
                           "queue": _ms(res.queue_s), "infer": _ms(res.infer_s), "postprocess": _ms(post_s),
                           "encode": _ms(encode_s), "app": _ms(t_end - received)},
                IMAGE_KEY: body}
    return run
