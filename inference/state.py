"""The inference server's state, one per application: settings, metrics, the
loaded models (one per kind it serves: classify, detect, transform), a batcher
per model, the thread pools of the thread plan, open streams. Every model runs
its forward passes on the one inference thread."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .batcher import Batcher, BatchPolicy
from .config import ServerConfig
from .detectors import Detector, DetectorPlan
from .models import Classifier, ModelPlan
from .segmenter import Segmenter, SegmenterPlan
from .threads import thread_plan, usable_cores

log = logging.getLogger("inference")


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
        self.kind_requests = Counter("inference_kind_requests", "POST /detect and /transform answers by status",
                                     ["kind", "status"], registry=r)
        self.kind_latency = Histogram("inference_kind_request_seconds",
                                      "time inside the server per detected or transformed image", ["kind"],
                                      buckets=(.002, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56), registry=r)
        self.oip_requests = Counter("inference_oip_requests", "POST /v2/models/.../infer answers by status",
                                    ["status"], registry=r)
        self.oip_images = Counter("inference_oip_images", "images (or tensors) through OIP v2 infer, every model kind",
                                  registry=r)
        for outcome in ("answered", "dropped", "error"):
            self.stream_frames.labels(outcome)


@dataclass(frozen=True)
class VisionPlans:
    """The detection and transformation models a server loads, their files
    already found and checked (None: that kind is not served)."""
    detector: DetectorPlan | None = None
    segmenter: SegmenterPlan | None = None


class State:
    def __init__(self, plan: ModelPlan, config: ServerConfig, vision: VisionPlans | None = None) -> None:
        self.plan = plan
        self.config = config
        self.vision = vision or VisionPlans()
        self.metrics = Metrics()
        self.classifier: Classifier | None = None
        self.batcher: Batcher | None = None
        self.detector: Detector | None = None
        self.detect_batcher: Batcher | None = None
        self.segmenter: Segmenter | None = None
        self.transform_batcher: Batcher | None = None
        self.load_error: str | None = None
        # One thread plan for every caller of the batcher and the decode pool.
        self.threads = thread_plan(usable_cores(), config.threads)
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self.decode_pool = ThreadPoolExecutor(self.threads.decode, thread_name_prefix="decode")
        self.hostname = socket.gethostname()
        self.streams: set[web.WebSocketResponse] = set()
        self.shutting_down = False

    @property
    def serves_classify(self) -> bool:
        return "classify" in self.config.kinds

    @property
    def ready(self) -> bool:
        """Every kind this server serves is loaded and warm."""
        return ((self.classifier is not None or not self.serves_classify)
                and (self.detector is not None or self.vision.detector is None)
                and (self.segmenter is not None or self.vision.segmenter is None))

    def loaded(self) -> dict[str, str]:
        """kind -> model name, for what is loaded."""
        out = {}
        for kind, m in (("classify", self.classifier), ("detect", self.detector), ("transform", self.segmenter)):
            if m is not None:
                out[kind] = m.model
        return out

    async def load(self) -> None:
        """Load and warm up on the inference thread; /healthz turns ready
        only after a real forward pass of every model has run (the first one
        is slow)."""
        log.info("%s", self.threads.describe())
        if self.serves_classify:
            await self._load_classifier()
        if self.vision.detector is not None:
            det = await self._load_tflite(self.vision.detector.load, (self.vision.detector.spec.anchors.input_size,) * 2)
            self.detect_batcher = self._batcher(det.predict)
            self.detector = det
        if self.vision.segmenter is not None:
            seg = await self._load_tflite(self.vision.segmenter.load, (self.vision.segmenter.spec.size,) * 2)
            self.transform_batcher = self._batcher(seg.predict)
            self.segmenter = seg
        self.metrics.ready.set(1)

    async def _load_tflite(self, load: Callable[[int | None], Any], size: tuple[int, int]) -> Any:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        model = await loop.run_in_executor(self.infer_pool, load, self.threads.intra_op)
        for _ in range(max(1, self.config.warmup_runs)):
            await loop.run_in_executor(self.infer_pool, model.predict, np.zeros((1, *size, 3), np.float32))
        log.info("ready: %s on %s (%s), loaded and warmed up in %.1f s", model.model, model.backend, model.source,
                 time.perf_counter() - t0)
        return model

    def _batcher(self, predict: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]) -> Batcher:
        """A batcher of its own per model (a batch holds one model's inputs),
        sharing the inference thread; TFLite models run a batch image by image."""
        policy = BatchPolicy(self.config.max_batch, self.config.batch_timeout_ms / 1000)
        batcher = Batcher(predict, policy, self.config.max_queue, self.infer_pool)
        batcher.start()
        return batcher

    async def _load_classifier(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
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
        log.info("ready: %s on %s, loaded and warmed up in %.1f s (max batch %d, batch timeout %g ms)",
                 clf.model, clf.backend, time.perf_counter() - t0, self.config.max_batch, self.config.batch_timeout_ms)

    async def close(self) -> None:
        for b in (self.batcher, self.detect_batcher, self.transform_batcher):
            if b:
                await b.stop()
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


STATE: web.AppKey[State] = web.AppKey("state", State)
# The request's id, set by server.request_id_and_errors for the handlers.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
