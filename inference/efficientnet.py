"""EfficientNet-Lite0 rebuilt from a lukemelas-layout state dict, twice: as an
ONNX graph (for OpenCV DNN and onnxruntime) and as Keras layers (for
TensorFlow). Both take 224x224 RGB normalised to [-1, 1] and return softmax
probabilities over the 1000 ImageNet classes; tests check they agree.

Lite0 is EfficientNet-B0 without squeeze-excite, with ReLU6 and a fixed
32-channel stem and 1280-channel head. Padding is TensorFlow's "same" (the
extra pixel goes bottom/right); BatchNorm epsilon is 1e-3 (some running
variances are exactly 0, so the epsilon is what keeps them finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

INPUT_SIZE = 224
BN_EPS = 1e-3
# Stride of each of the 16 MBConv blocks (the first block of stages 2, 3, 4 and 6 halves the size).
BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)

Weights = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class Block:
    index: int
    kernel: int
    stride: int
    expand: bool
    c_in: int
    c_mid: int
    c_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.c_in == self.c_out


def blocks(w: Weights) -> list[Block]:
    """The block list, read off the weight shapes (the strides are fixed)."""
    out = []
    for i, stride in enumerate(BLOCK_STRIDES):
        p = f"_blocks.{i}."
        dw = w[p + "_depthwise_conv.weight"]
        expand = (p + "_expand_conv.weight") in w
        c_in = w[p + "_expand_conv.weight"].shape[1] if expand else dw.shape[0]
        out.append(Block(i, int(dw.shape[2]), stride, expand, int(c_in), int(dw.shape[0]),
                         int(w[p + "_project_conv.weight"].shape[0])))
    return out


def check_weights(w: Weights) -> None:
    """A clear error when the file is not an EfficientNet-Lite0 state dict."""
    missing = [k for k in ("_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_fc.bias",
                           "_blocks.15._project_conv.weight") if k not in w]
    if missing:
        raise ValueError(f"not an EfficientNet-Lite0 state dict (missing {', '.join(missing)})")
    if w["_fc.weight"].shape != (1000, 1280):
        raise ValueError(f"classifier has shape {w['_fc.weight'].shape}, expected (1000, 1280)")


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) for one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _fold_bn(w: Weights, conv: str, bn: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    scale = w[bn + ".weight"] / np.sqrt(w[bn + ".running_var"].astype(np.float64) + BN_EPS)
    kernel = (w[conv + ".weight"] * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    bias = (w[bn + ".bias"] - w[bn + ".running_mean"] * scale).astype(np.float32)
    return kernel, bias


# ---------------------------------------------------------------------------- ONNX

def build_onnx(w: Weights, opset: int = 13) -> Any:
    """An onnx.ModelProto: input "input" [N, 3, 224, 224], output "probs" [N, 1000].
    BatchNorm is folded into the convolutions; pads are explicit because
    auto_pad=SAME_UPPER is read wrongly by OpenCV DNN."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_weights(w)
    nodes: list[Any] = []
    inits: list[Any] = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                        numpy_helper.from_array(np.array(6.0, np.float32), "six")]

    def conv(x: str, name: str, conv_key: str, bn_key: str, size: int, kernel: int, stride: int,
             group: int = 1, relu6: bool = True) -> tuple[str, int]:
        k, b = _fold_bn(w, conv_key, bn_key)
        inits.extend([numpy_helper.from_array(k, name + ".w"), numpy_helper.from_array(b, name + ".b")])
        before, after = same_pads(size, kernel, stride)
        out = name + ".conv"
        nodes.append(helper.make_node("Conv", [x, name + ".w", name + ".b"], [out], name=name,
                                      kernel_shape=[kernel, kernel], strides=[stride, stride], group=group,
                                      pads=[before, before, after, after]))
        if relu6:
            nodes.append(helper.make_node("Clip", [out, "zero", "six"], [name + ".relu6"], name=name + ".clip"))
            out = name + ".relu6"
        return out, math.ceil(size / stride)

    x, size = conv("input", "stem", "_conv_stem", "_bn0", INPUT_SIZE, 3, 2)
    for blk in blocks(w):
        p = f"_blocks.{blk.index}."
        name = f"block{blk.index}"
        y = x
        if blk.expand:
            y, _ = conv(y, name + ".expand", p + "_expand_conv", p + "_bn0", size, 1, 1)
        y, new_size = conv(y, name + ".dw", p + "_depthwise_conv", p + "_bn1", size, blk.kernel, blk.stride,
                           group=blk.c_mid)
        y, _ = conv(y, name + ".project", p + "_project_conv", p + "_bn2", new_size, 1, 1, relu6=False)
        if blk.residual:
            nodes.append(helper.make_node("Add", [y, x], [name + ".add"], name=name + ".add"))
            y = name + ".add"
        x, size = y, new_size
    x, _ = conv(x, "head", "_conv_head", "_bn1", size, 1, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
    inits.extend([numpy_helper.from_array(w["_fc.weight"].astype(np.float32), "fc.w"),
                  numpy_helper.from_array(w["_fc.bias"].astype(np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1))
    graph = helper.make_graph(
        nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 1000])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="edge-inference")
    model.ir_version = min(model.ir_version, 8)  # readable by older onnxruntime and OpenCV builds
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------- Keras

def build_keras(w: Weights) -> Any:
    """A Keras model: input [N, 224, 224, 3] (NHWC), output softmax [N, 1000]."""
    import keras
    from keras import layers

    check_weights(w)

    def conv_w(key: str) -> np.ndarray[Any, Any]:  # torch OIHW -> Keras HWIO
        return w[key + ".weight"].transpose(2, 3, 1, 0)

    def bn(x: Any, key: str, name: str) -> Any:
        layer = layers.BatchNormalization(epsilon=BN_EPS, name=name)
        y = layer(x)
        layer.set_weights([w[key + ".weight"], w[key + ".bias"], w[key + ".running_mean"], w[key + ".running_var"]])
        return y

    def conv(x: Any, key: str, filters: int, kernel: int, stride: int, name: str) -> Any:
        layer = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)
        y = layer(x)
        layer.set_weights([conv_w(key)])
        return y

    relu6 = 0
    def act(x: Any) -> Any:
        nonlocal relu6
        relu6 += 1
        return layers.ReLU(max_value=6.0, name=f"relu6_{relu6}")(x)

    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="input")
    x = act(bn(conv(inp, "_conv_stem", 32, 3, 2, "stem"), "_bn0", "stem_bn"))
    for blk in blocks(w):
        p = f"_blocks.{blk.index}."
        n = f"block{blk.index}"
        y = x
        if blk.expand:
            y = act(bn(conv(y, p + "_expand_conv", blk.c_mid, 1, 1, n + "_expand"), p + "_bn0", n + "_expand_bn"))
        dw = layers.DepthwiseConv2D(blk.kernel, strides=blk.stride, padding="same", use_bias=False, name=n + "_dw")
        y = dw(y)
        dw.set_weights([w[p + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)])  # (C,1,kh,kw) -> (kh,kw,C,1)
        y = act(bn(y, p + "_bn1", n + "_dw_bn"))
        y = bn(conv(y, p + "_project_conv", blk.c_out, 1, 1, n + "_project"), p + "_bn2", n + "_project_bn")
        if blk.residual:
            y = layers.Add(name=n + "_add")([y, x])
        x = y
    x = act(bn(conv(x, "_conv_head", 1280, 1, 1, "head"), "_bn1", "head_bn"))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    fc = layers.Dense(1000, activation="softmax", name="fc")
    out = fc(x)
    fc.set_weights([w["_fc.weight"].T, w["_fc.bias"]])
    return keras.Model(inp, out, name="efficientnet_lite0")
