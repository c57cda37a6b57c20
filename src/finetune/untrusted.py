"""Opening files that came from someone else: `.keras` models, HDF5 weights and text files.

A model or weights file can come from anywhere, so each is checked before the library that reads
it sees it, whatever that library's version promises:

- `.keras` models (`load_keras_model`): the archive's `config.json` is read as plain JSON first,
  and a model whose config holds a `Lambda` layer, Python bytecode, a layer that reads other files
  (`TFSMLayer`, vocabulary lookups) or any reference outside Keras' modelling namespaces and
  finetune's own layers is refused; its weights file is checked like an HDF5 weights file (below).
  Only then does Keras load it, in safe mode.
- HDF5 files (`check_h5_file`): refused when they hold soft or external links, datasets stored in
  other files (external or virtual datasets), a dataset declaring far more data than it stores, or
  a whole model (`model_config`): finetune reads only weights from `.h5` files.
- Text files a user may write or edit (`read_text`, `read_json`): UTF-8, with or without a byte
  order mark; anything else (UTF-16, cp1252...) is refused naming the file and the line.

Every refusal is a `FinetuneError` (a `WeightsError` for weights) naming the file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from finetune.errors import FinetuneError, WeightsError

__all__ = ["check_h5_file", "check_keras_archive", "load_keras_model", "read_json", "read_text"]

_UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def _resave(kind: str) -> str:
    return f"{kind} files must be UTF-8: save it again as UTF-8 (without a BOM) and retry."


def read_text(
    path: str | os.PathLike[str], kind: str = "text", error: type[FinetuneError] = FinetuneError
) -> str:
    """Reads a UTF-8 text file; a UTF-8 byte order mark is accepted and dropped.

    Args:
        path: the file.
        kind: what the file is, for messages ("TOML", "JSON"...).
        error: the `FinetuneError` subclass to raise.

    Returns:
        The text, without a byte order mark.

    Raises:
        error: the file cannot be read, is UTF-16 or UTF-32, holds NUL bytes, or holds bytes that
            are not UTF-8 (cp1252, Latin-1...); the message names the file and the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    for bom, encoding in _OTHER_BOMS.items():
        if data.startswith(bom):
            raise error(f"{path} is {encoding} text. {_resave(kind)}")
    data = data.removeprefix(_UTF8_BOM)
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise error(
            f"{path}, line {line}: holds NUL bytes (UTF-16 text without a BOM?). {_resave(kind)}"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        byte = data[err.start : err.start + 1].hex()
        raise error(
            f"{path}, line {line}, column {column}: byte 0x{byte} is not UTF-8 (the file looks "
            f"like cp1252 or Latin-1 text). {_resave(kind)}"
        ) from None


def read_json(path: str | os.PathLike[str], error: type[FinetuneError] = FinetuneError) -> Any:
    """Reads a JSON file with `read_text`; a syntax error names the file, line and column.

    Raises:
        error: unreadable, not UTF-8 (see `read_text`) or not valid JSON.
    """
    text = read_text(path, "JSON", error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"cannot read {path}: it is damaged or not JSON (line {err.lineno}, column "
            f"{err.colno}: {err.msg})."
        ) from None


# --- HDF5 -----------------------------------------------------------------------------------------

# A dataset declaring this many bytes or more must store at least 1/_MAX_EXPANSION of them:
# weights compress little, a "shape bomb" (a huge dataset of fill values) stores next to nothing.
_BOMB_FLOOR_BYTES = 1 << 30
_MAX_EXPANSION = 1000


def _h5_problem(f: Any) -> str | None:
    """The first reason to refuse an open `h5py.File`, or None. Follows no link out of it."""
    import h5py

    if "model_config" in f.attrs:
        return (
            "it is a whole Keras model in the legacy HDF5 format, and finetune reads only weights "
            "from .h5 files (a whole model may carry code). Save just the weights, e.g. "
            "`model.save_weights('name.weights.h5')`, or use the .keras format"
        )
    groups: list[tuple[str, Any]] = [("/", f)]
    datasets: list[tuple[str, Any]] = []

    def collect(name: str, obj: Any) -> None:
        # visititems walks hard links only: soft and external links are never resolved here.
        (groups if isinstance(obj, h5py.Group) else datasets).append((name, obj))

    f.visititems(collect)
    for name, group in groups:
        for key in group:
            link = group.get(key, getclass=True, getlink=True)
            if link in (h5py.ExternalLink, h5py.SoftLink):
                where = f"{name.rstrip('/')}/{key}" if name != "/" else f"/{key}"
                kind = (
                    "an external link (to another file)"
                    if link is h5py.ExternalLink
                    else "a soft link"
                )
                return f"it holds {kind} at {where!r}; weights files never do"
    for name, dataset in datasets:
        if not isinstance(dataset, h5py.Dataset):
            continue
        if dataset.external:
            files = ", ".join(str(entry[0]) for entry in dataset.external)
            return f"dataset {name!r} is stored in other files ({files}); weights files never are"
        if dataset.is_virtual:
            return f"dataset {name!r} is a virtual dataset mapped from other files"
        declared = dataset.size * dataset.dtype.itemsize
        if (
            declared > _BOMB_FLOOR_BYTES
            and declared > _MAX_EXPANSION * dataset.id.get_storage_size()
        ):
            return f"dataset {name!r} declares {declared} bytes but stores almost nothing"
    return None


def check_h5_file(
    source: str | os.PathLike[str] | Any, name: str | None = None, error=WeightsError
) -> None:
    """Checks an HDF5 weights file before Keras opens it (see the module docstring).

    Args:
        source: the file's path, or an open binary file object.
        name: how to name the file in messages; default: `source`.
        error: the `FinetuneError` subclass to raise.

    Raises:
        error: not an HDF5 file, or refused; the message names the file and the reason.
    """
    import h5py

    shown = name or str(source)
    try:
        with h5py.File(source, "r") as f:
            problem = _h5_problem(f)
    except Exception as err:  # h5py raises OSError, ValueError, KeyError... for a bad file
        raise error(f"{shown} cannot be read as an HDF5 weights file ({err}).") from None
    if problem:
        raise error(f"{shown}: refused: {problem}.")


# --- .keras models --------------------------------------------------------------------------------

# Class names finetune's models never contain and that run code or read other files.
_REFUSED_CLASSES = {
    "Lambda": "a Lambda layer (it holds Python code)",
    "__lambda__": "Python bytecode",
    "TFSMLayer": "a TFSMLayer (it loads a SavedModel from another path)",
    "StringLookup": "a lookup layer (it may read a vocabulary file)",
    "IntegerLookup": "a lookup layer (it may read a vocabulary file)",
    "TextVectorization": "a text layer (it may read a vocabulary file)",
}
# Where a config may find functions (activations, losses...), and Keras namespaces that hold no
# modelling classes. References outside them are attacks on older Keras versions
# (`keras.utils.get_file`, `keras.config.enable_unsafe_deserialization`, `keras.models.load_model`).
_FUNCTION_NAMESPACES = frozenset(
    {"activations", "losses", "metrics", "initializers", "regularizers", "constraints", "ops"}
)
_CLASSLESS_NAMESPACES = frozenset({"utils", "config", "saving", "backend", "preprocessing"})
_ALLOWED_ROOTS = frozenset({"keras", "finetune"})


def _module_refused(module: str, class_name: str) -> bool:
    """True when a config entry's module is not one finetune's models draw from."""
    if class_name == "function" and module == "builtins":
        return False  # Keras looks such names up among its own activations, losses...
    root, *parts = module.split(".")
    if root not in _ALLOWED_ROOTS:
        return True
    if root != "keras":
        return False  # finetune's own: Keras resolves only objects registered in this process
    if parts[:1] == ["src"]:
        parts = parts[1:]
    namespace = parts[0] if parts else ""
    if class_name == "function":
        return namespace not in _FUNCTION_NAMESPACES
    return namespace in _CLASSLESS_NAMESPACES


def _config_problem(node: Any) -> str | None:
    """The first object in a Keras config that finetune refuses to deserialize, or None."""
    pending = [node]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        pending.extend(item.values())
        class_name = item.get("class_name")
        if not isinstance(class_name, str):
            continue
        if class_name in _REFUSED_CLASSES:
            return f"it holds {_REFUSED_CLASSES[class_name]}"
        module = item.get("module")
        if module is None:
            continue  # resolved only among objects registered in this process
        if not isinstance(module, str) or _module_refused(module, class_name):
            target = item.get("config") if class_name == "function" else class_name
            return (
                f"it refers to `{module}.{target}`, which is neither a Keras modelling object "
                "nor one of finetune's"
            )
    return None


def check_keras_archive(path: str | os.PathLike[str]) -> None:
    """Checks a `.keras` file before Keras opens it (see the module docstring).

    Raises:
        FinetuneError: not a `.keras` archive, or refused; the message names the file.
    """
    path = Path(path)
    refuse = f"{path}: refused: "
    if not zipfile.is_zipfile(path):
        raise FinetuneError(
            f"cannot load {path}: it is not a .keras model (a zip archive); legacy HDF5 models "
            "(.h5) and other formats are not loaded."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                pure = PurePosixPath(member)
                if pure.is_absolute() or ".." in pure.parts or "\\" in member:
                    raise FinetuneError(
                        f"{refuse}the archive member {member!r} leaves the archive."
                    )
            try:
                config = json.loads(archive.read("config.json"))
            except KeyError:
                raise FinetuneError(
                    f"{path} is not a .keras model: config.json is missing."
                ) from None
            problem = _config_problem(config)
            if problem:
                raise FinetuneError(
                    f"{refuse}{problem}. finetune never runs code from a model file; load only "
                    "models written by finetune (or plain Keras layers)."
                )
            if "model.weights.h5" in archive.namelist():
                shown = f"{path} (its model.weights.h5)"
                info = archive.getinfo("model.weights.h5")
                if info.compress_type == zipfile.ZIP_STORED:
                    # What Keras writes. HDF5 reads by seeking, and a seek back in a zip member
                    # reads it again from its start: 0.6 s for a 41 MB Lite0 run, against 0.05 s
                    # in memory. Stored, it is no larger than the archive on disk.
                    data = io.BytesIO(archive.read(info))
                    check_h5_file(data, shown, FinetuneError)
                else:  # compressed (another writer): streamed, never inflated into memory
                    with archive.open(info) as weights:
                        check_h5_file(weights, shown, FinetuneError)
    except FinetuneError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        # EOFError: a member shorter than its header says (read whole, not streamed)
        raise FinetuneError(f"{path} is damaged: {err}.") from None


def load_keras_model(path: str | os.PathLike[str], compile: bool = True) -> Any:
    """Loads a `.keras` model after `check_keras_archive`, with Keras' safe mode.

    Args:
        path: the `.keras` file.
        compile: compile the model as saved (False for inference only). Defaults to True.

    Raises:
        FinetuneError: missing, refused (see the module docstring) or not loadable by Keras.
    """
    import keras

    import finetune.model  # noqa: F401  (registers finetune's layers for loading)

    if compile:  # the saved optimizer may be one of finetune's (FusedAdam, Discriminative...)
        import finetune.recipes.discriminative  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path} does not exist or is not a file.")
    check_keras_archive(path)
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as err:  # Keras raises many types for a damaged or unsafe file
        raise FinetuneError(f"cannot load {path}: {err}") from None
