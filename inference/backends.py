"""The three ways to run a forward pass. Each returns a `predict` function:
NHWC float32 batch in, class probabilities out. All are called from one
inference thread, never from the event loop.

- tensorflow: a Keras model traced once by `tf.function` with a dynamic batch
  dimension (never `model.predict` or eager calls per request: measured here
  ~25 ms vs ~105 ms vs ~200 ms at batch 1). XLA stays off (8x slower on CPU).
- opencv-dnn: `cv2.dnn` reading an ONNX graph (the seed's TF graph is converted
  to ONNX first: OpenCV 5 has no TensorFlow importer).
- onnxruntime: the fastest CPU path; `onnxruntime-gpu` uses CUDA when present.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelUnavailable
from .threads import ThreadPlan, onnxruntime_options

Predict = Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]

_PACKAGES = {"tensorflow": ("tensorflow", "pip install 'edge-inference-relay[tensorflow]' (tensorflow-cpu)"),
             "onnxruntime": ("onnxruntime", "pip install 'edge-inference-relay[onnxruntime]'"),
             "opencv-dnn": ("cv2", "pip install opencv-python-headless")}


def installed(backend: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[backend][0]) is not None


def install_hint(backend: str) -> str:
    return _PACKAGES[backend][1]


def check_available(backend: str) -> None:
    module, fix = _PACKAGES[backend]
    if importlib.util.find_spec(module) is None:
        raise ModelUnavailable(f"backend {backend} needs the Python package {module}; {fix}")


def tensorflow_predict(model: Any) -> Predict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    shape = [None, *model.input_shape[1:]]

    def call(x: Any) -> Any:
        return model(x, training=False)
    forward = tf.function(call, input_signature=[tf.TensorSpec(shape, tf.float32)], jit_compile=False,
                          reduce_retracing=True)

    def predict(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.asarray(forward(tf.convert_to_tensor(batch)))
    return predict


def onnx_predict(backend: str, path: Path, threads: ThreadPlan | None = None) -> Predict:
    """ONNX graph with input "input" NCHW; the batch arrives NHWC. With a
    thread plan, onnxruntime gets its intra/inter-op threads and spinning
    (OpenCV's count is process-wide: `ModelPlan.load` sets it)."""
    if backend == "onnxruntime":
        import onnxruntime as ort
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        options = onnxruntime_options(threads) if threads is not None else None
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)

        def predict_ort(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            return np.asarray(session.run(None, {"input": np.ascontiguousarray(batch.transpose(0, 3, 1, 2))})[0])
        return predict_ort

    import cv2
    net = cv2.dnn.readNetFromONNX(str(path))

    def predict_cv(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        net.setInput(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        return np.asarray(net.forward()).reshape(len(batch), -1)
    return predict_cv
