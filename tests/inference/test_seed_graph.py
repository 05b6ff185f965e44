"""The seed's OpenCV model (googlenet: inception5h, a frozen TensorFlow graph)
tested offline: TensorFlow itself builds a small frozen graph with the same
conventions and op types as inception5h (placeholder "input" NHWC float,
Conv2D/BiasAdd/Relu, MaxPool, LRN, the legacy Concat op, AvgPool, Reshape,
MatMul, output "softmax2"), the graph goes through the same
`resolve("googlenet", ...)` path as the downloaded one, and the answer is
compared with TensorFlow's on the same input. On OpenCV 5 before the fix this
failed with AttributeError (cv2.dnn.readNetFromTensorflow is gone)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.models import GOOGLENET_GRAPH, GOOGLENET_LABELS, resolve
from tests.harness import PY, ROOT

from .conftest import jpeg

CLASSES = 7


def _frozen_graph(size: int) -> tuple[bytes, Any]:
    """A frozen GraphDef (weights as Const nodes): conv+bias+relu, max pool,
    LRN, two conv branches joined by the legacy Concat op (as inception5h's
    mixed blocks), global average pool, reshape, dense, softmax. Returns the
    serialized graph and a function computing TensorFlow's own answer."""
    import tensorflow as tf
    rng = np.random.default_rng(7)

    def const(*shape: int) -> np.ndarray[Any, Any]:
        return rng.normal(0, 0.1, shape).astype(np.float32)
    w1, b1, w2, b2, w3, b3 = const(3, 3, 3, 8), const(8), const(3, 3, 8, 10), const(10), const(1, 1, 8, 6), const(6)
    wd, bd = const(16, CLASSES), const(CLASSES)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name="input")
        h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, tf.constant(w1), 2, "SAME"), tf.constant(b1)))
        h = tf.nn.max_pool2d(h, 3, 2, "SAME")
        h = tf.nn.local_response_normalization(h, depth_radius=2, bias=2.0, alpha=1e-3, beta=0.75)
        a = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, tf.constant(w2), 1, "SAME"), tf.constant(b2)))
        b = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, tf.constant(w3), 1, "SAME"), tf.constant(b3)))
        h = tf.raw_ops.Concat(concat_dim=tf.constant(3), values=[a, b])
        side = int(h.shape[1])
        h = tf.nn.avg_pool2d(h, side, 1, "VALID")
        h = tf.reshape(h, [-1, 16])
        logits = tf.nn.bias_add(tf.matmul(h, tf.constant(wd)), tf.constant(bd))
        tf.nn.softmax(logits, name="softmax2")
    graph_def = graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    assert {"Placeholder", "Conv2D", "BiasAdd", "LRN", "Concat", "AvgPool", "MatMul", "Softmax"} <= ops, ops

    def run_tf(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        with tf.compat.v1.Session(graph=graph) as sess:
            return np.asarray(sess.run("softmax2:0", {"input:0": batch}))
    return graph_def.SerializeToString(), run_tf


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    d = tmp_path_factory.mktemp("inception5h-like")
    data, run_tf = _frozen_graph(224)
    (d / GOOGLENET_GRAPH).write_bytes(data)
    (d / GOOGLENET_LABELS).write_text("".join(f"class_{chr(ord('a') + i)}\n" for i in range(CLASSES)))
    return d, run_tf


@pytest.mark.parametrize("backend", ["opencv-dnn", "onnxruntime"])
def test_googlenet_path_loads_a_frozen_tf_graph_and_matches_tensorflow(seed_dir: tuple[Path, Any], tmp_path: Path,
                                                                       backend: str) -> None:
    from inference.imaging import prepare
    directory, run_tf = seed_dir
    plan = resolve("googlenet", backend, model_dir=str(directory), cache_dir=tmp_path, offline=True)
    clf = plan.load()  # before the fix, on OpenCV 5.x: AttributeError, no cv2.dnn.readNetFromTensorflow
    photo = prepare(jpeg("chelsea"), clf.preprocess).array
    noise = np.random.default_rng(3).uniform(-117, 138, (224, 224, 3)).astype(np.float32)
    batch = np.stack([photo, noise])
    got = clf.predict(batch)
    want = run_tf(batch)
    assert got.shape == (2, CLASSES)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert clf.label(int(got[0].argmax())) == f"class_{chr(ord('a') + int(want[0].argmax()))}"
    single = clf.predict(batch[:1])  # batch 1 (the server's c=1 case) as well
    np.testing.assert_allclose(single, want[:1], rtol=1e-4, atol=1e-5)


def test_googlenet_classify_command_on_the_frozen_graph(seed_dir: tuple[Path, Any], tmp_path: Path) -> None:
    directory, run_tf = seed_dir
    from inference.imaging import prepare
    from inference.models import Preprocess
    (tmp_path / "chelsea.jpg").write_bytes(jpeg("chelsea"))
    r = subprocess.run([PY, "-m", "inference", "classify", str(tmp_path / "chelsea.jpg"), "--model", "googlenet",
                        "--backend", "opencv-dnn", "--model-dir", str(directory), "--offline",
                        "--cache-dir", str(tmp_path / "cache")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    x = prepare(jpeg("chelsea"), Preprocess(size=224, resize=224, mean=117.0, scale=1.0)).array
    want = run_tf(x[None])[0]
    top = int(want.argmax())
    assert r.stdout.split(": ", 1)[1].split()[:2] == [f"class_{chr(ord('a') + top)}", f"{want[top]:.3f}"], r.stdout
