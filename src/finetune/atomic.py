"""Atomic file writes: a reader, or a crash, never sees a half-written file.

Everything finetune writes (run records, split files, converted weights, models, checkpoints)
goes through a temporary file in the destination folder, is flushed to disk (fsync), and is
renamed over the target (the folder is synced too), so a kill at any moment leaves either the
previous complete file or the new one. A full disk (or quota) while writing raises
`DiskFullError` naming the file, and the previous file is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from finetune.errors import FinetuneError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(FinetuneError):
    """The disk (or the user's quota) filled up while a file was being written.

    Args:
        path: the file that could not be written; its previous version is unchanged.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        super().__init__(
            f"no space left on the disk while writing {self.path}: the file was not written "
            "and its previous version (if any) is unchanged. Free some space on that disk, or "
            "choose an --out folder on another disk, and run again (an unfinished training run "
            "resumes from its last complete checkpoint)."
        )


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from, e.g. inside h5py or zipfile) is ENOSPC."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and (
            current.errno in _NO_SPACE or "No space left on device" in str(current)
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Flushes a folder's entries (a rename into it) to disk; a no-op where folders cannot be."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file that replaces `path` when the block ends without an error.

    Args:
        path: the file to (re)write; its folder is created if missing.
        mode: "w" for text (UTF-8) or "wb" for bytes. Defaults to "w".

    Yields:
        The open temporary file.

    Raises:
        DiskFullError: the disk filled up; `path` is unchanged.

    Example:
        >>> with atomic_write("out/metrics.json") as f:
        ...     f.write("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise


def write_file_atomic(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Has `write(tmp_path)` write a file (e.g. Keras' `save_weights`), then renames it to `path`.

    The temporary file is in `path`'s folder and keeps its name's ending (Keras checks
    `.weights.h5` and `.keras`); it is synced to disk before the rename, and removed on any error.

    Raises:
        DiskFullError: the disk filled up; `path` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ending = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
    # Unique per process and thread: two writers of the same file never share a temporary one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp{ending}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_write(path) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Writes JSON atomically, indented for people to read."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
