"""Open Inference Protocol bodies, pure: an infer request (JSON, with the
binary tensor data extension) parsed and validated into images or a tensor,
and an answer (scores, or the classification extension's top-k strings)
encoded as JSON or binary. Every way a request can be wrong is an
`OipError` with its HTTP status and a sentence; `oip.py` serves them."""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .models import Classifier

VERSION = "1"
IMAGE, TENSOR, SCORES = "image", "input", "scores"
HEADER_LENGTH = "Inference-Header-Content-Length"


class OipError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ---------------------------------------------------------------- requests

@dataclass
class Output:
    name: str
    binary: bool
    classification: int = 0  # top-k strings instead of scores


@dataclass
class InferRequest:
    id: str | None
    images: list[bytes] | None = None  # the BYTES input
    tensor: np.ndarray[Any, Any] | None = None  # the FP32 input, [N, S, S, 3]
    outputs: list[Output] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)  # the request's own (detection, transformation)

    @property
    def batch(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor) if self.tensor is not None else 0


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    p = obj.get("parameters", {})
    if not isinstance(p, dict):
        raise OipError(400, f"{where}: parameters must be an object")
    return p


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary rest of a request (binary tensor data
    extension: the header's length is `Inference-Header-Content-Length`)."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise OipError(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise OipError(400, f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        head, rest = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        hint = "" if header_length else f" (binary tensor data needs the {HEADER_LENGTH} header)"
        raise OipError(400, f"the request is not JSON: {exc}{hint}") from None
    if not isinstance(doc, dict):
        raise OipError(400, "the request must be a JSON object with 'inputs'")
    return doc, rest


def _shape(t: dict[str, Any], name: str) -> list[int]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise OipError(400, f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    return shape


def deserialize_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES elements in binary form: each a 4-byte little-endian length, then the bytes."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise OipError(400, f"input '{name}': truncated element length at byte {pos}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise OipError(400, f"input '{name}': element {len(out)} claims {n} bytes, {len(raw) - pos} left")
        out.append(raw[pos:pos + n])
        pos += n
    if len(out) != count:
        raise OipError(400, f"input '{name}': shape says {count} elements, the data holds {len(out)}")
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _json_bytes(data: Any, count: int, name: str) -> list[bytes]:
    """BYTES elements in JSON: base64 strings (or {"b64": ...}), flat or nested."""
    flat = list(_flatten(data))
    if len(flat) != count:
        raise OipError(400, f"input '{name}': shape says {count} elements, data holds {len(flat)}")
    out = []
    for i, item in enumerate(flat):
        text = item.get("b64") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise OipError(400, f"input '{name}': element {i} must be a base64 string")
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise OipError(400, f"input '{name}': element {i} is not base64 (in JSON, images are base64 strings; "
                                f"or send them as binary tensor data)") from None
    return out


def _flatten(data: Any) -> Any:
    if isinstance(data, list):
        for x in data:
            yield from _flatten(x)
    else:
        yield data


def parse_infer(doc: dict[str, Any], binary: bytes, size: int | None,
                outputs: tuple[str, ...] = (SCORES,)) -> InferRequest:
    """A validated request for a model taking `image` (BYTES) or, with a
    `size`, `input` (FP32 [N, size, size, 3]), and answering the named
    `outputs` (the first is the classifier's `scores` when `size` is given).
    Every way it can be wrong is a 400."""
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise OipError(400, "'id' must be a string")
    takes = (f"'{IMAGE}' (BYTES, encoded images) or '{TENSOR}' (FP32 [N,{size},{size},3])" if size is not None
             else f"'{IMAGE}' (BYTES, encoded images) only")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OipError(400, f"'inputs' must be a non-empty list; this model takes {takes}")
    req = InferRequest(rid if isinstance(rid, str) else None, parameters=_params(doc, "request"))
    pos = 0
    for t in inputs:
        if not isinstance(t, dict):
            raise OipError(400, "each input must be an object with name, shape, datatype")
        name = t.get("name")
        if not isinstance(name, str) or name not in ((IMAGE, TENSOR) if size is not None else (IMAGE,)):
            raise OipError(400, f"unknown input {name!r}; this model takes {takes}")
        if (name == IMAGE and req.images is not None) or (name == TENSOR and req.tensor is not None):
            raise OipError(400, f"input '{name}' given twice")
        shape = _shape(t, name)
        dtype = t.get("datatype")
        want = "BYTES" if name == IMAGE else "FP32"
        if dtype != want:
            raise OipError(400, f"input '{name}' must have datatype {want}, got {dtype!r}")
        size_param = _params(t, f"input '{name}'").get("binary_data_size")
        raw: bytes | None = None
        if size_param is not None:
            if not isinstance(size_param, int) or isinstance(size_param, bool) or size_param < 0:
                raise OipError(400, f"input '{name}': binary_data_size must be a non-negative integer")
            if pos + size_param > len(binary):
                raise OipError(400, f"input '{name}': binary_data_size {size_param} runs past the body "
                                    f"({len(binary) - pos} bytes of binary data left)")
            raw = binary[pos:pos + size_param]
            pos += size_param
        elif "data" not in t:
            raise OipError(400, f"input '{name}' has neither 'data' nor binary_data_size")
        count = int(np.prod(shape)) if shape else 1
        if name == IMAGE:
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
                raise OipError(400, f"input '{IMAGE}' must have shape [N] or [N,1] with N >= 1, got {shape}")
            req.images = deserialize_bytes(raw, count, name) if raw is not None else _json_bytes(t["data"], count,
                                                                                                   name)
        else:
            if len(shape) != 4 or shape[1:] != [size, size, 3] or shape[0] < 1:
                raise OipError(400, f"input '{TENSOR}' must have shape [N,{size},{size},3] (NHWC) with N >= 1, "
                                    f"got {shape}")
            if raw is not None:
                if len(raw) != count * 4:
                    raise OipError(400, f"input '{TENSOR}': {len(raw)} bytes of FP32 data for shape {shape} "
                                        f"({count * 4} expected)")
                arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
            else:
                try:
                    arr = np.asarray(list(_flatten(t["data"])), dtype=np.float32)
                except (TypeError, ValueError):
                    raise OipError(400, f"input '{TENSOR}': data must be numbers") from None
                if arr.size != count:
                    raise OipError(400, f"input '{TENSOR}': shape {shape} needs {count} numbers, data holds "
                                        f"{arr.size}")
            if not np.isfinite(arr).all():
                raise OipError(400, f"input '{TENSOR}': data holds NaN or infinity")
            req.tensor = np.ascontiguousarray(arr.reshape(shape))
    if pos != len(binary):
        raise OipError(400, f"{len(binary) - pos} bytes of binary data after the last input's binary_data_size")
    if req.images is not None and req.tensor is not None:
        raise OipError(400, f"give '{IMAGE}' or '{TENSOR}', not both")
    req.outputs = _outputs(doc, outputs, classifier=size is not None)
    return req


def _outputs(doc: dict[str, Any], names: tuple[str, ...], classifier: bool) -> list[Output]:
    """The outputs asked for (all of them, in order, when none are named)."""
    all_binary = bool(_params(doc, "request").get("binary_data_output", False))
    wanted = doc.get("outputs")
    if wanted is None:
        return [Output(n, all_binary) for n in names]
    if not isinstance(wanted, list):
        raise OipError(400, "'outputs' must be a list")
    out: list[Output] = []
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else o
        if not isinstance(o, dict) or name not in names:
            raise OipError(400, f"unknown output {name!r}; this model has {', '.join(repr(n) for n in names)}")
        if any(x.name == name for x in out):
            raise OipError(400, f"output '{name}' requested twice")
        p = _params(o, f"output '{name}'")
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise OipError(400, f"output '{name}': classification must be a non-negative integer, got {k!r}")
        if k and not (classifier and name == SCORES):
            raise OipError(400, f"output '{name}': the classification extension applies to a classifier's "
                                f"'{SCORES}' only")
        out.append(Output(name, bool(p.get("binary_data", all_binary)), k))
    return out


# ---------------------------------------------------------------- answers

def top_k(clf: Classifier, probs: np.ndarray[Any, Any], k: int) -> list[bytes]:
    """The classification extension's strings, best first: "score:index:label"."""
    idx = np.argsort(-probs)[:k]
    return [f"{float(probs[i]):f}:{int(i)}:{clf.label(int(i))}".encode() for i in idx]


@dataclass
class Tensor:
    """An output's values: `data` a numpy array (FP32, INT32) or, for BYTES,
    the flat list of elements. `text`: BYTES elements are UTF-8 text, given
    as is in JSON; otherwise (an encoded image) they are base64 in JSON."""
    datatype: str
    shape: list[int]
    data: Any
    text: bool = True


def _json_data(t: Tensor) -> list[Any]:
    if t.datatype == "BYTES":
        return [b.decode() if t.text else base64.b64encode(b).decode() for b in t.data]
    flat = np.asarray(t.data).reshape(-1)
    if t.datatype == "FP32":
        return [round(float(v), 7) for v in flat]
    return [int(v) for v in flat]


def _binary_data(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return serialize_bytes(list(t.data))
    return np.ascontiguousarray(t.data, dtype="<f4" if t.datatype == "FP32" else "<i4").tobytes()


def encode_answer(model: str, rid: str | None, outputs: list[Output], clf: Classifier,
                  probs: np.ndarray[Any, Any]) -> tuple[bytes, int | None]:
    """(body, JSON header length if any output is binary) of a classifier's answer."""
    n = len(probs)
    values: dict[str, Tensor] = {}
    for o in outputs:
        if o.classification:
            k = min(o.classification, probs.shape[1])
            values[o.name] = Tensor("BYTES", [n, k], [s for row in probs for s in top_k(clf, row, k)])
        else:
            values[o.name] = Tensor("FP32", [n, int(probs.shape[1])], probs)
    return encode_tensors(model, rid, outputs, values)


def encode_tensors(model: str, rid: str | None, outputs: list[Output],
                   values: dict[str, Tensor]) -> tuple[bytes, int | None]:
    """(body, JSON header length if any output is binary) of an infer answer
    holding the requested `outputs`, in order, from `values`."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for o in outputs:
        v = values[o.name]
        t: dict[str, Any] = {"name": o.name, "datatype": v.datatype, "shape": v.shape}
        if o.binary:
            blob = _binary_data(v)
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = _json_data(v)
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": tensors}
    if rid is not None:
        doc["id"] = rid
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def model_metadata(clf: Classifier, name: str) -> dict[str, Any]:
    """Both inputs and the output, with (beyond the standard's name, datatype
    and shape) `parameters` saying what goes in: the encoded formats, and the
    FP32 tensor's layout and normalisation."""
    p = clf.preprocess
    s = p.size
    return {
        "name": name,
        "versions": [VERSION],
        "platform": clf.backend,
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1],
             "parameters": {"content": "encoded images, one per element: JPEG, PNG, WebP, BMP, GIF or TIFF"}},
            {"name": TENSOR, "datatype": "FP32", "shape": [-1, s, s, 3],
             "parameters": {"layout": "NHWC", "channels": "BGR" if p.bgr else "RGB", "resize_shorter_side": p.resize,
                            "center_crop": s, "mean": p.mean, "scale": p.scale,
                            "normalisation": "(pixel - mean) * scale"}},
        ],
        "outputs": [{"name": SCORES, "datatype": "FP32", "shape": [-1, len(clf.labels)]}],
    }
