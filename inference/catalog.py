"""The model catalogue: which models exist, which engines run them, and the
order the default backend is chosen in. Plain data, imported by the settings
and by the loaders."""

from __future__ import annotations

MODELS = ("efficientnet-lite0", "inception-v3", "googlenet")
BACKENDS = ("opencv-dnn", "tensorflow", "onnxruntime")
SUPPORTED = {
    "efficientnet-lite0": BACKENDS,
    "inception-v3": ("tensorflow",),
    "googlenet": ("opencv-dnn", "onnxruntime"),
}

# The default backend is the fastest one installed, in this order, measured on
# EfficientNet-Lite0 here (docs/inference.md, "Choosing the backend"):
# onnxruntime ~6-8 ms/image, opencv-dnn ~7-12, tensorflow ~16-20.
PREFERENCE = ("onnxruntime", "opencv-dnn", "tensorflow")
AUTO = "auto"

# The other model kinds (docs/inference.md, "Model kinds"): what a server can
# load beside, or instead of, the classifier; all run on TensorFlow Lite.
KINDS = ("classify", "detect", "transform")
DETECTORS = ("ssd-mobilenet-v2", "blazeface")
SEGMENTERS = ("selfie-segmentation",)
