"""Command line of the inference server: `serve` (HTTP) and `classify` (local
mode, the seed's singleton scripts). The options are declared once in
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
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from runtime import settings
from runtime.cli import StartupError, run_main, setup_logging

if TYPE_CHECKING:
    from .config import ModelSettings, ServerConfig
    from .models import ModelPlan

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

log = logging.getLogger("inference")
ENV_PREFIX = "INFER"
QUIET = ("aiohttp.access", "absl", "tensorflow", "h5py", "tf2onnx")
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    from .config import ModelSettings, ServerConfig
    p = argparse.ArgumentParser(prog="inference-server", description="ImageNet classification over HTTP or locally. "
                                "Every option also reads the environment variable named in its help; a flag beats "
                                "the variable.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP server (GET /, POST /photo, /stream, /live, /healthz, /metrics)",
                       description="Serve POST /photo (raw image body -> JSON class) and GET /stream with dynamic "
                                   "batching.")
    settings.add_arguments(s, ServerConfig, ENV_PREFIX)
    c = sub.add_parser("classify", help="classify image files in-process, no server",
                       description="Load the model in-process and print label, confidence and timings per file.")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    c.add_argument("--top", type=int, default=1, help="classes to print per image (default: 1)")
    c.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    settings.add_arguments(c, ModelSettings, ENV_PREFIX)
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


async def _serve(config: ServerConfig) -> int:
    from aiohttp import web

    from .server import make_app
    from .state import STATE
    plan = _plan(config.model)
    app = make_app(plan, config)
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
    log.info("listening on http://%s:%d (%s on %s); loading the model, /healthz is 503 until it is warm",
             config.host, config.port, plan.model, plan.backend)
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


def _classify(a: argparse.Namespace, m: ModelSettings) -> int:
    from .imaging import BadImage, prepare
    from .threads import thread_plan, usable_cores
    threads = thread_plan(usable_cores(), m.threads)
    plan = _plan(m)
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
            return _classify(a, m)
        except ModelUnavailable as exc:
            raise StartupError(str(exc)) from None

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
