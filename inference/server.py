"""The inference HTTP service (aiohttp): `GET /`, `POST /photo`, `GET /healthz`,
`GET /metrics`, `GET /stream` (WebSocket, frame by frame; `stream.py`) and the
browser page `GET /live`. Decoding runs on a thread pool, forward passes on one
inference thread through the dynamic batcher; the event loop only moves
bytes. Every answer carries Server-Timing and echoes X-Request-ID."""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .batcher import Batcher, BatchPolicy, QueueFull
from .imaging import DEFAULT_MAX_PIXELS, BadImage, prepare
from .models import Classifier, ModelPlan
from .threads import ThreadSettings, thread_plan, usable_cores

log = logging.getLogger("inference")


@dataclass
class ServerConfig:
    max_batch: int = 8
    batch_timeout_ms: float = 0.0
    max_queue: int = 64
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    warmup_runs: int = 2
    # Decode and inference threads, onnxruntime spinning: 0/"auto" derive
    # them from the usable cores (threads.thread_plan; docs/inference.md).
    threads: ThreadSettings = field(default_factory=ThreadSettings)
    # GET /stream: a frame larger than max_frame_bytes is answered with an error
    # and the stream goes on; a message larger than both limits closes it (1009).
    max_frame_bytes: int = 8 * 1024 * 1024
    # Per stream: frames waiting for the model (drop=none; then reading pauses)
    # and answers waiting for the client (past it: a client not reading, closed).
    stream_max_backlog: int = 64
    # Per stream: longest one answer may wait for the client's socket to take it.
    stream_send_timeout: float = 10.0


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("inference_requests", "POST /photo answers by status", ["status"], registry=r)
        self.latency = Histogram("inference_request_seconds", "time inside the server per classified image",
                                 buckets=(.002, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56), registry=r)
        self.queue = Histogram("inference_queue_seconds", "wait in the batcher before the forward pass",
                               buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1), registry=r)
        self.batch_size = Histogram("inference_batch_size", "images per forward pass",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.infer = Histogram("inference_forward_seconds", "forward pass time per batch",
                               buckets=(.002, .005, .01, .02, .04, .08, .16, .32, .64, 1.28), registry=r)
        self.depth = Gauge("inference_queue_depth", "requests waiting in the batcher", registry=r)
        self.ready = Gauge("inference_ready", "1 once the model is loaded and warmed up", registry=r)
        self.streams_open = Gauge("inference_streams_open", "GET /stream WebSockets open", registry=r)
        self.stream_frames = Counter("inference_stream_frames", "GET /stream messages by how they were answered",
                                     ["outcome"], registry=r)
        self.streams_closed = Counter("inference_streams_closed", "GET /stream WebSockets closed, by reason",
                                      ["reason"], registry=r)
        for outcome in ("answered", "dropped", "error"):
            self.stream_frames.labels(outcome)


class State:
    def __init__(self, plan: ModelPlan, config: ServerConfig) -> None:
        self.plan = plan
        self.config = config
        self.metrics = Metrics()
        self.classifier: Classifier | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        # One thread plan for every caller of the batcher and the decode pool.
        self.threads = thread_plan(usable_cores(), config.threads)
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self.decode_pool = ThreadPoolExecutor(self.threads.decode, thread_name_prefix="decode")
        self.hostname = socket.gethostname()
        self.streams: set[web.WebSocketResponse] = set()
        self.shutting_down = False

    async def load(self) -> None:
        """Load and warm up on the inference thread; /healthz turns ready
        only after a real forward pass has run (the first one is slow)."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        log.info("%s", self.threads.describe())
        clf = await loop.run_in_executor(self.infer_pool, self.plan.load, self.threads)
        size = clf.preprocess.size
        for n in sorted({1, self.config.max_batch}):
            for _ in range(max(1, self.config.warmup_runs)):
                await loop.run_in_executor(self.infer_pool, clf.predict, np.zeros((n, size, size, 3), np.float32))
        policy = BatchPolicy(self.config.max_batch, self.config.batch_timeout_ms / 1000)

        def on_batch(n: int, seconds: float) -> None:
            self.metrics.batch_size.observe(n)
            self.metrics.infer.observe(seconds)
        self.batcher = Batcher(clf.predict, policy, self.config.max_queue, self.infer_pool, on_batch)
        self.batcher.start()
        self.classifier = clf
        self.metrics.ready.set(1)
        log.info("ready: %s on %s, loaded and warmed up in %.1f s (max batch %d, batch timeout %g ms)",
                 clf.model, clf.backend, time.perf_counter() - t0, self.config.max_batch, self.config.batch_timeout_ms)

    async def close(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


STATE: web.AppKey[State] = web.AppKey("state", State)


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"message": "error", "error": reason, "status": status}, status=status, headers=headers)


# Echoed only if it is a plain token (as the edge requires); anything else is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    rid = request.headers.get("X-Request-ID", "")
    if not REQUEST_ID.fullmatch(rid):
        rid = uuid.uuid4().hex
    try:
        resp: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        resp = error(exc.status, exc.reason)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        resp = error(500, "internal error; the server logged the details")
    resp.headers["X-Request-ID"] = rid
    return resp


async def root(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    addr = f"{peer[0]}:{peer[1]}" if peer else "unknown"
    st = request.app[STATE]
    return web.Response(text=f"requester: {addr}\nhost: {request.host}\nserver: {st.hostname}\n")


async def healthz(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.classifier is None:
        status = "failed" if st.load_error else "loading"
        body = {"status": status, "model": st.plan.model, "backend": st.plan.backend}
        if st.load_error:
            body["error"] = st.load_error
        return web.json_response(body, status=503, headers={"Retry-After": "1"})
    return web.json_response({"status": "ok", "model": st.classifier.model, "backend": st.classifier.backend})


async def metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.metrics.depth.set(st.batcher.depth if st.batcher else 0)
    return web.Response(body=generate_latest(st.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _read_image(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BadImage(413, f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    if request.content_type.startswith("multipart/"):
        # curl -F file=@cat.jpg and browser forms: take the first file part.
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not where a photo is
            if part.filename is not None or part.name in ("file", "image", "photo"):
                data = bytearray()
                while chunk := await part.read_chunk(1 << 16):
                    data += chunk
                    if len(data) > limit:
                        raise BadImage(413, f"image exceeds the limit of {limit} bytes")
                return bytes(data)
        raise BadImage(400, "multipart body without a file part; send the image as the raw body or as a file field")
    data = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > limit:
            raise BadImage(413, f"body exceeds the limit of {limit} bytes")
    return bytes(data)


def classification(clf: Classifier, probs: np.ndarray[Any, Any]) -> dict[str, Any]:
    """label, class_id, confidence and top5 of one image's probabilities."""
    top = np.argsort(-probs)[:5]
    class_id = int(top[0])
    return {
        "label": clf.label(class_id),
        "class_id": class_id,
        "confidence": round(float(probs[class_id]), 6),
        "top5": [{"label": clf.label(int(i)), "class_id": int(i), "probability": round(float(probs[i]), 6)}
                 for i in top],
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}".rstrip("0").rstrip(".") or "0"


async def photo(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    st = request.app[STATE]
    m = st.metrics
    clf, batcher = st.classifier, st.batcher
    try:
        data = await _read_image(request, st.config.max_body_bytes)
        if clf is None or batcher is None:
            m.requests.labels("503").inc()
            return error(503, "model is still loading; retry shortly", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        prep = await loop.run_in_executor(st.decode_pool, prepare, data, clf.preprocess, st.config.max_pixels)
    except BadImage as exc:
        m.requests.labels(str(exc.status)).inc()
        return error(exc.status, exc.reason)
    try:
        res = await batcher.submit(prep.array)
    except QueueFull as exc:
        m.requests.labels("503").inc()
        return error(503, f"server busy: {exc}; retry shortly", {"Retry-After": "1"})
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
    resp.headers["Server-Timing"] = ", ".join([
        f"decode;dur={_ms(prep.decode_s)}", f"preprocess;dur={_ms(prep.preprocess_s)}",
        f"queue;dur={_ms(res.queue_s)}", f"infer;dur={_ms(res.infer_s)}",
        f"postprocess;dur={_ms(t_end - t_post)}", f"app;dur={_ms(app_s)}"])
    m.requests.labels("200").inc()
    m.latency.observe(app_s)
    m.queue.observe(res.queue_s)
    return resp


LIVE_PAGE = importlib.resources.files(__package__).joinpath("live.html")


async def live(request: web.Request) -> web.Response:
    return web.Response(text=LIVE_PAGE.read_text(encoding="utf-8"), content_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def make_app(plan: ModelPlan, config: ServerConfig) -> web.Application:
    from .stream import close_streams, stream
    # The body limit is enforced while streaming in _read_image (413 JSON);
    # aiohttp's own limit is set just above it as a backstop.
    app = web.Application(middlewares=[request_id_and_errors], client_max_size=config.max_body_bytes + 1)
    app[STATE] = State(plan, config)
    app.router.add_get("/", root)
    app.router.add_post("/photo", photo)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stream", stream)
    app.router.add_get("/live", live)
    app.on_shutdown.append(close_streams)

    async def close(app: web.Application) -> None:
        await app[STATE].close()
    app.on_cleanup.append(close)
    return app
