"""Read a PyTorch state dict (`.pth`) into numpy arrays without torch and
without trusting the file: a restricted unpickler admits only the handful of
globals a plain tensor state dict needs, and anything else is refused.

Both serialisations are supported: the legacy one (before torch 1.6: a run of
pickles followed by the raw storages) and the zip archive of later versions.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Storage classes a state dict may name, and the numpy type of their elements.
STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeFileError(ValueError):
    """The file is not a plain tensor state dict (or is damaged)."""


@dataclass
class _StorageType:
    dtype: np.dtype[Any]


@dataclass
class _Storage:
    key: str
    dtype: np.dtype[Any]
    numel: int
    data: np.ndarray[Any, Any] | None = None


@dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray[Any, Any]:
        data = self.storage.data
        if data is None:
            raise UnsafeFileError(f"storage {self.storage.key} has no data")
        need = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True)) + 1
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, data.dtype)
        if self.offset < 0 or need > data.size or any(s < 0 for s in self.stride):
            raise UnsafeFileError(f"tensor view outside its storage {self.storage.key}")
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=tuple(s * item for s in self.stride), writeable=False)
        return np.array(view)  # a compact copy that owns its memory


def _rebuild_tensor_v2(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                       requires_grad: bool = False, hooks: Any = None, metadata: Any = None) -> _LazyTensor:
    if not isinstance(storage, _Storage):
        raise UnsafeFileError("tensor without a storage")
    return _LazyTensor(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: _LazyTensor, requires_grad: bool = False, hooks: Any = None) -> _LazyTensor:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits OrderedDict, the two tensor rebuild functions and storage types;
    refuses every other global, which is how malicious pickles run code."""

    def __init__(self, f: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(f)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise UnsafeFileError(f"refusing to load {module}.{name}: not part of a plain tensor state dict")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeFileError(f"unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise UnsafeFileError("storage of an unknown type")
        key = str(key)
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(key, stype.dtype, int(numel))
        return st


def _state_dict(obj: Any) -> dict[str, np.ndarray[Any, Any]]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnsafeFileError("the file does not hold a state dict")
    out: dict[str, np.ndarray[Any, Any]] = {}
    for k, v in obj.items():
        if isinstance(v, _LazyTensor):
            out[str(k)] = v.materialise()
    return out


def _load_legacy(f: IO[bytes]) -> dict[str, np.ndarray[Any, Any]]:
    storages: dict[str, _Storage] = {}
    magic = _RestrictedUnpickler(f, storages).load()
    if magic != LEGACY_MAGIC:
        raise UnsafeFileError("not a PyTorch file (bad magic number)")
    if _RestrictedUnpickler(f, storages).load() != LEGACY_PROTOCOL:
        raise UnsafeFileError("unsupported legacy PyTorch protocol version")
    _RestrictedUnpickler(f, storages).load()  # sys info: endianness and type sizes
    obj = _RestrictedUnpickler(f, storages).load()
    keys = _RestrictedUnpickler(f, storages).load()
    if not isinstance(keys, list):
        raise UnsafeFileError("damaged storage index")
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise UnsafeFileError(f"storage {key} is not referenced")
        head = f.read(8)
        if len(head) != 8:
            raise UnsafeFileError("file truncated in the storages")
        (numel,) = struct.unpack("<q", head)
        if numel != st.numel or numel < 0:
            raise UnsafeFileError(f"storage {key} has {numel} elements, expected {st.numel}")
        raw = f.read(numel * st.dtype.itemsize)
        if len(raw) != numel * st.dtype.itemsize:
            raise UnsafeFileError("file truncated in the storages")
        st.data = np.frombuffer(raw, st.dtype)
    return _state_dict(obj)


def _load_zip(z: zipfile.ZipFile) -> dict[str, np.ndarray[Any, Any]]:
    names = z.namelist()
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise UnsafeFileError("zip archive without data.pkl")
    prefix = pkl[: -len("data.pkl")]
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(z.read(pkl)), storages).load()
    for key, st in storages.items():
        try:
            raw = z.read(f"{prefix}data/{key}")
        except KeyError:
            raise UnsafeFileError(f"storage {key} missing from the archive") from None
        if len(raw) < st.numel * st.dtype.itemsize:
            raise UnsafeFileError(f"storage {key} is shorter than declared")
        st.data = np.frombuffer(raw, st.dtype, count=st.numel)
    return _state_dict(obj)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray[Any, Any]]:
    """The tensors of a `.pth` state dict as numpy arrays, keyed by name.
    Raises UnsafeFileError for anything that is not a plain state dict."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return _load_zip(z)
        with open(path, "rb") as f:
            return _load_legacy(f)
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, zipfile.BadZipFile,
            AttributeError, IndexError, KeyError) as exc:
        raise UnsafeFileError(f"{path.name}: not a readable state dict ({exc})") from None
