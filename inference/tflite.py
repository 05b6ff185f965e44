"""Running a TFLite file: `tf.lite.Interpreter` (or LiteRT's, when the
`ai-edge-litert` package is installed). The detection and transformation
models ship as TFLite; OpenCV's TFLite importer returns the SSD's outputs in
another order, so TensorFlow's interpreter is the one used.

TFLite graphs here have a fixed batch of 1 (resizing the SSD's input fails in
the XNNPACK delegate), so a batch from the batcher runs image by image; all
calls come from the one inference thread."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelUnavailable

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class TFLiteModel:
    """`predict`: NHWC float32 batch -> [N, ...] with the outputs named in
    `outputs` concatenated along their last axis (one array per image keeps
    the batcher's one-row-per-image contract)."""

    input_shape: tuple[int, ...]  # [1, H, W, C]
    output_shapes: tuple[tuple[int, ...], ...]
    predict: Callable[[Array], Array]


def _interpreter(path: Path, threads: int | None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import tensorflow as tf
        except ImportError:
            raise ModelUnavailable("the detection and transformation models run on TensorFlow Lite; install it "
                                   "with: pip install 'edge-inference-relay[tensorflow]'") from None
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TF 2.20 announces LiteRT at every construction
        try:
            return Interpreter(model_path=str(path), num_threads=threads)
        except ValueError as exc:
            raise ModelUnavailable(f"{path} is not a TFLite model TensorFlow can read ({exc})") from None


def load(path: Path, output_order: Sequence[str] = (), threads: int | None = None) -> TFLiteModel:
    """Open `path`; outputs in `output_order` by name, or, for a file whose
    names differ, by increasing width of the last axis (boxes before classes)."""
    it = _interpreter(path, threads)
    it.allocate_tensors()
    inputs = it.get_input_details()
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 4:
        raise ModelUnavailable(f"{path}: expected one NHWC image input, found {[tuple(i['shape']) for i in inputs]}")
    inp = inputs[0]
    outs = list(it.get_output_details())
    by_name = {o["name"]: o for o in outs}
    if output_order and all(n in by_name for n in output_order):
        outs = [by_name[n] for n in output_order]
    else:
        outs.sort(key=lambda o: int(o["shape"][-1]))
    lead = {tuple(o["shape"][:-1]) for o in outs}
    if len(lead) != 1:
        raise ModelUnavailable(f"{path}: outputs {[tuple(o['shape']) for o in outs]} cannot be read as one row per "
                               "anchor; it is not a raw single-shot detector or a mask model")
    index, out_index = inp["index"], [o["index"] for o in outs]

    def predict(batch: Array) -> Array:
        rows = []
        for x in batch:
            it.set_tensor(index, np.ascontiguousarray(x[None], dtype=np.float32))
            it.invoke()
            got = [it.get_tensor(i)[0] for i in out_index]
            rows.append(got[0] if len(got) == 1 else np.concatenate(got, axis=-1))
        return np.stack(rows)

    return TFLiteModel(tuple(int(v) for v in inp["shape"]), tuple(tuple(int(v) for v in o["shape"]) for o in outs),
                       predict)
