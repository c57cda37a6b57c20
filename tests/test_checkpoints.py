"""Atomic outputs and checkpoints: a kill or a full disk at any moment leaves complete files.

Every file of a run directory is written to a temporary file in its folder, synced and renamed
into place; a checkpoint counts only with its completion marker (size + sha256), the previous
complete checkpoint is kept until a new one is complete, and a full disk raises a `DiskFullError`
naming the file while the previous checkpoint stays loadable.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import finetune
from finetune import checkpoint
from finetune.atomic import DiskFullError, write_json
from finetune.checkpoint import (
    checkpoint_problem,
    latest_checkpoint,
    marker_path,
    previous_path,
    save_checkpoint,
    usable_checkpoint,
    write_weights,
)
from finetune.run import save_model_atomic
from tests.helpers import DIGITS, image_subset

SIZE = 32


def small_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])


def weights_of(model):
    return [np.asarray(w) for w in model.get_weights()]


def same_weights(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def loaded(path) -> list[np.ndarray]:
    model = small_model(99)
    model.load_weights(path)
    return weights_of(model)


def full_disk_writer(path: Path) -> None:
    """Writes a partial file, then fails as a full disk does."""
    Path(path).write_bytes(b"\x89HDF partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_checkpoint_counts_only_with_its_marker_and_the_previous_one_stays_until_then(
    tmp_path, monkeypatch
):
    path = tmp_path / "head.weights.h5"
    first, second = small_model(0), small_model(1)
    record = save_checkpoint(path, first.save_weights, phase="head", epoch=1)
    assert record["size"] == path.stat().st_size and len(record["sha256"]) == 64
    assert checkpoint_problem(path) is None
    save_checkpoint(path, second.save_weights, phase="head", epoch=2)
    # The new one is complete: the one before it is gone, one checkpoint stays on disk.
    assert same_weights(loaded(path), weights_of(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.weights.h5", "head.weights.h5.json"]

    # A kill after the new file was renamed into place but before its marker was written:
    # the file no longer matches the marker; it is skipped, by name, and the previous one used.
    def killed_at_the_marker(target, record):
        if Path(target) == marker_path(path):
            raise KeyboardInterrupt
        write_json(target, record)

    monkeypatch.setattr(checkpoint, "write_json", killed_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_model(2).save_weights, phase="head", epoch=3)
    messages: list[str] = []
    found, marker = usable_checkpoint(path, messages.append)
    assert found == previous_path(path) and marker["epoch"] == 2
    assert same_weights(loaded(found), weights_of(second))
    assert len(messages) == 1 and str(path) in messages[0] and "sha256" in messages[0]

    # Truncated: named with its size.
    data = previous_path(path).read_bytes()
    previous_path(path).write_bytes(data[: len(data) // 2])
    messages.clear()
    assert usable_checkpoint(path, messages.append) is None
    assert "truncated" in messages[1] and str(previous_path(path)) in messages[1]

    # No marker at all (the save never finished).
    other = tmp_path / "finetune.weights.h5"
    first.save_weights(other)
    assert "no completion marker" in checkpoint_problem(other)


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_file(tmp_path):
    path = tmp_path / "finetune.weights.h5"
    good = small_model(0)
    save_checkpoint(path, good.save_weights, epoch=1)
    before = path.read_bytes(), marker_path(path).read_bytes()
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(path, full_disk_writer, epoch=2)
    message = str(caught.value)
    assert isinstance(caught.value, finetune.FinetuneError)
    assert str(path) in message and "Free some space" in message
    # The checkpoint in place is the one from before, complete and loadable; no partial file.
    assert (path.read_bytes(), marker_path(path).read_bytes()) == before
    assert checkpoint_problem(path) is None
    assert same_weights(loaded(path), weights_of(good))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    # A kill (any exception, KeyboardInterrupt included) mid-write also leaves it alone.
    def killed(p):
        Path(p).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, killed, epoch=2)
    assert checkpoint_problem(path) is None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_full_disk_while_writing_records_or_the_model_is_named(tmp_path, monkeypatch):
    record = tmp_path / "metrics.json"
    write_json(record, {"accuracy": 0.9})
    model_file = tmp_path / "model.keras"
    save_model_atomic(small_model(0), model_file)
    before = model_file.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # where a full disk shows on some file systems
    with pytest.raises(DiskFullError, match="metrics.json"):
        write_json(record, {"accuracy": 0.1})
    with pytest.raises(DiskFullError, match="model.keras"):
        save_model_atomic(small_model(1), model_file)
    monkeypatch.undo()
    assert json.loads(record.read_text()) == {"accuracy": 0.9}
    assert model_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.keras"]


def _mount_small_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0:
        return False
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True
    )
    return result.returncode == 0


_FULL_DISK_CHILD = """
import sys
from pathlib import Path

import keras
import numpy as np

from finetune.atomic import DiskFullError
from finetune.checkpoint import checkpoint_problem, save_checkpoint, weights_writer

folder = Path(sys.argv[1])
path = folder / "head.weights.h5"
small = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
save_checkpoint(path, weights_writer(small), epoch=1)
big = keras.Sequential([keras.Input((256,)), keras.layers.Dense(1024)])  # ~1 MB
try:
    save_checkpoint(path, weights_writer(big), epoch=2)
except DiskFullError as err:
    print("REFUSED", err, flush=True)
assert checkpoint_problem(path) is None
check = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
check.load_weights(path)
same = all(np.array_equal(a, b) for a, b in zip(check.get_weights(), small.get_weights()))
print("KEPT", same, sorted(p.name for p in folder.iterdir() if p.name.startswith(".")), flush=True)
"""


@pytest.mark.slow
def test_a_real_full_file_system(tmp_path):
    """On a 256 KiB tmpfs (needs root to mount; skipped otherwise), in a process of its own.

    The process must also exit cleanly: Keras' own `save_weights` failing on a full disk leaves
    HDF5 holding a broken file, and the process then dies of a segmentation fault at exit.
    """
    folder = tmp_path / "small"
    if not _mount_small_tmpfs(folder):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        child = subprocess.run(
            [sys.executable, "-c", _FULL_DISK_CHILD, str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        assert child.returncode == 0, child.stderr[-3000:]
        assert "REFUSED" in child.stdout and "head.weights.h5" in child.stdout
        assert "KEPT True []" in child.stdout
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_weights_written_in_memory_are_what_save_weights_writes(tmp_path):
    model = small_model(4)
    write_weights(model, tmp_path / "a.weights.h5")
    assert same_weights(loaded(tmp_path / "a.weights.h5"), weights_of(model))
    # A compiled model's optimizer state goes in too, as with save_weights, unless left out.
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 8)), np.zeros((4, 2)), verbose=0)
    write_weights(model, tmp_path / "c.weights.h5")
    write_weights(model, tmp_path / "d.weights.h5", optimizer=False)
    with h5py.File(tmp_path / "c.weights.h5", "r") as c, h5py.File(tmp_path / "d.weights.h5") as d:
        assert "optimizer" in c and "optimizer" not in d
    assert same_weights(loaded(tmp_path / "d.weights.h5"), weights_of(model))
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        write_weights(unbuilt, tmp_path / "b.weights.h5")
    assert not (tmp_path / "b.weights.h5").exists()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=3, per_class=20)


@pytest.mark.slow
def test_every_run_file_is_renamed_into_place_and_a_full_disk_stops_the_run(
    digits, tmp_path, monkeypatch
):
    replaced: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "run"
    finetune.train(
        digits, out=out, image_size=SIZE, head_epochs=1, finetune_epochs=1, progress=False
    )
    monkeypatch.undo()
    written = {p for p in out.rglob("*") if p.is_file()}
    assert {out / "model.keras", out / "report.html", out / "predictions.csv"} <= written
    assert {out / "checkpoints" / "head.weights.h5.json"} <= written
    # Every file in the run directory arrived by a rename from a temporary file beside it.
    assert written <= {dst for _, dst in replaced}
    assert all(src.parent == dst.parent and src.name.startswith(".") for src, dst in replaced)
    found, marker = latest_checkpoint(out)
    assert found == out / "checkpoints" / "finetune.weights.h5" and marker["epoch"] == 2
    # A finished run keeps each phase's best weights, without the copies from before (".prev")
    # or the state to resume from; the weights alone, which load into the classifier.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "finetune.weights.h5",
        "finetune.weights.h5.json",
        "head.weights.h5",
        "head.weights.h5.json",
    ]
    with h5py.File(found, "r") as weights_file:
        assert "optimizer" not in weights_file and "layers" in weights_file
    best = finetune.build_classifier(
        finetune.get_backbone("efficientnet_lite0"), 3, image_size=SIZE, weights=None
    )
    best.load_weights(found)  # one epoch: the best is the model the run saved
    assert same_weights(weights_of(best), weights_of(finetune.Run.load(out).model))

    # The disk fills up while the second phase saves its checkpoint: the run stops with an
    # error naming the file, the first phase's checkpoint is complete, and the run is not
    # recorded as finished.
    out2 = tmp_path / "run2"
    real_write = checkpoint.write_weights

    def write_weights(model, path, **options):
        if "finetune" in Path(path).name:
            full_disk_writer(path)
        return real_write(model, path, **options)

    monkeypatch.setattr(checkpoint, "write_weights", write_weights)
    with pytest.raises(DiskFullError, match=r"finetune\.weights\.h5"):
        finetune.train(
            digits, out=out2, image_size=SIZE, head_epochs=1, finetune_epochs=1,
            check_data=False, progress=False,
        )  # fmt: skip
    monkeypatch.undo()
    head = out2 / "checkpoints" / "head.weights.h5"
    assert checkpoint_problem(head) is None
    assert not (out2 / "checkpoints" / "finetune.weights.h5").exists()
    assert not (out2 / "model.keras").exists()
    assert not [p for p in out2.rglob(".*") if p.is_file()]
    restored = finetune.build_classifier(
        finetune.get_backbone("efficientnet_lite0"), 3, image_size=SIZE, weights=None
    )
    restored.load_weights(head)
    assert all(np.isfinite(np.asarray(w)).all() for w in restored.get_weights())
