"""`POST /detect` (boxes as JSON) and `POST /transform` (an image out): the
other two model kinds over HTTP, the way `POST /photo` classifies. Decoding
and image work run on the decode pool, forward passes through the kind's own
batcher on the inference thread; every answer has Server-Timing, and bad
input is the same problem answer as on /photo."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from .answers import error, server_timing
from .batcher import Batcher, BatchResult, QueueFull
from .imaging import BadImage
from .segmenter import (
    DEFAULT_COLOR,
    MODES,
    choose_format,
    composite,
    coverage,
    encode,
    full_mask,
    parse_color,
)
from .state import REQUEST_ID, STATE, State
from .uploads import read_image

MAX_DETECTIONS = 100  # default of ?max=
FORMAT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


class BadQuery(Exception):
    pass


def query_number(request: web.Request, name: str, default: float, lo: float, hi: float, kind: type = float) -> Any:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise BadQuery(f"?{name}= must be a {'whole ' if kind is int else ''}number from {lo:g} to {hi:g}, "
                       f"got {text!r}") from None
    if not lo <= value <= hi:
        raise BadQuery(f"?{name}= must be from {lo:g} to {hi:g}, got {text!r}")
    return value


def _not_served(kind: str, rid: str | None) -> web.Response:
    return error(404, f"this server does not {kind}; start it with --kinds including {kind} (INFER_KINDS)",
                 code="kind_not_served", request_id=rid)


async def _run(request: web.Request, st: State, kind: str, model: Any,
               batcher: Batcher | None) -> tuple[Any, BatchResult] | web.Response:
    """The request's image read, prepared for `model` on the decode pool and
    run through the kind's batcher: (prepared, result), or the error answer
    (bad image, still loading, busy), counted under the kind."""
    rid = request.get(REQUEST_ID)
    count = st.metrics.kind_requests.labels
    try:
        data = await read_image(request, st.config.max_body_bytes)
        if model is None or batcher is None:
            count(kind, "503").inc()
            return error(503, "model is still loading; retry shortly", {"Retry-After": "1"}, request_id=rid)
        loop = asyncio.get_running_loop()
        prep = await loop.run_in_executor(st.decode_pool, model.prepare, data, st.config.max_pixels)
    except BadImage as exc:
        count(kind, str(exc.status)).inc()
        return error(exc.status, exc.reason, request_id=rid)
    try:
        return prep, await batcher.submit(prep.array)
    except QueueFull as exc:
        count(kind, "503").inc()
        return error(503, f"server busy: {exc}; retry shortly", {"Retry-After": "1"}, request_id=rid)


async def detect(request: web.Request) -> web.StreamResponse:
    t0 = time.perf_counter()
    st = request.app[STATE]
    rid = request.get(REQUEST_ID)
    if st.vision.detector is None:
        return _not_served("detect", rid)
    m = st.metrics.kind_requests
    det, batcher = st.detector, st.detect_batcher
    try:
        min_score = query_number(request, "min_score", st.vision.detector.spec.min_score, 0.0, 1.0)
        max_out = query_number(request, "max", MAX_DETECTIONS, 1, 1000, int)
    except BadQuery as exc:
        m.labels("detect", "400").inc()
        return error(400, str(exc), code="bad_query", request_id=rid)
    ran = await _run(request, st, "detect", det, batcher)
    if isinstance(ran, web.Response):
        return ran
    prep, res = ran
    assert det is not None
    t_post = time.perf_counter()
    found = det.decode(res.probs, prep.geometry, min_score, max_out)
    resp = web.json_response({"detections": found, "model": det.model, "backend": det.backend,
                              "image": {"width": prep.width, "height": prep.height}, "batch_size": res.batch_size})
    t_end = time.perf_counter()
    resp.headers["Server-Timing"] = server_timing([
        ("decode", prep.decode_s), ("preprocess", prep.preprocess_s), ("queue", res.queue_s),
        ("infer", res.infer_s), ("postprocess", t_end - t_post), ("app", t_end - t0)])
    m.labels("detect", "200").inc()
    st.metrics.kind_latency.labels("detect").observe(t_end - t0)
    return resp


def finish_transform(image: Any, mask_row: Any, mode: str, color: tuple[int, int, int],
            fmt: str) -> tuple[bytes, float, float, float]:
    """On the decode pool: the mask at full size, the composite, the encoded
    answer. Returns (bytes, coverage, postprocess s, encode s)."""
    t0 = time.perf_counter()
    mask = full_mask(mask_row, image.size[0], image.size[1])
    out = composite(image, mask, mode, color)
    t1 = time.perf_counter()
    data = encode(out, fmt)
    return data, coverage(mask), t1 - t0, time.perf_counter() - t1


async def transform(request: web.Request) -> web.StreamResponse:
    t0 = time.perf_counter()
    st = request.app[STATE]
    rid = request.get(REQUEST_ID)
    if st.vision.segmenter is None:
        return _not_served("transform", rid)
    m = st.metrics.kind_requests
    seg, batcher = st.segmenter, st.transform_batcher
    mode = request.query.get("mode", "blur")
    if mode not in MODES:
        m.labels("transform", "400").inc()
        return error(400, f"?mode= must be one of {', '.join(MODES)}, got {mode!r}", code="bad_query", request_id=rid)
    try:
        color = parse_color(request.query["color"]) if "color" in request.query else DEFAULT_COLOR
    except ValueError as exc:
        m.labels("transform", "400").inc()
        return error(400, f"?color=: {exc}", code="bad_query", request_id=rid)
    fmt = choose_format(request.headers.get("Accept"), mode)
    if fmt is None:
        m.labels("transform", "406").inc()
        offered = "image/png" if mode == "cutout" else "image/jpeg or image/png"
        return error(406, f"the answer is an image ({offered}{' with alpha' if mode == 'cutout' else ''}); "
                          "accept it in the Accept header", code="not_acceptable", request_id=rid)
    ran = await _run(request, st, "transform", seg, batcher)
    if isinstance(ran, web.Response):
        return ran
    prep, res = ran
    assert seg is not None
    loop = asyncio.get_running_loop()
    data, covered, post_s, encode_s = await loop.run_in_executor(
        st.decode_pool, finish_transform, prep.image, res.probs, mode, color, fmt)
    t_end = time.perf_counter()
    resp = web.Response(body=data, content_type=FORMAT_TYPES[fmt], headers={
        "X-Mask-Coverage": f"{covered:.4f}", "X-Model": seg.model, "Vary": "Accept",
        "Server-Timing": server_timing([
            ("decode", prep.decode_s), ("preprocess", prep.preprocess_s), ("queue", res.queue_s),
            ("infer", res.infer_s), ("postprocess", post_s), ("encode", encode_s), ("app", t_end - t0)])})
    m.labels("transform", "200").inc()
    st.metrics.kind_latency.labels("transform").observe(t_end - t0)
    return resp
