"""Command line of the inference server: `serve` (HTTP), and the local modes
`classify` (the seed's singleton scripts), `detect` and `transform`. The options are declared once in
config.py; every one also reads an INFER_* environment variable."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from runtime import settings
from runtime.cli import StartupError, run_main, setup_logging

if TYPE_CHECKING:
    from .config import ModelSettings, ServerConfig
    from .models import ModelPlan
    from .state import VisionPlans

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

log = logging.getLogger("inference")
ENV_PREFIX = "INFER"
QUIET = ("aiohttp.access", "absl", "tensorflow", "h5py", "tf2onnx")
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    from .config import ModelSettings, ServerConfig
    p = argparse.ArgumentParser(prog="inference-server", description="ImageNet classification, object and face detection, and background "
                                "blur/replace/cut-out, over HTTP or locally. "
                                "Every option also reads the environment variable named in its help; a flag beats "
                                "the variable.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP server (GET /, POST /photo, /detect, /transform, /stream, /live, /healthz, "
                            "/metrics)",
                       description="Serve POST /photo (raw image body -> JSON class) and GET /stream with dynamic "
                                   "batching.")
    settings.add_arguments(s, ServerConfig, ENV_PREFIX)
    c = sub.add_parser("classify", help="classify image files in-process, no server",
                       description="Load the model in-process and print label, confidence and timings per file.")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    c.add_argument("--top", type=int, default=1, help="classes to print per image (default: 1)")
    c.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    settings.add_arguments(c, ModelSettings, ENV_PREFIX)
    d = sub.add_parser("detect", help="detect objects (or faces) in image files in-process, no server",
                       description="Load the detector (--detector) in-process and print the boxes found per file; "
                                   "with --out, also write each image with its boxes drawn.")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    d.add_argument("--min-score", type=float, default=None, help="report boxes scoring at least this (0-1; default: "
                   "the detector's own, 0.5)")
    d.add_argument("--max", type=int, default=100, help="boxes per image at most (default: 100)")
    d.add_argument("--out", metavar="DIR", help="write IMAGE's boxes drawn on it as DIR/NAME.detect.jpg")
    d.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    settings.add_arguments(d, ModelSettings, ENV_PREFIX)
    t = sub.add_parser("transform", help="blur, replace or cut out the background of image files in-process",
                       description="Load the person segmenter (--segmenter) in-process; print each file's mask "
                                   "coverage and timings; with --out, write the transformed image.")
    t.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    t.add_argument("--mode", choices=("blur", "replace", "cutout"), default="blur",
                   help="blur the background, replace it with --color, or cut the person out (PNG with alpha) "
                        "(default: blur)")
    t.add_argument("--color", default="00b140", help="replace: background colour RRGGBB (default: 00b140)")
    t.add_argument("--out", metavar="DIR", help="write DIR/NAME.MODE.jpg (cutout: .png)")
    t.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    settings.add_arguments(t, ModelSettings, ENV_PREFIX)
    return p


def _resolve(cls: type[T], a: argparse.Namespace) -> T:
    try:
        return settings.resolve(cls, ENV_PREFIX, a)
    except ValueError as exc:  # a bad flag or variable, or settings that do not fit together
        raise StartupError(str(exc)) from None


def _plan(m: ModelSettings) -> ModelPlan:
    from . import backends
    from .models import choose_backend, resolve
    backend, why = choose_backend(m.model, m.backend, backends.installed)
    plan = resolve(m.model, backend, weights=m.weights, model_dir=m.model_dir, cache_dir=m.cache_dir,
                   offline=m.offline)
    log.info("backend %s (%s)", backend, why)
    return plan


def _vision(m: ModelSettings, kinds: list[str]) -> VisionPlans:
    """The detection and transformation models asked for, files checked now."""
    from .detectors import resolve_detector
    from .segmenter import resolve_segmenter
    from .state import VisionPlans
    directory = m.files.path()
    det = (resolve_detector(m.detector, directory, m.detector_weights, m.detector_labels)
           if "detect" in kinds else None)
    seg = resolve_segmenter(m.segmenter, directory, m.segmenter_weights) if "transform" in kinds else None
    return VisionPlans(det, seg)


async def _serve(config: ServerConfig) -> int:
    from aiohttp import web

    from .server import make_app
    from .state import STATE
    plan = _plan(config.model)
    vision = _vision(config.model, config.kinds)
    app = make_app(plan, config, vision)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {config.port} on {config.host} is already in use; stop the other server or "
                               "pick another with --port (INFER_PORT)") from None
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}; "
                           "check --host/--port (INFER_HOST/INFER_PORT)") from None
    log.info("listening on http://%s:%d (%s); loading, /healthz is 503 until every model is warm",
             config.host, config.port, ", ".join(_kinds_text(config, plan, vision)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = app[STATE]
    loader = asyncio.create_task(state.load())
    stopper = asyncio.create_task(stop.wait())
    code = 0
    try:
        await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        failure = loader.exception() if loader.done() else None
        if failure is not None:
            state.load_error = str(failure)
            log.error("error: loading %s on %s failed: %s", plan.model, plan.backend, failure)
            code = 1
        else:
            await stop.wait()
            log.info("stopping: finishing in-flight requests")
    finally:
        loader.cancel()
        stopper.cancel()
        await runner.cleanup()
    return code


def _kinds_text(config: ServerConfig, plan: ModelPlan, vision: VisionPlans) -> list[str]:
    out = [f"classify: {plan.model} on {plan.backend}"] if "classify" in config.kinds else []
    if vision.detector:
        out.append(f"detect: {vision.detector.spec.name} on tflite")
    if vision.segmenter:
        out.append(f"transform: {vision.segmenter.spec.name} on tflite")
    return out


def _classify(a: argparse.Namespace, m: ModelSettings) -> int:
    from .imaging import prepare
    from .threads import thread_plan, usable_cores
    threads = thread_plan(usable_cores(), m.threads)
    plan = _plan(m)
    clf = _loaded(plan, threads)
    images = Prepared(a.images, lambda data: prepare(data, clf.preprocess))
    for i, name, _, prep in images:
        t = time.perf_counter()
        probs = clf.predict(prep.array[None])[0]
        infer = time.perf_counter() - t
        top = [int(j) for j in (-probs).argsort()[: max(1, a.top)]]
        timing = {"decode_ms": round(prep.decode_s * 1000, 2), "preprocess_ms": round(prep.preprocess_s * 1000, 2),
                  "infer_ms": round(infer * 1000, 2), "first": i == 0}
        if a.json:
            print(json.dumps({"file": name, "label": clf.label(top[0]), "class_id": top[0],
                              "confidence": round(float(probs[top[0]]), 6),
                              "top": [{"label": clf.label(j), "probability": round(float(probs[j]), 6)} for j in top],
                              **timing}))
        else:
            labels = "  ".join(f"{clf.label(j)} {probs[j]:.3f}" for j in top)
            print(f"{name}: {labels}  (decode {timing['decode_ms']} ms, preprocess {timing['preprocess_ms']} ms, "
                  f"infer {timing['infer_ms']} ms{', first run' if i == 0 else ''})")
    return 1 if images.failed else 0


def _loaded(plan: Any, threads: Any) -> Any:
    """A local mode's model, loaded, with one line on standard error saying how long it took."""
    t0 = time.perf_counter()
    model = plan.load(threads)
    print(f"# {model.model} on {model.backend}, loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model


class Prepared:
    """The local modes' images, read and prepared one by one: a file that
    cannot be read or is not an image is one line on standard error and
    counts in `failed`; the others come out as (index, name, bytes, prepared)."""

    def __init__(self, names: list[str], prepare: Callable[[bytes], Any]) -> None:
        self.names, self.prepare = names, prepare
        self.failed = 0

    def __iter__(self) -> Iterator[tuple[int, str, bytes, Any]]:
        from .imaging import BadImage
        for i, name in enumerate(self.names):
            try:
                data = Path(name).read_bytes()
                prep = self.prepare(data)
            except OSError as exc:
                print(f"{name}: cannot read: {exc.strerror}", file=sys.stderr)
                self.failed += 1
                continue
            except BadImage as exc:
                print(f"{name}: {exc.reason}", file=sys.stderr)
                self.failed += 1
                continue
            yield i, name, data, prep


def _out_dir(out: str | None) -> Path | None:
    if out is None:
        return None
    d = Path(out)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    return d


def _detect(a: argparse.Namespace, m: ModelSettings) -> int:
    from PIL import Image

    from .detectors import draw_boxes
    from .imaging import DEFAULT_MAX_PIXELS
    from .threads import thread_plan, usable_cores
    threads = thread_plan(usable_cores(), m.threads)
    plan = _vision(m, ["detect"]).detector
    assert plan is not None
    if a.min_score is not None and not 0 <= a.min_score <= 1:
        raise StartupError(f"--min-score must be from 0 to 1, got {a.min_score}")
    min_score = plan.spec.min_score if a.min_score is None else a.min_score
    out_dir = _out_dir(a.out)
    det = _loaded(plan, threads.intra_op)
    images = Prepared(a.images, lambda data: det.prepare(data, DEFAULT_MAX_PIXELS))
    for i, name, data, prep in images:
        t = time.perf_counter()
        row = det.predict(prep.array[None])[0]
        infer = time.perf_counter() - t
        t = time.perf_counter()
        found = det.decode(row, prep.geometry, min_score, max(1, a.max))
        post = time.perf_counter() - t
        timing = {"decode_ms": round(prep.decode_s * 1000, 2), "preprocess_ms": round(prep.preprocess_s * 1000, 2),
                  "infer_ms": round(infer * 1000, 2), "postprocess_ms": round(post * 1000, 2), "first": i == 0}
        written = None
        if out_dir is not None:
            import io
            written = out_dir / f"{Path(name).stem}.detect.jpg"
            with Image.open(io.BytesIO(data)) as img:
                draw_boxes(img, found).save(written, "JPEG", quality=90)
        if a.json:
            print(json.dumps({"file": name, "detections": found, "image": {"width": prep.width,
                              "height": prep.height}, **({"out": str(written)} if written else {}), **timing}))
        else:
            boxes = "; ".join(f"{d['label']} {d['score']:.2f} [{', '.join(f'{v:g}' for v in d['box'])}]"
                              for d in found) or "nothing above the threshold"
            print(f"{name}: {boxes}  (infer {timing['infer_ms']} ms{', first run' if i == 0 else ''})"
                  + (f" -> {written}" if written else ""))
    return 1 if images.failed else 0


def _transform(a: argparse.Namespace, m: ModelSettings) -> int:
    from .imaging import DEFAULT_MAX_PIXELS
    from .segmenter import composite, coverage, encode, full_mask, parse_color
    from .threads import thread_plan, usable_cores
    threads = thread_plan(usable_cores(), m.threads)
    plan = _vision(m, ["transform"]).segmenter
    assert plan is not None
    try:
        color = parse_color(a.color)
    except ValueError as exc:
        raise StartupError(f"--color: {exc}") from None
    out_dir = _out_dir(a.out)
    fmt = "png" if a.mode == "cutout" else "jpeg"
    seg = _loaded(plan, threads.intra_op)
    images = Prepared(a.images, lambda data: seg.prepare(data, DEFAULT_MAX_PIXELS))
    for i, name, _, prep in images:
        t = time.perf_counter()
        mask_row = seg.predict(prep.array[None])[0]
        infer = time.perf_counter() - t
        t = time.perf_counter()
        mask = full_mask(mask_row, prep.width, prep.height)
        image = composite(prep.image, mask, a.mode, color)
        post = time.perf_counter() - t
        t = time.perf_counter()
        body = encode(image, fmt)
        enc = time.perf_counter() - t
        written = None
        if out_dir is not None:
            written = out_dir / f"{Path(name).stem}.{a.mode}.{'png' if fmt == 'png' else 'jpg'}"
            written.write_bytes(body)
        timing = {"decode_ms": round(prep.decode_s * 1000, 2), "preprocess_ms": round(prep.preprocess_s * 1000, 2),
                  "infer_ms": round(infer * 1000, 2), "postprocess_ms": round(post * 1000, 2),
                  "encode_ms": round(enc * 1000, 2), "first": i == 0}
        if a.json:
            print(json.dumps({"file": name, "mode": a.mode, "mask_coverage": round(coverage(mask), 4),
                              **({"out": str(written)} if written else {}), **timing}))
        else:
            print(f"{name}: person covers {coverage(mask):.1%} (infer {timing['infer_ms']} ms, compose "
                  f"{timing['postprocess_ms']} ms, encode {timing['encode_ms']} ms)"
                  + (f" -> {written}" if written else ""))
    return 1 if images.failed else 0


def main(argv: list[str] | None = None) -> int:
    from .config import ModelSettings, ServerConfig
    from .errors import ModelUnavailable
    a = build_parser().parse_args(argv)

    def body() -> int:
        try:
            if a.command == "serve":
                config = _resolve(ServerConfig, a)
                setup_logging(config.model.log_level, QUIET)
                return asyncio.run(_serve(config))
            m = _resolve(ModelSettings, a)
            setup_logging(m.log_level, QUIET)
            if a.command == "detect":
                return _detect(a, m)
            if a.command == "transform":
                return _transform(a, m)
            return _classify(a, m)
        except ModelUnavailable as exc:
            raise StartupError(str(exc)) from None

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
