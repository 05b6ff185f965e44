"""Command line of the inference server: `serve` (HTTP) and `classify` (local
mode, the seed's singleton scripts). Every option also reads an INFER_*
environment variable."""

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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

log = logging.getLogger("inference")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _model_options(p: argparse.ArgumentParser) -> None:
    from .models import AUTO, BACKENDS, MODELS, PREFERENCE
    from .threads import SPINNING
    e = os.environ.get
    p.add_argument("--backend", choices=(AUTO, *BACKENDS), default=e("INFER_BACKEND", AUTO),
                   help=f"inference engine; auto: the fastest installed one the model runs on, in the measured "
                        f"order {', '.join(PREFERENCE)} (INFER_BACKEND)")
    p.add_argument("--model", choices=MODELS, default=e("INFER_MODEL", "efficientnet-lite0"),
                   help="ImageNet classifier; efficientnet-lite0 works offline on every backend, inception-v3 "
                        "needs tensorflow, googlenet runs on opencv-dnn or onnxruntime (INFER_MODEL)")
    p.add_argument("--weights", default=e("INFER_WEIGHTS"),
                   help="weights file: an EfficientNet-Lite0 .pth, or the Keras InceptionV3 .h5 (INFER_WEIGHTS)")
    p.add_argument("--model-dir", default=e("INFER_MODEL_DIR"),
                   help="directory holding googlenet's tensorflow_inception_graph.pb and its label strings "
                        "(INFER_MODEL_DIR)")
    p.add_argument("--cache-dir", default=e("INFER_CACHE_DIR"),
                   help="where converted models and downloads are kept; default ~/.cache/edge-inference "
                        "(INFER_CACHE_DIR)")
    p.add_argument("--offline", action="store_true", default=_env_flag("INFER_OFFLINE"),
                   help="never download; fail with the name of the file to supply (INFER_OFFLINE)")
    p.add_argument("--inference-threads", type=int, default=int(e("INFER_INFERENCE_THREADS", "0")),
                   help="threads of one forward pass (onnxruntime intra-op, TensorFlow intra-op, OpenCV); "
                        "0: every usable core (INFER_INFERENCE_THREADS)")
    p.add_argument("--inter-op-threads", type=int, default=int(e("INFER_INTER_OP_THREADS", "1")),
                   help="onnxruntime/TensorFlow threads running independent graph nodes side by side "
                        "(INFER_INTER_OP_THREADS)")
    p.add_argument("--spinning", choices=SPINNING, default=e("INFER_SPINNING", "auto"),
                   help="onnxruntime's idle threads spin for work; auto: off when decode threads share the "
                        "inference cores (INFER_SPINNING)")
    p.add_argument("--decode-threads", type=int, default=int(e("INFER_DECODE_THREADS", "0")),
                   help="threads decoding and preprocessing uploads (serve); 0: one per 4 usable cores, at "
                        "least 1 (INFER_DECODE_THREADS)")
    p.add_argument("--log-level", default=e("INFER_LOG_LEVEL", "info"), help="debug|info|warning (INFER_LOG_LEVEL)")


def build_parser() -> argparse.ArgumentParser:
    e = os.environ.get
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="inference-server", description="ImageNet classification over HTTP or locally.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", formatter_class=fmt,
                       help="run the HTTP server (GET /, POST /photo, /stream, /live, /healthz, /metrics)",
                       description="Serve POST /photo (raw image body -> JSON class) with dynamic batching.")
    s.add_argument("--host", default=e("INFER_HOST", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 to accept other machines (INFER_HOST)")
    s.add_argument("--port", type=int, default=int(e("INFER_PORT", "8000")), help="port to listen on (INFER_PORT)")
    s.add_argument("--max-batch", type=int, default=int(e("INFER_MAX_BATCH", "8")),
                   help="images per forward pass at most; 1 turns batching off (INFER_MAX_BATCH)")
    s.add_argument("--batch-timeout-ms", type=float, default=float(e("INFER_BATCH_TIMEOUT_MS", "0")),
                   help="longest a request waits for a batch to fill; 0 runs what is queued as soon as the "
                        "model is free, so batches still form under load (INFER_BATCH_TIMEOUT_MS)")
    s.add_argument("--max-queue", type=int, default=int(e("INFER_MAX_QUEUE", "64")),
                   help="requests waiting at most; beyond, 503 with Retry-After (INFER_MAX_QUEUE)")
    s.add_argument("--max-body-mb", type=float, default=float(e("INFER_MAX_BODY_MB", "20")),
                   help="largest upload in MiB; beyond, 413 (INFER_MAX_BODY_MB)")
    s.add_argument("--max-pixels", type=int, default=int(e("INFER_MAX_PIXELS", "40000000")),
                   help="largest decoded image in pixels (decompression-bomb guard); beyond, 413 (INFER_MAX_PIXELS)")
    s.add_argument("--max-frame-mb", type=float, default=float(e("INFER_MAX_FRAME_MB", "8")),
                   help="largest GET /stream frame in MiB; a larger one is answered with an error and the stream "
                        "goes on (one larger than both this and --max-body-mb closes the stream with 1009) "
                        "(INFER_MAX_FRAME_MB)")
    s.add_argument("--stream-max-backlog", type=int, default=int(e("INFER_STREAM_MAX_BACKLOG", "64")),
                   help="per GET /stream: frames waiting for the model with ?drop=none (then the server stops "
                        "reading) and answers waiting for the client (beyond, the client is not reading: closed "
                        "with 1008) (INFER_STREAM_MAX_BACKLOG)")
    s.add_argument("--stream-send-timeout", type=float, default=float(e("INFER_STREAM_SEND_TIMEOUT", "10")),
                   help="seconds one GET /stream answer may wait for the client to take it; beyond, the stream "
                        "is closed with 1008 (INFER_STREAM_SEND_TIMEOUT)")
    s.add_argument("--warmup-runs", type=int, default=int(e("INFER_WARMUP_RUNS", "2")),
                   help="forward passes per batch size before /healthz turns ready (INFER_WARMUP_RUNS)")
    _model_options(s)

    c = sub.add_parser("classify", formatter_class=fmt, help="classify image files in-process, no server",
                       description="Load the model in-process and print label, confidence and timings per file.")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    c.add_argument("--top", type=int, default=1, help="classes to print per image")
    c.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    _model_options(c)
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("aiohttp.access", "absl", "tensorflow", "h5py", "tf2onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _plan(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from . import backends
    from .models import choose_backend, resolve
    backend, why = choose_backend(a.model, a.backend, backends.installed)
    plan = resolve(a.model, backend, weights=a.weights, model_dir=a.model_dir, cache_dir=a.cache_dir,
                   offline=a.offline)
    log.info("backend %s (%s)", backend, why)
    return plan


def _thread_plan(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .threads import ThreadSettings, thread_plan, usable_cores
    try:
        settings = ThreadSettings(a.decode_threads, a.inference_threads, a.inter_op_threads, a.spinning)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return settings, thread_plan(usable_cores(), settings)


async def _serve(a: argparse.Namespace) -> int:
    from aiohttp import web

    from .server import STATE, ServerConfig, make_app
    if a.max_batch < 1 or a.max_queue < 1 or a.batch_timeout_ms < 0:
        raise SystemExit("error: --max-batch and --max-queue must be at least 1, --batch-timeout-ms not negative")
    if a.stream_max_backlog < 1 or a.stream_send_timeout <= 0 or a.max_frame_mb <= 0:
        raise SystemExit("error: --stream-max-backlog must be at least 1, --stream-send-timeout and --max-frame-mb "
                         "above 0")
    settings, _ = _thread_plan(a)
    plan = _plan(a)
    config = ServerConfig(max_batch=a.max_batch, batch_timeout_ms=a.batch_timeout_ms, max_queue=a.max_queue,
                          max_body_bytes=int(a.max_body_mb * 1024 * 1024), max_pixels=a.max_pixels,
                          warmup_runs=a.warmup_runs, threads=settings, max_frame_bytes=int(a.max_frame_mb * 1024 * 1024),
                          stream_max_backlog=a.stream_max_backlog, stream_send_timeout=a.stream_send_timeout)
    app = make_app(plan, config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    try:
        await web.TCPSite(runner, a.host, a.port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(f"error: port {a.port} on {a.host} is already in use; stop the other server or pick "
                             "another with --port (INFER_PORT)") from None
        raise SystemExit(f"error: cannot listen on {a.host}:{a.port}: {exc.strerror or exc}; "
                         "check --host/--port (INFER_HOST/INFER_PORT)") from None
    log.info("listening on http://%s:%d (%s on %s); loading the model, /healthz is 503 until it is warm",
             a.host, a.port, plan.model, plan.backend)
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


def _classify(a: argparse.Namespace) -> int:
    from .imaging import BadImage, prepare
    _, threads = _thread_plan(a)
    plan = _plan(a)
    t0 = time.perf_counter()
    clf = plan.load(threads)
    print(f"# {clf.model} on {clf.backend}, loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    failed = 0
    for i, name in enumerate(a.images):
        try:
            data = Path(name).read_bytes()
            prep = prepare(data, clf.preprocess)
        except OSError as exc:
            print(f"{name}: cannot read: {exc.strerror}", file=sys.stderr)
            failed += 1
            continue
        except BadImage as exc:
            print(f"{name}: {exc.reason}", file=sys.stderr)
            failed += 1
            continue
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
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from .models import ModelUnavailable
    a = build_parser().parse_args(argv)
    _setup_logging(a.log_level)
    try:
        if a.command == "serve":
            return asyncio.run(_serve(a))
        return _classify(a)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
