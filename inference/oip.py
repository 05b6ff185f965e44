"""The Open Inference Protocol (OIP, "v2", KServe / Triton) over HTTP/REST:
health, server and model metadata, the repository index and inference, with
the classification extension and the binary tensor data extension.

The model takes either input, never both in one request:
- `image`: BYTES, shape [N] (or [N, 1]): N encoded images (JPEG, PNG, ...),
  decoded and preprocessed exactly as for `POST /photo`;
- `input`: FP32, shape [N, S, S, 3]: a tensor already preprocessed in the
  model's layout (`models.Preprocess`: NHWC, RGB or BGR, (pixel - mean) * scale).
Output `scores`: FP32 [N, classes], the softmax probabilities; with
`"parameters": {"classification": k}` BYTES [N, k] of "score:index:label".

A request with N images submits N images to the same batcher as `/photo` and
`/stream`, and answers with the same Server-Timing phases. Errors on /v2 are
OIP's `{"error": "..."}` (the one exception to the problem-details shape).
Parsing and encoding are pure (`oipcodec.py`); the handlers here are thin.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from typing import Any

import numpy as np
from aiohttp import web

from .answers import server_timing
from .batcher import BatchResult, QueueFull
from .imaging import BadImage, Prepared, prepare
from .models import Classifier
from .oipcodec import (
    HEADER_LENGTH,
    IMAGE,
    VERSION,
    OipError,
    encode_answer,
    model_metadata,
    parse_infer,
    split_body,
)
from .state import STATE, State

EXTENSIONS = ["classification", "binary_tensor_data"]
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """OIP's error answer: `{"error": "<message>"}`."""
    return web.json_response({"error": message}, status=status, headers=headers)


# ---------------------------------------------------------------- handlers

def _version() -> str:
    try:
        return importlib.metadata.version("edge-inference-relay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _model(request: web.Request) -> tuple[State, Classifier]:
    """The loaded model named in the path, or the OIP error why not."""
    st = request.app[STATE]
    name = request.match_info["model"]
    if name != st.plan.model:
        raise OipError(404, f"unknown model '{name}'; this server serves '{st.plan.model}'")
    version = request.match_info.get("version")
    if version is not None and version != VERSION:
        raise OipError(404, f"unknown version '{version}' of model '{name}'; it has version '{VERSION}'")
    if st.classifier is None:
        why = f"model '{name}' failed to load: {st.load_error}" if st.load_error else f"model '{name}' is loading"
        raise OipError(503, why, {"Retry-After": "1"})
    return st, st.classifier


def _guard(handler: Any) -> Any:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except OipError as exc:
            if request.path.endswith("/infer"):
                request.app[STATE].metrics.oip_requests.labels(str(exc.status)).inc()
            return error(exc.status, exc.message, exc.headers)
    return wrapped


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.classifier is None:
        why = f"model failed to load: {st.load_error}" if st.load_error else "model is loading"
        return error(503, why, {"Retry-After": "1"})
    return web.Response(status=200)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "edge-inference", "version": _version(), "extensions": EXTENSIONS})


async def repository_index(request: web.Request) -> web.Response:
    st = request.app[STATE]
    entry = {"name": st.plan.model, "version": VERSION, "state": "READY" if st.classifier else "LOADING"}
    if st.classifier is None and st.load_error:
        entry.update(state="UNAVAILABLE", reason=st.load_error)
    return web.json_response([entry])


async def metadata(request: web.Request) -> web.Response:
    _, clf = _model(request)
    return web.json_response(model_metadata(clf, request.match_info["model"]))


async def model_ready(request: web.Request) -> web.Response:
    _model(request)
    return web.Response(status=200)


def _prepare_one(i: int, data: bytes, clf: Classifier, max_pixels: int) -> Prepared:
    try:
        return prepare(data, clf.preprocess, max_pixels)
    except BadImage as exc:
        raise OipError(413 if exc.status == 413 else 400, f"input '{IMAGE}' element {i}: {exc.reason}") from None


async def _prepare_all(st: State, clf: Classifier, images: list[bytes]) -> list[Prepared]:
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(st.decode_pool, _prepare_one, i, data, clf, st.config.max_pixels)
            for i, data in enumerate(images)]
    try:
        return list(await asyncio.gather(*jobs))
    finally:
        for j in jobs:
            j.cancel()  # a bad image: the rest are not decoded for nothing


async def _submit_all(st: State, arrays: list[np.ndarray[Any, Any]]) -> list[BatchResult]:
    batcher = st.batcher
    assert batcher is not None
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


async def infer(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    st, clf = _model(request)
    body = await request.read()
    if request.headers.get("Content-Encoding", "identity") != "identity":
        raise OipError(400, f"Content-Encoding {request.headers['Content-Encoding']!r} is not supported; send the "
                            "request uncompressed")
    doc, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    t_parse = time.perf_counter()
    req = parse_infer(doc, binary, clf.preprocess.size)
    t_in = time.perf_counter()
    if req.images is not None:
        preps = await _prepare_all(st, clf, req.images)
        t_ready = time.perf_counter()
        arrays = [p.array for p in preps]
        dec, pre = sum(p.decode_s for p in preps), sum(p.preprocess_s for p in preps)
        if len(preps) == 1:
            decode_s, preprocess_s = dec, pre
        else:  # decoded in parallel: the stage's wall time, split by the work's shares
            stage = t_ready - t_in
            decode_s = stage * dec / (dec + pre) if dec + pre > 0 else 0.0
            preprocess_s = stage - decode_s
    else:
        assert req.tensor is not None
        arrays = list(req.tensor)
        decode_s, preprocess_s = t_in - t_parse, 0.0  # the tensor parsed from the request is its decode
        t_ready = time.perf_counter()
    results = await _submit_all(st, arrays)
    t_post = time.perf_counter()
    if len(results) == 1:
        queue_s, infer_s = results[0].queue_s, results[0].infer_s
    else:  # the wait for the first forward pass, then until the last image's pass ended
        queue_s = min(r.queue_s for r in results)
        infer_s = max(0.0, t_post - t_ready - queue_s)
    probs = np.stack([r.probs for r in results])
    payload, head_len = encode_answer(request.match_info["model"], req.id, req.outputs, clf, probs)
    resp = web.Response(body=payload, content_type=BINARY_TYPE if head_len is not None else JSON_TYPE)
    if head_len is not None:
        resp.headers[HEADER_LENGTH] = str(head_len)
    t_end = time.perf_counter()
    app_s = t_end - t0
    resp.headers["Server-Timing"] = server_timing([
        ("decode", decode_s), ("preprocess", preprocess_s), ("queue", queue_s), ("infer", infer_s),
        ("postprocess", t_end - t_post), ("app", app_s)])
    m = st.metrics
    m.oip_requests.labels("200").inc()
    m.oip_images.inc(len(results))
    m.queue.observe(queue_s)
    return resp


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2/health/live", _guard(live))
    r.add_get("/v2/health/ready", _guard(ready))
    r.add_get("/v2", _guard(server_metadata))
    r.add_post("/v2/repository/index", _guard(repository_index))
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(prefix, _guard(metadata))
        r.add_get(prefix + "/ready", _guard(model_ready))
        r.add_post(prefix + "/infer", _guard(infer))
