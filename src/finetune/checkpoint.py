"""Checkpoints that are either complete or ignored.

A checkpoint file (`checkpoints/head.weights.h5`, ...) is written to a temporary file in its
folder, synced and renamed into place (`finetune.atomic.write_file_atomic`); then a small JSON
completion marker beside it (`head.weights.h5.json`) records its size and sha256. A checkpoint
counts only when its marker exists and matches its bytes: a file without a marker, truncated or
half-replaced is skipped, with a message naming it.

Before a complete checkpoint is replaced, it is kept as the previous one (`head.prev.weights.h5`
and its marker; a hard link, so no copy) until the new one and its marker are written, so a kill
at any moment of a save leaves at least one complete checkpoint: the new one, or the one before
it. `usable_checkpoint` picks the newest complete one of the two.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.atomic import write_file_atomic, write_json

MARKER_SUFFIX = ".json"


def marker_path(path: str | os.PathLike[str]) -> Path:
    """The completion marker of a checkpoint file: its name + `.json`."""
    path = Path(path)
    return path.with_name(path.name + MARKER_SUFFIX)


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the checkpoint before `path` is kept: `head.weights.h5` -> `head.prev.weights.h5`."""
    path = Path(path)
    base, _, rest = path.name.partition(".")
    return path.with_name(f"{base}.prev.{rest}" if rest else f"{base}.prev")


def file_digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint at `path` cannot be used, or None when it is complete."""
    path = Path(path)
    marker = marker_path(path)
    if not path.is_file():
        return "the file is missing"
    if not marker.is_file():
        return f"it has no completion marker ({marker.name}): its save did not finish"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        size, sha = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its completion marker {marker.name} is unreadable"
    actual_size, actual_sha = file_digest(path)
    if actual_size != size:
        return (
            f"it holds {actual_size} bytes where its marker says {size}: truncated or "
            "partly written"
        )
    if actual_sha != sha:
        return "its bytes do not match the sha256 in its marker: partly written or replaced"
    return None


def read_marker(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The completion marker's record of a checkpoint (call `checkpoint_problem` first)."""
    return json.loads(marker_path(path).read_text(encoding="utf-8"))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _keep_as_previous(path: Path) -> None:
    """Makes the complete checkpoint at `path` the previous one (hard link, else a copy)."""
    previous = previous_path(path)
    if not (previous.exists() and os.path.samefile(path, previous)):
        staging = path.with_name(f".{previous.name}.{os.getpid()}.tmp")
        staging.unlink(missing_ok=True)
        try:
            try:
                os.link(path, staging)
            except OSError:
                shutil.copy2(path, staging)
            os.replace(staging, previous)
        finally:
            staging.unlink(missing_ok=True)
    record = read_marker(path) | {"file": previous.name}
    write_json(marker_path(previous), record)


def write_weights(model: Any, path: str | os.PathLike[str], optimizer: bool = True) -> None:
    """Writes `model`'s weights to `path` as Keras' `.weights.h5`, the HDF5 built in memory.

    Keras' own `save_weights` has HDF5 write to the disk. When the disk fills up, HDF5 fails
    to close the file and leaves the library holding a broken file, which crashes the process
    when it exits (a segmentation fault after the clear `DiskFullError`; h5py issue 914). Here
    HDF5 writes into memory only, and the disk sees ordinary writes, whose errors leave
    nothing behind. The file is the one `save_weights` writes (`load_weights` reads it).

    Args:
        model: a built `keras.Model`.
        path: where to write; a name ending in `.weights.h5`.
        optimizer: also write the state of a compiled model's optimizer (its moments: twice
            the weights' size for Adam), as `save_weights` does. Defaults to True. (A Keras
            without the internals used here falls back to `save_weights`, which writes it.)
    """
    import io

    from keras.src.saving import saving_lib  # the store and walk `save_weights` itself uses

    if not model.built:
        raise ValueError(f"{model.name} is not built yet: nothing to save.")
    store_class = getattr(saving_lib, "H5IOStore", None)
    save_state = getattr(saving_lib, "_save_state", None)
    if store_class is None or save_state is None:  # a Keras without them (3.10-3.15 have them)
        model.save_weights(str(path))
        return
    # Keras' walk skips what it has visited: marking the optimizer so leaves it out.
    held = getattr(model, "optimizer", None)  # an uncompiled model has none
    skipped = set() if optimizer or held is None else {id(held)}
    buffer = io.BytesIO()
    store = store_class(buffer, mode="w")
    try:
        save_state(
            model, weights_store=store, assets_store=None, inner_path="", visited_saveables=skipped
        )
    finally:
        store.close()
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def weights_writer(model: Any, optimizer: bool = True) -> Callable[[Path], None]:
    """A `write` for `save_checkpoint` that saves `model`'s weights (see `write_weights`)."""
    return lambda path: write_weights(model, path, optimizer=optimizer)


def save_checkpoint(
    path: str | os.PathLike[str], write: Callable[[Path], Any], **meta: Any
) -> dict[str, Any]:
    """Writes a checkpoint with `write(tmp_path)`, atomically, then its completion marker.

    A complete checkpoint already at `path` becomes the previous one first.

    Args:
        path: the checkpoint file.
        write: writes the checkpoint to the path it is given (e.g. `weights_writer(model)`).
        **meta: JSON values recorded in the marker (phase, epoch, monitored value, ...).

    Returns:
        The marker's record: file, size, sha256, saved (UTC time) and `meta`.

    Raises:
        DiskFullError: the disk filled up; the checkpoint already at `path` (or the previous
            one) is unchanged and complete.
    """
    path = Path(path)
    if path.exists() and checkpoint_problem(path) is None:
        _keep_as_previous(path)
    write_file_atomic(path, write)
    size, sha = file_digest(path)
    record = {
        "file": path.name,
        "size": size,
        "sha256": sha,
        "saved": datetime.now(UTC).isoformat(timespec="seconds"),
        **meta,
    }
    write_json(marker_path(path), record)
    _remove(previous_path(path))  # the new one is complete: one checkpoint on disk, not two
    return record


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Deletes a checkpoint, the previous one and their markers (those that exist)."""
    _remove(Path(path))
    _remove(previous_path(path))


def _remove(path: Path) -> None:
    marker_path(path).unlink(missing_ok=True)  # first: a file without marker never counts
    path.unlink(missing_ok=True)


def usable_checkpoint(
    path: str | os.PathLike[str], report: Callable[[str], None] = warn
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of `path`: itself, else the previous one, else None.

    Each candidate that exists but is incomplete is reported (by `report`), naming the file.
    """
    path = Path(path)
    for candidate in (path, previous_path(path)):
        if not candidate.exists() and not marker_path(candidate).exists():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, read_marker(candidate)
        report(f"skipping checkpoint {candidate}: {problem}")
    return None


def latest_checkpoint(
    run_dir: str | os.PathLike[str], report: Callable[[str], None] = warn
) -> tuple[Path, dict[str, Any]] | None:
    """The run's latest complete best-weights checkpoint (by epoch), or None.

    Looks at `run_dir/checkpoints/<phase>.weights.h5` (and each one's previous copy), skipping
    incomplete files with a message naming them.
    """
    folder = Path(run_dir) / "checkpoints"
    found = []
    for path in sorted(folder.glob("*.weights.h5")):
        if ".prev." in path.name:
            continue
        usable = usable_checkpoint(path, report)
        if usable is not None:
            found.append(usable)
    if not found:
        return None
    return max(found, key=lambda item: (item[1].get("epoch", 0), item[1].get("saved", "")))


def all_finite(arrays: Iterable[Any]) -> bool:
    """Whether every value of every array is finite (no NaN, no infinity)."""
    import numpy as np

    return all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays)


def finite_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
