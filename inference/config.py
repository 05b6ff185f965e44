"""Settings of the inference server, each declared once: its default, flag
(`--field-name`), environment variable (`INFER_FIELD_NAME`) and help come from
the fields below (runtime/settings.py). `inference-server serve --help`,
deploy/systemd/inference-server.env and docs/settings.md follow from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.settings import option

from .catalog import AUTO, BACKENDS, DETECTORS, KINDS, MODELS, PREFERENCE, SEGMENTERS
from .threads import ThreadSettings
from .weights import WeightsSettings

MODEL = "Model"
VISION = "Detection and transformation"
SERVE = "Serving"
LIMITS = "Limits"
STREAMS = "Streams (GET /stream)"


def at_least(lo: float, kind: Callable[[str], float] = int) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < lo:
            raise ValueError(f"must be at least {lo:g}, got {text!r}")
        return value
    return parse


def above_zero(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be above 0, got {text!r}")
    return value


@dataclass(frozen=True)
class ModelSettings:
    """Which model runs where: shared by `serve` and `classify`."""

    backend: str = option(AUTO, group=MODEL, choices=(AUTO, *BACKENDS),
                          help=f"inference engine; auto: the fastest installed one the model runs on, in the "
                               f"measured order {', '.join(PREFERENCE)}")
    model: str = option("efficientnet-lite0", group=MODEL, choices=MODELS,
                        help="ImageNet classifier; efficientnet-lite0 works offline on every backend, inception-v3 "
                             "needs tensorflow, googlenet runs on opencv-dnn or onnxruntime")
    weights: str | None = option(None, group=MODEL, metavar="FILE",
                                 help="weights file: an EfficientNet-Lite0 .pth, or the Keras InceptionV3 .h5")
    model_dir: str | None = option(None, group=MODEL, metavar="DIR",
                                   help="directory holding googlenet's tensorflow_inception_graph.pb and its label "
                                        "strings")
    cache_dir: str | None = option(None, group=MODEL, metavar="DIR",
                                   help="where converted models and downloads are kept; unset: "
                                        "~/.cache/edge-inference")
    offline: bool = option(False, group=MODEL, help="never download; fail with the name of the file to supply")
    detector: str = option("ssd-mobilenet-v2", group=VISION, choices=DETECTORS,
                           help="detector of POST /detect and `detect`: ssd-mobilenet-v2 (23 everyday objects, Open "
                                "Images) or blazeface (faces)")
    detector_weights: str | None = option(None, group=VISION, metavar="FILE",
                                          help="another TFLite file for the detector: a raw-output SSD with the same "
                                               "input and anchors; unset: the pinned file in --weights-dir")
    detector_labels: str | None = option(None, group=VISION, metavar="FILE",
                                         help="class names of --detector-weights, one per line, line 1 the "
                                              "background; unset: the pinned label map (class_N without one)")
    segmenter: str = option("selfie-segmentation", group=VISION, choices=SEGMENTERS,
                            help="person segmentation model of POST /transform and `transform`")
    segmenter_weights: str | None = option(None, group=VISION, metavar="FILE",
                                           help="another TFLite mask model (256x256 RGB in, 256x256 mask out); "
                                                "unset: the pinned file in --weights-dir")
    files: WeightsSettings = field(default_factory=WeightsSettings)
    threads: ThreadSettings = field(default_factory=ThreadSettings)
    log_level: str = option("info", group=MODEL, choices=("debug", "info", "warning", "error"), help="log level")


@dataclass(frozen=True)
class ServerConfig:
    """`inference-server serve`: where it listens, batching, limits, streams."""

    kinds: list[str] = option(default_factory=lambda: ["classify"], group=SERVE, repeat=True, choices=KINDS,
                              metavar="KIND[,KIND...]",
                              help="model kinds this server loads: classify (POST /photo, /stream), detect (POST "
                                   "/detect), transform (POST /transform); detect and transform need the files of "
                                   "`make weights`")
    host: str = option("127.0.0.1", group=SERVE,
                       help="address to listen on; 0.0.0.0 to accept other machines")
    port: int = option(8000, group=SERVE, help="port to listen on")
    max_batch: int = option(8, group=SERVE, parse=at_least(1),
                            help="images per forward pass at most; 1 turns batching off")
    batch_timeout_ms: float = option(0.0, group=SERVE, parse=at_least(0, float),
                                     help="longest a request waits for a batch to fill; 0 runs what is queued as "
                                          "soon as the model is free, so batches still form under load")
    max_queue: int = option(64, group=SERVE, parse=at_least(1),
                            help="requests waiting at most; beyond, 503 with Retry-After")
    warmup_runs: int = option(2, group=SERVE, parse=at_least(1),
                              help="forward passes per batch size before /healthz turns ready")
    max_body_mb: float = option(20.0, group=LIMITS, parse=above_zero, help="largest upload in MiB; beyond, 413")
    max_pixels: int = option(40_000_000, group=LIMITS, parse=at_least(1),
                             help="largest decoded image in pixels (decompression-bomb guard); beyond, 413")
    max_frame_mb: float = option(8.0, group=STREAMS, parse=above_zero,
                                 help="largest GET /stream frame in MiB; a larger one is answered with an error and "
                                      "the stream goes on (one larger than both this and --max-body-mb closes the "
                                      "stream with 1009)")
    stream_max_backlog: int = option(64, group=STREAMS, parse=at_least(1),
                                     help="per GET /stream: frames waiting for the model with ?drop=none (then the "
                                          "server stops reading) and answers waiting for the client (beyond, the "
                                          "client is not reading: closed)")
    stream_send_timeout: float = option(10.0, group=STREAMS, parse=above_zero,
                                        help="seconds one GET /stream answer may wait for the client to take it; "
                                             "beyond, the stream is closed")
    model: ModelSettings = field(default_factory=ModelSettings)

    @property
    def threads(self) -> ThreadSettings:
        return self.model.threads

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * 1024 * 1024)
