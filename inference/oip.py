"""The Open Inference Protocol (OIP, "v2", KServe / Triton) over HTTP/REST:
health, server and model metadata, the repository index and inference, with
the classification extension and the binary tensor data extension. Every
model the server loads is in the index: the classifier, the detector and the
transformer (`--kinds`); the last two are `oipkinds.py`.

The classifier takes either input, never both in one request:
- `image`: BYTES, shape [N] (or [N, 1]): N encoded images (JPEG, PNG, ...),
  decoded and preprocessed exactly as for `POST /photo`;
- `input`: FP32, shape [N, S, S, 3]: a tensor already preprocessed in the
  model's layout (`models.Preprocess`: NHWC, RGB or BGR, (pixel - mean) * scale).
Output `scores`: FP32 [N, classes], the softmax probabilities; with
`"parameters": {"classification": k}` BYTES [N, k] of "score:index:label".

A request with N images submits N images to the model's batcher (the same
as `/photo`, `/detect`, `/transform` and `/stream`), and answers with the
same Server-Timing phases. Errors on /v2 are OIP's `{"error": "..."}` (the
one exception to the problem-details shape). Parsing and encoding are pure
(`oipcodec.py`); the handlers here are thin.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

import numpy as np
from aiohttp import web

from .answers import server_timing
from .imaging import prepare
from .models import Classifier
from .oipcodec import (
    HEADER_LENGTH,
    SCORES,
    VERSION,
    OipError,
    encode_answer,
    model_metadata,
    parse_infer,
    split_body,
)
from .oipkinds import (
    DETECT_OUTPUTS,
    TRANSFORM_OUTPUTS,
    batch_phases,
    detector_metadata,
    infer_detect,
    infer_transform,
    input_phases,
    prepare_all,
    segmenter_metadata,
    submit_all,
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


def served(st: State) -> dict[str, tuple[str, Any]]:
    """Every model this server serves, loaded or not: name -> (kind, the
    loaded model or None)."""
    out: dict[str, tuple[str, Any]] = {}
    if st.serves_classify:
        out[st.plan.model] = ("classify", st.classifier)
    if st.vision.detector is not None:
        out[st.vision.detector.spec.name] = ("detect", st.detector)
    if st.vision.segmenter is not None:
        out[st.vision.segmenter.spec.name] = ("transform", st.segmenter)
    return out


def _model(request: web.Request) -> tuple[State, str, Any]:
    """The loaded model named in the path and its kind, or the OIP error why not."""
    st = request.app[STATE]
    name = request.match_info["model"]
    models = served(st)
    if name not in models:
        names = ", ".join(f"'{n}'" for n in models)
        raise OipError(404, f"unknown model '{name}'; this server serves {names}")
    version = request.match_info.get("version")
    if version is not None and version != VERSION:
        raise OipError(404, f"unknown version '{version}' of model '{name}'; it has version '{VERSION}'")
    kind, model = models[name]
    if model is None:
        why = f"model '{name}' failed to load: {st.load_error}" if st.load_error else f"model '{name}' is loading"
        raise OipError(503, why, {"Retry-After": "1"})
    return st, kind, model


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
    if not st.ready:
        why = f"model failed to load: {st.load_error}" if st.load_error else "model is loading"
        return error(503, why, {"Retry-After": "1"})
    return web.Response(status=200)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "edge-inference", "version": _version(), "extensions": EXTENSIONS})


async def repository_index(request: web.Request) -> web.Response:
    st = request.app[STATE]
    index = []
    for name, (_, model) in served(st).items():
        entry = {"name": name, "version": VERSION, "state": "READY" if model is not None else "LOADING"}
        if model is None and st.load_error:
            entry.update(state="UNAVAILABLE", reason=st.load_error)
        index.append(entry)
    return web.json_response(index)


async def metadata(request: web.Request) -> web.Response:
    _, kind, model = _model(request)
    name = request.match_info["model"]
    if kind == "detect":
        return web.json_response(detector_metadata(model, name))
    if kind == "transform":
        return web.json_response(segmenter_metadata(model, name))
    return web.json_response(model_metadata(model, name))


async def model_ready(request: web.Request) -> web.Response:
    _model(request)
    return web.Response(status=200)


async def infer(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    st, kind, model = _model(request)
    body = await request.read()
    if request.headers.get("Content-Encoding", "identity") != "identity":
        raise OipError(400, f"Content-Encoding {request.headers['Content-Encoding']!r} is not supported; send the "
                            "request uncompressed")
    doc, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    name = request.match_info["model"]
    if kind == "classify":
        payload, head_len, timing, n = await _classify(st, model, name, doc, binary, time.perf_counter())
    else:
        req = parse_infer(doc, binary, None, DETECT_OUTPUTS if kind == "detect" else TRANSFORM_OUTPUTS)
        run = infer_detect if kind == "detect" else infer_transform
        payload, head_len, timing = await run(st, model, name, req)
        n = req.batch
    resp = web.Response(body=payload, content_type=BINARY_TYPE if head_len is not None else JSON_TYPE)
    if head_len is not None:
        resp.headers[HEADER_LENGTH] = str(head_len)
    resp.headers["Server-Timing"] = server_timing([*timing, ("app", time.perf_counter() - t0)])
    m = st.metrics
    m.oip_requests.labels("200").inc()
    m.oip_images.inc(n)
    return resp


async def _classify(st: State, clf: Classifier, name: str, doc: dict[str, Any], binary: bytes,
                    t_parse: float) -> tuple[bytes, int | None, list[tuple[str, float]], int]:
    req = parse_infer(doc, binary, clf.preprocess.size, (SCORES,))
    t_in = time.perf_counter()
    if req.images is not None:
        preps = await prepare_all(st, lambda data: prepare(data, clf.preprocess, st.config.max_pixels), req.images)
        t_ready = time.perf_counter()
        arrays = [p.array for p in preps]
        decode_s, preprocess_s = input_phases(preps, t_ready - t_in)
    else:
        assert req.tensor is not None
        arrays = list(req.tensor)
        decode_s, preprocess_s = t_in - t_parse, 0.0  # the tensor parsed from the request is its decode
        t_ready = time.perf_counter()
    assert st.batcher is not None
    results = await submit_all(st, st.batcher, arrays)
    t_post = time.perf_counter()
    queue_s, infer_s = batch_phases(results, t_post - t_ready)
    probs = np.stack([r.probs for r in results])
    payload, head_len = encode_answer(name, req.id, req.outputs, clf, probs)
    st.metrics.queue.observe(queue_s)
    timing = [("decode", decode_s), ("preprocess", preprocess_s), ("queue", queue_s), ("infer", infer_s),
              ("postprocess", time.perf_counter() - t_post)]
    return payload, head_len, timing, len(results)


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
