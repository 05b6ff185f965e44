"""The inference HTTP service (aiohttp): `GET /`, `POST /photo`, `POST /detect`
and `POST /transform` (`vision_routes.py`), `GET /healthz`, `GET /metrics`,
`GET /stream` (WebSocket, frame by frame; `stream.py`), the browser page
`GET /live` and the Open Inference Protocol under `/v2` (`oip.py`). Decoding runs on a thread pool, forward passes on one
inference thread through the dynamic batcher; the event loop only moves
bytes. Every answer carries Server-Timing and echoes X-Request-ID."""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from httpcontract.request_id import HEADER as REQUEST_ID_HEADER
from httpcontract.request_id import accept as accept_request_id

from . import oip
from .answers import classification, error, server_timing
from .batcher import QueueFull
from .config import ServerConfig
from .imaging import BadImage, prepare
from .models import ModelPlan
from .state import REQUEST_ID, STATE, State, VisionPlans
from .stream import close_streams, stream
from .uploads import read_image
from .vision_routes import detect, transform

log = logging.getLogger("inference")


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    # Echoed only if it is a plain token (as the edge requires); anything else is replaced.
    rid = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = rid
    try:
        resp: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        # Under /v2 errors take the Open Inference Protocol's shape, {"error": ...}.
        resp = (oip.error(exc.status, exc.reason) if request.path.startswith("/v2")
                else error(exc.status, exc.reason, request_id=rid))
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        reason = "internal error; the server logged the details"
        resp = oip.error(500, reason) if request.path.startswith("/v2") else error(500, reason, request_id=rid)
    if not resp.prepared:
        resp.headers[REQUEST_ID_HEADER] = rid
    return resp


async def root(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    addr = f"{peer[0]}:{peer[1]}" if peer else "unknown"
    st = request.app[STATE]
    return web.Response(text=f"requester: {addr}\nhost: {request.host}\nserver: {st.hostname}\n")


async def healthz(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if not st.ready:
        status = "failed" if st.load_error else "loading"
        body = {"status": status, "model": st.plan.model, "backend": st.plan.backend, "models": st.loaded()}
        if st.load_error:
            body["error"] = st.load_error
        return web.json_response(body, status=503, headers={"Retry-After": "1"})
    if st.classifier is not None:
        model, backend = st.classifier.model, st.classifier.backend
    else:  # a server without the classifier names its first other model
        first = st.detector or st.segmenter
        model, backend = (first.model, first.backend) if first else ("none", "none")
    return web.json_response({"status": "ok", "model": model, "backend": backend, "models": st.loaded()})


async def metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.metrics.depth.set(st.batcher.depth if st.batcher else 0)
    return web.Response(body=generate_latest(st.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def photo(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    st = request.app[STATE]
    m = st.metrics
    rid = request.get(REQUEST_ID)
    clf, batcher = st.classifier, st.batcher
    if not st.serves_classify:
        return error(404, "this server does not classify; start it with --kinds including classify (INFER_KINDS)",
                     code="kind_not_served", request_id=rid)
    try:
        data = await read_image(request, st.config.max_body_bytes)
        if clf is None or batcher is None:
            m.requests.labels("503").inc()
            return error(503, "model is still loading; retry shortly", {"Retry-After": "1"}, request_id=rid)
        loop = asyncio.get_running_loop()
        prep = await loop.run_in_executor(st.decode_pool, prepare, data, clf.preprocess, st.config.max_pixels)
    except BadImage as exc:
        m.requests.labels(str(exc.status)).inc()
        return error(exc.status, exc.reason, request_id=rid)
    try:
        res = await batcher.submit(prep.array)
    except QueueFull as exc:
        m.requests.labels("503").inc()
        return error(503, f"server busy: {exc}; retry shortly", {"Retry-After": "1"}, request_id=rid)
    t_post = time.perf_counter()
    top1 = classification(clf, res.probs)
    body = {
        "inference": f"Predicted = {top1['label']}, Confidence = {top1['confidence']:.3f}",
        "message": "success",
        **top1,
        "model": clf.model,
        "backend": clf.backend,
        "batch_size": res.batch_size,
        "image": {"width": prep.width, "height": prep.height},
    }
    resp = web.json_response(body)
    t_end = time.perf_counter()
    app_s = t_end - t0
    resp.headers["Server-Timing"] = server_timing([
        ("decode", prep.decode_s), ("preprocess", prep.preprocess_s), ("queue", res.queue_s),
        ("infer", res.infer_s), ("postprocess", t_end - t_post), ("app", app_s)])
    m.requests.labels("200").inc()
    m.latency.observe(app_s)
    m.queue.observe(res.queue_s)
    return resp


LIVE_PAGE = importlib.resources.files(__package__).joinpath("live.html")


async def live(request: web.Request) -> web.Response:
    return web.Response(text=LIVE_PAGE.read_text(encoding="utf-8"), content_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def make_app(plan: ModelPlan, config: ServerConfig, vision: VisionPlans | None = None) -> web.Application:
    # The body limit is enforced while streaming in uploads.read_image (413);
    # aiohttp's own limit is set just above it as a backstop.
    app = web.Application(middlewares=[request_id_and_errors], client_max_size=config.max_body_bytes + 1)
    app[STATE] = State(plan, config, vision)
    app.router.add_get("/", root)
    app.router.add_post("/photo", photo)
    app.router.add_post("/detect", detect)
    app.router.add_post("/transform", transform)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stream", stream)
    app.router.add_get("/live", live)
    oip.add_routes(app)
    app.on_shutdown.append(close_streams)

    async def close(app: web.Application) -> None:
        await app[STATE].close()
    app.on_cleanup.append(close)
    return app
