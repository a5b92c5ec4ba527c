"""Weight files read without PyTorch, as nested containers whose tensors are numpy arrays
(bfloat16 as `ml_dtypes.bfloat16`): `.safetensors`, `.npz`, and the zip format `torch.save` has
written since PyTorch 1.6 (`.pth`, `.pth.tar`).

A `.pth` file is a zip archive holding a pickle (`<name>/data.pkl`) and one raw little-endian byte
buffer per storage (`<name>/data/<key>`). Its pickle is read by a restricted unpickler: the only
globals it resolves are `collections.OrderedDict`, the legacy typed storage classes
(`torch.FloatStorage`, ...) and the tensor / parameter rebuild functions of `torch._utils`, each
mapped to a numpy stand-in written here; any other global is refused (`RefusedPickle`) before
anything is called, so no code from the file runs. Tensors are rebuilt from (storage, offset,
size, stride) after a bounds check. What this reader cannot read (the legacy pre-1.6 format,
tensors of torch's newer dtypes, pickled objects) raises `NeedsTorch`; `torch_import` then falls
back to torch when it is installed.

The safetensors format is parsed here too (an 8-byte header length, a JSON header of
name -> dtype / shape / byte range, then the bytes): the `safetensors` package's numpy API cannot
return bfloat16 tensors.

`digest` gives a file's size and SHA-256, which the importer records (`meta.json`) so that a file
whose checksum is published nowhere (Google Drive, Hugging Face) can be compared afterwards. A
name in torch.hub's form (`resnet18-f37072fd.pth`: the first hex digits of the SHA-256 after the
last `-`) is checked against them, as torch.hub checks what it downloads.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import re
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from mgd_jax.runtime.errors import WeightImportError

# torch's legacy typed storage classes (what `_rebuild_tensor_v2` pickles) -> numpy dtype
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class NeedsTorch(WeightImportError):
    """A file this reader does not handle but torch may (the message says why)."""


class RefusedPickle(NeedsTorch):
    """The pickle names a global outside the allow-list; nothing of it was called."""


# torch.hub's HASH_REGEX, from 8 hex digits on (torchvision's names carry 8; a shorter run, as in
# `model-1.pth`, is a version, not a checksum)
_NAME_HASH = re.compile(r"-([a-f0-9]{8,})\.")


@dataclasses.dataclass(frozen=True)
class Digest:
    """A weight file as read: its byte count and SHA-256 (hex)."""

    size: int
    sha256: str


def digest(path: str | os.PathLike) -> Digest:
    """The size and SHA-256 of a file (local or `gs://`), read in 16 MiB blocks; a name in
    torch.hub's form whose hex prefix the SHA-256 does not start with is refused (a truncated or
    other file than the name says)."""
    file = epath.Path(path)
    if not file.is_file():
        raise WeightImportError(f"{path}: no such file")
    sha, size = hashlib.sha256(), 0
    with file.open("rb") as f:
        while block := f.read(1 << 24):
            sha.update(block)
            size += len(block)
    result = Digest(size, sha.hexdigest())
    named = _NAME_HASH.search(file.name)
    if named and not result.sha256.startswith(named.group(1)):
        raise WeightImportError(
            f"{path}: its name says its SHA-256 starts with {named.group(1)} (torch.hub's naming), "
            f"but the file's is {result.sha256} ({size} bytes): a truncated download or another "
            "file; download it again"
        )
    return result


def read(path: str | os.PathLike) -> Any:
    """The object stored in a weight file (a local path or a `gs://` URL), chosen by its suffix
    (`.safetensors`, `.npz`) or else read as a `torch.save` zip archive."""
    file = epath.Path(path)
    if not file.is_file():
        raise WeightImportError(f"{path}: no such file")
    data = file.read_bytes()
    if file.suffix == ".safetensors":
        return read_safetensors(data, str(path))
    if file.suffix == ".npz":
        return read_npz(data, str(path))
    return read_pth(data, str(path))


def read_npz(data: bytes, source: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data)) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, ...
        raise WeightImportError(f"{source}: cannot read the .npz file ({e})") from e


# ----------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(data: bytes, source: str) -> dict[str, np.ndarray]:
    """name -> array of a `.safetensors` file's bytes (its `__metadata__` is dropped)."""
    path = source
    if len(data) < 8:
        raise WeightImportError(f"{path}: not a safetensors file ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise WeightImportError(
            f"{path}: not a safetensors file, or truncated (a header of {size} bytes in a file "
            f"of {len(data)})"
        )
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as e:
        raise WeightImportError(f"{path}: the safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise WeightImportError(f"{path}: the safetensors header is not a JSON object")
    start = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightImportError(
                f"{path}: tensor {name!r} has an unreadable header entry {entry!r} ({e!r})"
            ) from e
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= len(data) - start:
            raise WeightImportError(
                f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) has byte range "
                f"[{begin}, {end}), which does not fit its size or the file (truncated?)"
            )
        out[name] = np.frombuffer(data, dtype, count, start + begin).reshape(shape).copy()
    return out


# ----------------------------------------------------------------------------------------------
# torch.save's zip format


_MAX_ELEMENTS = 1 << 34  # a bound on one tensor (stride-0 views could otherwise ask for any size)


class _Malformed(Exception):
    """A tensor or parameter record that does not fit its storage (read_pth names the file)."""


class _StorageType:
    """Stand-in for a legacy typed storage class (`torch.FloatStorage`)."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    """One storage's elements, a flat numpy array."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int for v in value):
        raise _Malformed(f"tensor {what} {value!r} is not a tuple of ints")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: the strided view of a storage, copied."""
    if not isinstance(storage, _Storage) or type(offset) is not int:
        raise _Malformed("a tensor is rebuilt from something that is not a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    flat = storage.array
    if (len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride)
            or math.prod(size) > _MAX_ELEMENTS):
        raise _Malformed(f"tensor with size {size}, stride {stride}, offset {offset}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= flat.size:
            raise _Malformed(
                f"tensor with size {size}, stride {stride}, offset {offset} reaches element "
                f"{last} of a storage of {flat.size}"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], size, tuple(s * flat.itemsize for s in stride), writeable=False)
        return np.array(view)
    return np.zeros(size, flat.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
    """`torch._utils._rebuild_parameter[_with_state]`: a parameter is its tensor."""
    if not isinstance(data, np.ndarray):
        raise _Malformed("a parameter is rebuilt from something that is not a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str,
                 big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._source = archive, prefix, source
        self._big_endian = big_endian
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise RefusedPickle(
            f"{self._source}: the pickle names {module}.{name}, which a state dict of tensors "
            "does not need; it was not loaded"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int):
            raise NeedsTorch(f"{self._source}: a storage reference {pid!r} this reader does not "
                             "know (a newer torch dtype?)")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            member = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError as e:
                raise WeightImportError(f"{self._source}: storage {member} is missing") from e
            dtype = kind.dtype.newbyteorder(">") if self._big_endian else kind.dtype
            if len(raw) < numel * dtype.itemsize:
                raise WeightImportError(
                    f"{self._source}: storage {member} has {len(raw)} bytes, not "
                    f"{numel} x {dtype.itemsize}"
                )
            array = np.frombuffer(raw, dtype, numel).astype(kind.dtype, copy=False)
            self._storages[key] = _Storage(array)
        return self._storages[key]


def read_pth(data: bytes, source: str) -> Any:
    """The object `torch.save` stored in a zip-format file's bytes, tensors as numpy arrays."""
    path = source
    if data[:4] != b"PK\x03\x04":
        raise NeedsTorch(f"{path}: not a zip archive (PyTorch's legacy pre-1.6 format?)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles = [n for n in archive.namelist()
                       if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise WeightImportError(
                    f"{path}: a PyTorch zip file has one data.pkl; found {pickles or 'none'}")
            prefix = pickles[0][: -len("data.pkl")]
            names = set(archive.namelist())
            byteorder = (archive.read(f"{prefix}byteorder").decode().strip()
                         if f"{prefix}byteorder" in names else "little")
            unpickler = _Unpickler(archive.read(pickles[0]), archive, prefix, str(path),
                                   big_endian=byteorder == "big")
            return unpickler.load()
    except WeightImportError:
        raise
    except _Malformed as e:
        raise WeightImportError(f"{path}: {e}") from e
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise WeightImportError(
            f"{path}: cannot read the PyTorch file (truncated or corrupt?): {e}"
        ) from e
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise WeightImportError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from e
