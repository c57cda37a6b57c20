"""A run's kept OpenVINO conversion, found from its model file alone.

`finetune train` converts the model once for its own evaluation and keeps the conversion in the
user cache, named by the model's architecture and weights (`finetune.inference.conversion_file`),
which takes Keras to compute. It also records here which conversion belongs to the bytes of the
run's `model.keras`: a link file in the same cache, named by a sha256 of those bytes (taken from
the file as it was written), the packages' versions and the runtime on this machine
(`conversion_label`). `finetune predict RUN` then finds the conversion by hashing the file
(27-41 ms for the demo's 41 MB), loads it and predicts without TensorFlow or Keras: 0.50 s for
one image from the command line, against 5.40 s through the run's Keras model
(benchmarks/RESULTS.md, fifteenth slice).

The link holds only a file name in the cache folder. A model file changed in any byte, other
package versions or another thread count find no link, and `predict` loads the run as before
(and links its conversion for next time). What is linked passed the check against Keras on its
first batch when it was kept (see `finetune.inference.GuardedForward`). This module imports
neither Keras nor TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

# A run directory's model (`finetune.run` re-exports it).
MODEL_FILE = "model.keras"
LINK_SUFFIX = ".run"
# OpenVINO conversions only: what predictions in "auto" use (ONNX Runtime is asked for by name).
LINKED_RUNTIMES = ("openvino", "openvino-bf16")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_state(path: Path) -> tuple[int, int, int] | None:
    """(size, modification time in ns, inode) of a file, or None when it cannot be read: what
    changes when the file is rewritten or replaced."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def link_file(file_digest: str, runtime: str) -> Path:
    """Where the name of the conversion of the model saved in the bytes whose sha256 is
    `file_digest` is kept, for `runtime` ("openvino" or "openvino-bf16") on this machine (it
    may not exist).

    Raises:
        OSError: the cache folder cannot be made.
    """
    from finetune.cache import cache_dir
    from finetune.inference import conversion_label

    folder, label = conversion_label(runtime)
    key = hashlib.sha256(f"model file {file_digest}|{label}".encode()).hexdigest()
    return cache_dir(folder) / f"{key[:40]}{LINK_SUFFIX}"


def link_run_conversion(run: Any, file_digest: str) -> Path | None:
    """Links the OpenVINO conversion `run` holds for its model (`Run.prediction_forward`: the
    last one it predicted with) to `file_digest`, the sha256 of the file that model was just
    saved to or loaded from: only when the conversion was kept in the cache and the model's
    weights are still those it was made for. A cache that cannot be written costs only time
    next call.

    Returns:
        The link file written, or None.
    """
    from finetune.atomic import DiskFullError, write_text_atomic
    from finetune.inference import GuardedForward, weights_checksum

    kept = getattr(run, "_converted", None)
    if kept is None or kept[0] is not run.model:
        return None
    _, (_, chosen), checksum, forward = kept
    if not isinstance(forward, GuardedForward) or forward.runtime not in LINKED_RUNTIMES:
        return None
    if chosen not in LINKED_RUNTIMES or forward.cache is None or not forward.cache.is_file():
        return None
    # Trained or changed since: not that conversion. (Read once, eagerly: 12 ms for Lite0,
    # where the run's own watch would trace a function for its next calls.)
    if weights_checksum(run.model) != checksum:
        return None
    try:
        link = link_file(file_digest, chosen)
        if link.parent != forward.cache.parent:
            return None
        write_text_atomic(link, forward.cache.name + "\n")
    except (OSError, RuntimeError, DiskFullError):
        return None
    return link


def linked_conversion(link: Path) -> Path | None:
    """The conversion file a link names, if it is a `.blob` of the link's own folder that
    exists; None otherwise (a link to a conversion pruned since, unreadable, or naming a path
    elsewhere)."""
    try:
        name = link.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    conversion = link.parent / name
    if Path(name).name != name or conversion.suffix != ".blob" or not conversion.is_file():
        return None
    return conversion


def kept_forward(file_digest: str, runtime: str) -> tuple[Any, Path] | None:
    """The OpenVINO model linked to `file_digest` (a model file's sha256) for `runtime`,
    loaded (an `OpenVinoForward`), and its link; or None: no link, a link to a conversion no
    longer kept, or one that does not load (its link is then deleted)."""
    from finetune.inference import OpenVinoForward, _touch

    if runtime not in LINKED_RUNTIMES:
        return None
    try:
        link = link_file(file_digest, runtime)
    except (OSError, RuntimeError):
        return None
    conversion = linked_conversion(link)
    if conversion is None:
        return None
    try:
        forward = OpenVinoForward(None, conversion, bfloat16=runtime == "openvino-bf16")
    except Exception:  # damaged, or from an OpenVINO that cannot read it: Keras' path
        link.unlink(missing_ok=True)
        return None
    _touch(conversion)  # recently used: kept by `prune_conversions`
    return forward, link
