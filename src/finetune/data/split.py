"""Seeded, stratified train/val/test splits, and the `split.json` that records them.

When the data folder does not provide a split, it is made here: per class, the files are sorted
by path (so the listing order of the file system does not matter), shuffled with a NumPy generator
seeded from the run's seed and the class label, and cut by largest-remainder rounding, so each
split receives its fraction of every class to within one image. Every split with a positive
fraction receives at least one image of a class that has enough images; a class with fewer images
than there are such splits fills train first, then val, then test. The split actually used is
written to the run directory as JSON, paths relative to the data folder, so the run can be
reproduced even if a later NumPy version shuffled differently.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from finetune.atomic import write_text_atomic
from finetune.data.scan import SPLIT_NAMES, ImageFolder, Sample
from finetune.errors import ConfigError, DataError
from finetune.untrusted import read_json

__all__ = [
    "DEFAULT_FRACTIONS",
    "SPLIT_FILE_FORMAT",
    "SplitFile",
    "complete_splits",
    "read_split",
    "stratified_split",
    "write_split",
]

#: Fractions used when the user does not choose: 80% train, 10% val, 10% test.
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}

#: Value of the "format" key that identifies a split file.
SPLIT_FILE_FORMAT = "finetune-split"
_SPLIT_FILE_VERSION = 1

# How far the fractions may add up away from 1 (0.7 + 0.2 + 0.1 is not exactly 1.0 in binary).
_SUM_TOLERANCE = 1e-6


@dataclass
class SplitFile:
    """The content of a `split.json`.

    Attributes:
        root: the data folder the paths are relative to (as recorded, or as overridden).
        class_names: class names; a sample's label indexes this list.
        seed: the seed the split was made with (None if it was not recorded).
        fractions: the fractions the split was made with.
        splits: samples per split, paths joined to `root`.
        counts: images per split and class name, computed from `splits`.
    """

    root: Path
    class_names: list[str]
    seed: int | None
    fractions: dict[str, float]
    splits: dict[str, list[Sample]]
    counts: dict[str, dict[str, int]]


def _ordered(keys: Sequence[str]) -> list[str]:
    """Split names in priority order: train, val, test, then any other name as given."""
    return [k for k in SPLIT_NAMES if k in keys] + [k for k in keys if k not in SPLIT_NAMES]


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validates split fractions and returns them in priority order.

    Raises:
        ConfigError: no fractions, a value that is not a number in [0, 1], or a sum other than 1.
    """
    if not fractions:
        raise ConfigError("split fractions are empty: give e.g. train=0.8, val=0.1, test=0.1")
    checked: dict[str, float] = {}
    for name, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
            raise ConfigError(f"split fraction for {name!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"split fraction for {name!r} must be between 0 and 1, got {value}")
        checked[str(name)] = value
    total = math.fsum(checked.values())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        terms = ", ".join(f"{k}={v:g}" for k, v in checked.items())
        raise ConfigError(f"split fractions must add up to 1, but {terms} add up to {total:g}")
    return {k: checked[k] for k in _ordered(list(checked))}


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Splits n items into counts proportional to fractions (given in priority order).

    Largest-remainder rounding keeps every count within one of its exact share; ties go to the
    higher-priority split. Then each split with a positive fraction that got nothing takes one
    item from the largest split, so that every split sees every class; if n is smaller than the
    number of such splits, the first n splits in priority order get one item each.
    """
    # Rounded so that 0.7 * 10 = 7.000000000000001 does not count as a remainder.
    quotas = [round(n * f, 9) for f in fractions]
    counts = [math.floor(q) for q in quotas]
    left = n - sum(counts)
    by_remainder = sorted(
        (i for i, f in enumerate(fractions) if f > 0), key=lambda i: (counts[i] - quotas[i], i)
    )
    for i in by_remainder[:left]:
        counts[i] += 1
    positive = [i for i, f in enumerate(fractions) if f > 0]
    if n < len(positive):
        counts = [0] * len(fractions)
        for i in positive[:n]:
            counts[i] = 1
        return counts
    for i in positive:
        if counts[i] == 0:
            # Pigeonhole: n >= len(positive) and one of them is empty, so the donor holds >= 2.
            # On ties, take from the lowest-priority split to leave train as large as possible.
            donor = max(range(len(counts)), key=lambda j: (counts[j], j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _sort_key(sample: Sample) -> tuple[int, str]:
    return sample.label, Path(sample.path).as_posix()


def stratified_split(
    samples: Sequence[Sample], fractions: Mapping[str, float], seed: int
) -> dict[str, list[Sample]]:
    """Splits samples by class into the given fractions, reproducibly.

    Each class is split on its own (stratification): its samples are sorted by path, shuffled
    with `numpy.random.default_rng([seed, label])` and cut into consecutive runs sized by
    largest-remainder rounding. A split with a positive fraction gets at least one image of each
    class that has at least as many images as there are such splits; a smaller class fills
    train first, then val, then test (then other names in the order given).

    Args:
        samples: the samples to split.
        fractions: fraction per split name, e.g. {"train": 0.8, "val": 0.1, "test": 0.1};
            each between 0 and 1, adding up to 1.
        seed: non-negative integer; the same seed and samples always give the same split.

    Returns:
        Samples per split name (every name in `fractions`, in priority order train, val, test,
        then others), each list ordered by label then path.

    Raises:
        ConfigError: the fractions are not valid or do not add up to 1, or the seed is negative.
    """
    checked = _check_fractions(fractions)
    seed = _check_seed(seed)
    names = list(checked)
    shares = [checked[k] for k in names]
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(int(sample.label), []).append(sample)

    out: dict[str, list[Sample]] = {k: [] for k in names}
    for label in sorted(by_label):
        items = sorted(by_label[label], key=_sort_key)
        # One generator per class: adding or removing a class leaves the others' splits alone.
        order = np.random.default_rng([seed, label]).permutation(len(items))
        start = 0
        for name, count in zip(names, _allocate(len(items), shares), strict=True):
            out[name].extend(items[i] for i in order[start : start + count])
            start += count
    for name in names:
        out[name].sort(key=_sort_key)
    return out


def complete_splits(
    folder: ImageFolder, fractions: Mapping[str, float], seed: int
) -> dict[str, list[Sample]]:
    """Returns train, val and test samples, making the splits the data folder does not give.

    For the flat layout every image is split with `stratified_split`. For the pre-split layout
    the given splits are kept as they are; a missing val (and/or test) split with a positive
    fraction is carved out of train with its share relative to the splits being made: with the
    default 0.8/0.1/0.1 and no val/ folder, val takes 0.1 / (0.8 + 0.1) = 1/9 of train/.

    Args:
        folder: the result of `scan_image_folder`.
        fractions: fractions for "train", "val" and "test" (a missing name means 0); they must
            add up to 1 and train must be positive.
        seed: non-negative integer seed for the shuffles.

    Returns:
        {"train": [...], "val": [...], "test": [...]}; a split may be empty when its fraction is
        0 (or a given folder is empty of a class).

    Raises:
        ConfigError: fractions not valid, a split name other than train/val/test, or train 0.
    """
    checked = _check_fractions(fractions)
    unknown = [k for k in checked if k not in SPLIT_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown split name(s) {', '.join(map(repr, unknown))}: use train, val and test"
        )
    if checked.get("train", 0.0) <= 0.0:
        raise ConfigError("the train fraction must be greater than 0")

    if folder.layout == "flat":
        made = stratified_split(folder.samples["all"], checked, seed)
        return {k: made.get(k, []) for k in SPLIT_NAMES}

    given = folder.samples
    result = {k: list(given.get(k, [])) for k in SPLIT_NAMES}
    missing = [k for k in ("val", "test") if k not in given and checked.get(k, 0.0) > 0.0]
    if missing:
        parts = {k: checked[k] for k in ("train", *missing)}
        total = math.fsum(parts.values())
        carved = stratified_split(given["train"], {k: v / total for k, v in parts.items()}, seed)
        for k, v in carved.items():
            result[k] = v
    return result


def _relative(path: Path, root: Path) -> str:
    """A sample's path relative to root, POSIX style; DataError if it is not inside root."""
    for candidate, base in (
        (path, root),
        (Path(os.path.abspath(path)), Path(os.path.abspath(root))),
        (path.resolve(), root.resolve()),
    ):
        with contextlib.suppress(ValueError):
            return candidate.relative_to(base).as_posix()
    raise DataError(f"{path} is not inside the data folder {root}")


def write_split(
    path: str | os.PathLike[str],
    splits: Mapping[str, Sequence[Sample]],
    root: str | os.PathLike[str],
    class_names: Sequence[str],
    seed: int | None,
    fractions: Mapping[str, float],
) -> Path:
    """Writes the split used by a run to a JSON file (normally `split.json` in the run folder).

    The file holds the format name and version, the data folder (absolute), the class names,
    seed and fractions, the number of images per split and class, and per split a list of
    `{"path": ..., "class": ...}` entries, the path relative to the data folder in POSIX style,
    ordered by class then path. It is written atomically (temporary file + `os.replace`).

    Args:
        path: the JSON file to write.
        splits: samples per split name.
        root: the data folder the sample paths are inside.
        class_names: class names; a sample's label indexes this list.
        seed: the seed the split was made with.
        fractions: the fractions the split was made with.

    Returns:
        The path written.

    Raises:
        DataError: a sample is not inside root or has a label outside class_names.
    """
    path = Path(path)
    root = Path(root)
    names = [str(n) for n in class_names]
    entries: dict[str, list[dict[str, str]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for split in _ordered(list(splits)):
        rows: list[tuple[int, str]] = []
        for sample in splits[split]:
            if not 0 <= sample.label < len(names):
                raise DataError(f"{sample.path} has label {sample.label}, not a known class")
            rows.append((sample.label, _relative(Path(sample.path), root)))
        rows.sort()
        entries[split] = [{"path": rel, "class": names[label]} for label, rel in rows]
        counts[split] = dict.fromkeys(names, 0)
        for label, _ in rows:
            counts[split][names[label]] += 1
    document: dict[str, Any] = {
        "format": SPLIT_FILE_FORMAT,
        "version": _SPLIT_FILE_VERSION,
        "root": os.path.abspath(root),
        "class_names": names,
        "seed": seed,
        "fractions": {str(k): float(v) for k, v in fractions.items()},
        "counts": counts,
        "splits": entries,
    }
    write_text_atomic(path, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return path


def read_split(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> SplitFile:
    """Reads a split file written by `write_split`.

    Args:
        path: the JSON file.
        root: the data folder to join the relative paths to; default: the one recorded in the
            file (give it when the data folder has moved).

    Returns:
        The recorded split, with counts recomputed from the listed files.

    Raises:
        DataError: the file is missing, not JSON, not a split file, or malformed (unknown class,
            absolute path or '..' in a path...).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"split file {path} does not exist")
    document = read_json(path, DataError)  # UTF-8 (BOM accepted); errors name file and line

    def bad(what: str) -> DataError:
        return DataError(f"{path} is not a valid split file: {what}")

    if not isinstance(document, dict) or document.get("format") != SPLIT_FILE_FORMAT:
        raise bad(f"'format' is not {SPLIT_FILE_FORMAT!r}")
    if document.get("version") != _SPLIT_FILE_VERSION:
        raise bad(f"unsupported version {document.get('version')!r}")
    names = document.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("'class_names' must be a list of names")
    labels = {name: i for i, name in enumerate(names)}
    seed = document.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("'seed' must be an integer")
    fractions = document.get("fractions", {})
    if not isinstance(fractions, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in fractions.values()
    ):
        raise bad("'fractions' must map split names to numbers")
    listed = document.get("splits")
    if not isinstance(listed, dict):
        raise bad("'splits' must map split names to lists of {path, class} entries")
    if root is None:
        recorded = document.get("root")
        if not isinstance(recorded, str):
            raise bad("no 'root' recorded; give the data folder")
        root = recorded
    root = Path(root)

    splits: dict[str, list[Sample]] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, rows in listed.items():
        if not isinstance(rows, list):
            raise bad(f"split {split!r} must be a list of {{path, class}} entries")
        samples: list[Sample] = []
        counts[split] = dict.fromkeys(names, 0)
        for row in rows:
            rel = row.get("path") if isinstance(row, dict) else None
            name = row.get("class") if isinstance(row, dict) else None
            if name not in labels:
                raise bad(f"split {split!r}: entry {row!r} does not name a class in 'class_names'")
            posix = PurePosixPath(rel) if isinstance(rel, str) else None
            if posix is None or posix.is_absolute() or ".." in posix.parts or not posix.parts:
                raise bad(f"path {rel!r} must be relative to the data folder, without '..'")
            samples.append(Sample(root.joinpath(*posix.parts), labels[name]))
            counts[split][name] += 1
        samples.sort(key=_sort_key)
        splits[split] = samples
    return SplitFile(
        root=root,
        class_names=list(names),
        seed=seed,
        fractions={str(k): float(v) for k, v in fractions.items()},
        splits=splits,
        counts=counts,
    )
