"""Atomic file writes: a reader, or a crash, never sees a half-written file.

Everything finetune writes (run records, split files, converted weights, models) goes through a
temporary file in the destination folder, is flushed to disk, and is renamed over the target, so
a kill at any moment leaves either the previous complete file or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file that replaces `path` when the block ends without an error.

    Args:
        path: the file to (re)write; its folder is created if missing.
        mode: "w" for text (UTF-8) or "wb" for bytes. Defaults to "w".

    Yields:
        The open temporary file.

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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_write(path) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Writes JSON atomically, indented for people to read."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
