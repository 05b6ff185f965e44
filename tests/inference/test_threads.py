"""The default backend and the thread plan: the pure decisions, the real
onnxruntime options they become, and a real server that says at start-up
which backend runs, why, and how its threads are given out."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from inference.models import ModelUnavailable, choose_backend
from inference.threads import ThreadPlan, ThreadSettings, onnxruntime_options, thread_plan
from tests.harness import PY, ROOT, Proc, free_port

from .conftest import Server, start_server


@pytest.mark.parametrize("cores,settings,expected", [
    # 2 cores (this machine): 1 decode thread shares the 2 inference threads, so no spinning.
    (2, ThreadSettings(), (1, 2, 1, False)),
    (1, ThreadSettings(), (1, 1, 1, False)),
    (8, ThreadSettings(), (2, 8, 1, False)),
    (16, ThreadSettings(), (4, 16, 1, False)),
    # inference threads given: decode threads fit in what is left, so it may spin.
    (8, ThreadSettings(inference_threads=6), (2, 6, 1, True)),
    (2, ThreadSettings(decode_threads=1, inference_threads=1), (1, 1, 1, False)),
    (4, ThreadSettings(decode_threads=2, inference_threads=2, inter_op_threads=2), (2, 2, 2, True)),
    # forced spinning wins either way
    (2, ThreadSettings(spinning="on"), (1, 2, 1, True)),
    (8, ThreadSettings(inference_threads=4, spinning="off"), (2, 4, 1, False)),
    (0, ThreadSettings(), (1, 1, 1, False)),  # an unknown core count is one core
])
def test_thread_plan(cores: int, settings: ThreadSettings, expected: tuple[int, int, int, bool]) -> None:
    plan = thread_plan(cores, settings)
    assert (plan.decode, plan.intra_op, plan.inter_op, plan.spinning) == expected
    assert f"spinning {'on' if plan.spinning else 'off'}" in plan.describe()


@pytest.mark.parametrize("bad", [dict(decode_threads=-1), dict(inference_threads=-2), dict(inter_op_threads=0),
                                 dict(spinning="sometimes")])
def test_bad_thread_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ThreadSettings(**bad)  # type: ignore[arg-type]


def test_default_backend_is_the_fastest_installed() -> None:
    every = {"onnxruntime", "opencv-dnn", "tensorflow"}
    assert choose_backend("efficientnet-lite0", "auto", every.__contains__) == (
        "onnxruntime", "default: fastest installed; --backend to force")
    backend, why = choose_backend("efficientnet-lite0", "auto", {"opencv-dnn", "tensorflow"}.__contains__)
    assert backend == "opencv-dnn" and "onnxruntime not installed" in why
    backend, why = choose_backend("efficientnet-lite0", "auto", {"tensorflow"}.__contains__)
    assert backend == "tensorflow" and "onnxruntime, opencv-dnn not installed" in why
    # a model that runs on fewer backends gets the fastest of its own
    assert choose_backend("inception-v3", "auto", every.__contains__)[0] == "tensorflow"
    assert choose_backend("googlenet", "auto", every.__contains__)[0] == "onnxruntime"
    assert choose_backend("googlenet", "auto", {"opencv-dnn", "tensorflow"}.__contains__)[0] == "opencv-dnn"
    # --backend forces, installed or not (resolve() then says what is missing)
    assert choose_backend("efficientnet-lite0", "tensorflow", set().__contains__) == (
        "tensorflow", "forced by --backend")
    with pytest.raises(ModelUnavailable, match="pip install"):
        choose_backend("inception-v3", "auto", {"onnxruntime"}.__contains__)


def test_the_plan_becomes_onnxruntime_session_options() -> None:
    for spinning in (False, True):
        so = onnxruntime_options(ThreadPlan(4, 1, 3, 2, spinning, "test"))
        assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 2
        flag = "1" if spinning else "0"
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == flag
        assert so.get_session_config_entry("session.inter_op.allow_spinning") == flag


def _wait_ready(server: Server, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.alive(), server.proc.log()
        try:
            if server.health()[0] == 200:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s:\n{server.proc.log()}")


def test_serve_without_a_backend_runs_onnxruntime_and_says_why(tmp_path: Path, model_cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("INFER_")]:
        monkeypatch.delenv(name)  # no flags and no settings: the defaults
    port = free_port()
    proc = Proc(f"infer-default-{port}", [PY, "-m", "inference", "serve", "--port", str(port), "--cache-dir",
                                          str(model_cache)], tmp_path)
    server = Server(proc, f"http://127.0.0.1:{port}", "onnxruntime")
    try:
        _wait_ready(server)
        status, body = server.health()
        assert status == 200 and body["backend"] == "onnxruntime", body
        log = proc.log()
        assert "backend onnxruntime (default: fastest installed; --backend to force)" in log, log
        cores = len(os.sched_getaffinity(0))
        plan = thread_plan(cores, ThreadSettings())
        assert plan.describe() in log, log
    finally:
        proc.stop()


def test_forced_backend_and_thread_settings_are_logged(tmp_path: Path, model_cache: Path) -> None:
    server = start_server("opencv-dnn", tmp_path, model_cache, "--decode-threads", "3", "--inference-threads", "1",
                          "--spinning", "on")
    try:
        log = server.proc.log()
        assert "backend opencv-dnn (forced by --backend)" in log, log
        m = re.search(r"threads: \d+ cores; 3 decode, 1 inference \(intra-op\), 1 inter-op, spinning on "
                      r"\(spinning forced on\)", log)
        assert m, log
    finally:
        server.proc.stop()


ENGINE_THREADS = """
import sys
from inference.models import resolve
from inference.threads import ThreadPlan
backend, cache = sys.argv[1], sys.argv[2]
clf = resolve("efficientnet-lite0", backend, cache_dir=cache).load(ThreadPlan(4, 1, 3, 2, False, "test"))
if backend == "tensorflow":
    import tensorflow as tf
    print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
else:
    import cv2
    print(cv2.getNumThreads())
"""


@pytest.mark.parametrize("backend,expected", [("tensorflow", "3 2"), ("opencv-dnn", "3")])
def test_the_plan_reaches_tensorflow_and_opencv(backend: str, expected: str, model_cache: Path) -> None:
    # A fresh process: TensorFlow takes its thread counts only before its first op.
    r = subprocess.run([PY, "-c", ENGINE_THREADS, backend, str(model_cache)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == expected, r.stdout
    assert "already running" not in r.stderr
