"""Check a data folder before training: counts, image sizes, broken files and duplicates.

`inspect_folder` backs `finetune inspect DATA_DIR` and the check at the start of training. It
scans the folder with `scan_image_folder`, then reads every image once with
`finetune.data.duplicates`, through the same hardened loader as training (so a broken file is
found with the same reason), for its size, mode and exact and near duplicates, and judges what it
found.

Duplicate groups are classified by where their files are: `across_classes` (the same picture under
two labels: most likely a labelling error), `across_splits` (the same picture in train and
val/test: leakage that inflates the evaluation) and `within_class`. A group that spans both
classes and splits has kind `across_classes` and counts under both problems. What counts as a
**problem** (`ok` is False, the verdict says so): files that cannot be decoded, a class left
without any decodable image (or without one in train), duplicates across classes and duplicates
across splits. **Warnings** do not stop anything: duplicates within a class (they only weigh a
picture twice), files that are not used (not an image extension, outside class folders), a class
missing from a split and an imbalance of `IMBALANCE_WARNING` or more in a split.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.decode import BadFile, default_workers
from finetune.data.duplicates import (
    COLOUR_TOLERANCE,
    DEFAULT_NEAR_DUPLICATE_DISTANCE,
    HASH_BITS,
    DuplicateFile,
    DuplicateGroup,
    _duplicate_groups,
    _examine_all,
    _Image,
    _relative,
    _split_key,
)
from finetune.data.scan import IgnoredFile, Sample, scan_image_folder
from finetune.errors import ConfigError, DataError

__all__ = [
    "COLOUR_TOLERANCE",
    "DEFAULT_NEAR_DUPLICATE_DISTANCE",
    "HASH_BITS",
    "IMBALANCE_WARNING",
    "DatasetReport",
    "DuplicateFile",
    "DuplicateGroup",
    "inspect_folder",
]

#: A split whose largest class has this many times the images of its smallest gets a warning.
IMBALANCE_WARNING = 10.0

_SHOWN = 20  # entries listed per section by format_text


@dataclass
class DatasetReport:
    """What `inspect_folder` found.

    Attributes:
        data_dir: the data folder.
        layout: "flat" or "split", as scanned.
        class_names: class names; `counts` uses them as keys.
        counts: decodable images per split and class; splits in train/val/test order.
        sizes: number of decodable files per (width, height) as stored in the file.
        modes: number of decodable files per Pillow mode as stored ("RGB", "L", "P", ...).
        formats: number of decodable files per format ("JPEG", "PNG", ...).
        bad_files: image files that cannot be decoded, with the loader's reason.
        ignored: files the scan left out (not an image extension, outside class folders...).
        exact_duplicates: groups of files with identical bytes.
        near_duplicates: groups of files that hold the same picture but not all identical bytes.
        problems: one sentence per kind of problem; empty when `ok`.
        warnings: one sentence per kind of warning.
        verdict: one line summing up.
        near_duplicate_distance: the Hamming distance threshold used (of `HASH_BITS`).
        splits_given: whether the splits came from the caller rather than the folder.
        seconds: time the check took.
    """

    data_dir: Path
    layout: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    sizes: dict[tuple[int, int], int]
    modes: dict[str, int]
    formats: dict[str, int]
    bad_files: list[BadFile]
    ignored: list[IgnoredFile]
    exact_duplicates: list[DuplicateGroup]
    near_duplicates: list[DuplicateGroup]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verdict: str = ""
    near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE
    splits_given: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no problem was found (warnings allowed)."""
        return not self.problems

    @property
    def images(self) -> int:
        """Decodable images over all splits."""
        return sum(sum(c.values()) for c in self.counts.values())

    def imbalance(self, split: str) -> float | None:
        """Largest class count / smallest in a split; None if a class has no image there."""
        values = list(self.counts[split].values())
        return None if min(values) == 0 else max(values) / min(values)

    def size_summary(self) -> dict[str, Any]:
        """The 10 most common sizes, and min / median / max of width and height."""
        widths = sorted((w, n) for (w, _), n in self.sizes.items())
        heights = sorted((h, n) for (_, h), n in self.sizes.items())
        common = sorted(self.sizes.items(), key=lambda item: (-item[1], item[0]))[:10]
        return {
            "most_common": [{"width": w, "height": h, "count": n} for (w, h), n in common],
            "width": _spread(widths),
            "height": _spread(heights),
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (what `finetune inspect --json` prints)."""
        root = self.data_dir
        return {
            "data_dir": str(Path(os.path.abspath(root))),
            "layout": self.layout,
            "splits_given": self.splits_given,
            "verdict": self.verdict,
            "ok": self.ok,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "images": self.images,
            "classes": list(self.class_names),
            "splits": {
                split: {
                    "images": sum(counts.values()),
                    "class_counts": dict(counts),
                    "imbalance": self.imbalance(split),
                }
                for split, counts in self.counts.items()
            },
            "sizes": self.size_summary(),
            "modes": dict(self.modes),
            "formats": dict(self.formats),
            "bad_files": [
                {"path": _relative(f.path, root), "reason": f.reason} for f in self.bad_files
            ],
            "ignored_files": [
                {"path": _relative(f.path, root), "reason": f.reason} for f in self.ignored
            ],
            "exact_duplicates": [g.to_dict(root) for g in self.exact_duplicates],
            "near_duplicates": [g.to_dict(root) for g in self.near_duplicates],
            "near_duplicate_distance": self.near_duplicate_distance,
            "hash_bits": HASH_BITS,
            "seconds": round(self.seconds, 3),
        }

    def format_text(self) -> str:
        """A readable multi-line summary for a terminal, verdict first."""
        root = self.data_dir
        lines = [self.verdict, f"Data folder: {root} ({self.layout} layout)"]
        splits = list(self.counts)
        width = max(len(n) for n in [*self.class_names, "class"])
        lines.append("")
        lines.append(f"{'class':<{width}}" + "".join(f"{s:>9}" for s in splits))
        for i, name in enumerate(self.class_names):
            if i == 50:
                lines.append(f"... {len(self.class_names) - 50} more classes (see --json)")
                break
            lines.append(
                f"{name:<{width}}" + "".join(f"{self.counts[s][name]:>9,}" for s in splits)
            )
        lines.append(
            f"{'total':<{width}}" + "".join(f"{sum(self.counts[s].values()):>9,}" for s in splits)
        )
        ratios = [self.imbalance(s) for s in splits]
        lines.append(
            f"{'imbalance':<{width}}"
            + "".join(f"{'-' if r is None else f'{r:.1f}x':>9}" for r in ratios)
        )
        sizes = self.size_summary()
        if sizes["most_common"]:
            common = ", ".join(
                f"{s['width']}x{s['height']} ({s['count']:,})" for s in sizes["most_common"][:5]
            )
            lines.append("")
            lines.append(f"Sizes: {common}")
            for axis in ("width", "height"):
                s = sizes[axis]
                lines.append(f"  {axis}: min {s['min']}, median {s['median']:g}, max {s['max']}")
            lines.append("Modes: " + ", ".join(f"{m} {n:,}" for m, n in self.modes.items()))
            lines.append("Formats: " + ", ".join(f"{m} {n:,}" for m, n in self.formats.items()))
        for title, items in (("Problems", self.problems), ("Warnings", self.warnings)):
            if items:
                lines += ["", f"{title}:"] + [f"  - {item}" for item in items]
        sections = [
            (
                "Files that cannot be decoded",
                [f"{_relative(f.path, root)}: {f.reason}" for f in self.bad_files],
            ),
            ("Files not used", [f"{_relative(f.path, root)}: {f.reason}" for f in self.ignored]),
            ("Exact duplicates", [self._group_line(g) for g in self.exact_duplicates]),
            ("Near duplicates", [self._group_line(g) for g in self.near_duplicates]),
        ]
        for title, entries in sections:
            if not entries:
                continue
            lines += ["", f"{title} ({len(entries):,}):"]
            lines += [f"  {entry}" for entry in entries[:_SHOWN]]
            if len(entries) > _SHOWN:
                lines.append(f"  ... {len(entries) - _SHOWN:,} more (see --json)")
        return "\n".join(lines)

    def _group_line(self, group: DuplicateGroup) -> str:
        names = []
        for f in group.files:
            where = f" [{f.split}]" if self.splits_given else ""
            names.append(_relative(f.path, self.data_dir) + where)
        label = group.kind.replace("_", " ")
        if group.match == "near":
            label += f", distance {group.distance}"
        return f"{label}: " + " | ".join(names)


def inspect_folder(
    data_dir: str | os.PathLike[str],
    splits: Mapping[str, Sequence[Sample]] | None = None,
    *,
    near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE,
    workers: int | None = None,
    progress: bool = False,
) -> DatasetReport:
    """Checks a data folder: class counts, sizes and modes, broken files and duplicates.

    Args:
        data_dir: the data folder (flat or train/val/test layout, see `scan_image_folder`).
        splits: the samples to check per split, labels indexing the folder's sorted class names,
            e.g. the train/val/test split training made for a flat folder; duplicates across
            these splits are reported as leakage. Defaults to the folder's own splits ("all" for
            the flat layout).
        near_duplicate_distance: largest Hamming distance (0-255, of `HASH_BITS`) between the
            perceptual hashes of near duplicates. Defaults to `DEFAULT_NEAR_DUPLICATE_DISTANCE`.
        workers: threads reading images. Defaults to the CPUs available, at most 16.
        progress: show an "Inspecting images" progress bar on stderr. Defaults to False.

    Returns:
        The report: `verdict`, `problems`, `ok`, `to_dict()`, `format_text()`.

    Raises:
        DataError: the folder cannot be used at all (see `scan_image_folder`), or a given sample
            has a label outside the folder's classes.
        ConfigError: `near_duplicate_distance` or `workers` is not valid.

    Example:
        >>> report = inspect_folder("photos/")  # doctest: +SKIP
        >>> print(report.verdict)  # doctest: +SKIP
        OK: 1,234 images, 5 classes, no problems found
    """
    start = time.perf_counter()
    if (
        isinstance(near_duplicate_distance, bool)
        or not isinstance(near_duplicate_distance, int | np.integer)
        or not 0 <= near_duplicate_distance < HASH_BITS
    ):
        raise ConfigError(
            f"near_duplicate_distance must be an integer from 0 to {HASH_BITS - 1}, "
            f"got {near_duplicate_distance!r}"
        )
    distance = int(near_duplicate_distance)
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")

    root = Path(data_dir)
    folder = scan_image_folder(root)
    names = folder.class_names
    chosen = folder.samples if splits is None else splits
    entries: list[tuple[str, Sample]] = []
    for split in _ordered(chosen):
        for sample in chosen[split]:
            if not 0 <= sample.label < len(names):
                raise DataError(
                    f"{sample.path} has label {sample.label} but {root} has {len(names)} "
                    "classes: pass samples made from this data folder."
                )
            entries.append((split, sample))

    keys = [os.path.abspath(s.path) for _, s in entries]
    unique = list(dict.fromkeys(keys))
    index = {key: i for i, key in enumerate(unique)}
    found = _examine_all([Path(k) for k in unique], workers, progress)

    counts = {split: dict.fromkeys(names, 0) for split in _ordered(chosen)}
    sizes: Counter[tuple[int, int]] = Counter()
    modes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    bad: list[BadFile] = []
    for item in found:
        if isinstance(item, BadFile):
            bad.append(item)
        else:
            sizes[item.size] += 1
            modes[item.mode] += 1
            formats[item.format] += 1
    good: list[tuple[DuplicateFile, _Image]] = []
    for (split, sample), key in zip(entries, keys, strict=True):
        item = found[index[key]]
        if isinstance(item, _Image):
            counts[split][names[sample.label]] += 1
            good.append((DuplicateFile(sample.path, split, names[sample.label]), item))

    exact, near = _duplicate_groups(good, distance)
    report = DatasetReport(
        data_dir=root,
        layout=folder.layout,
        class_names=list(names),
        counts=counts,
        sizes=dict(sizes),
        modes=dict(modes.most_common()),
        formats=dict(formats.most_common()),
        bad_files=sorted(bad, key=lambda f: f.path.as_posix()),
        ignored=list(folder.ignored),
        exact_duplicates=exact,
        near_duplicates=near,
        near_duplicate_distance=distance,
        splits_given=splits is not None,
    )
    _judge(report)
    report.seconds = time.perf_counter() - start
    return report


def _judge(report: DatasetReport) -> None:
    """Fills in the report's problems, warnings and verdict."""
    problems: list[tuple[int, str, str]] = []  # (count, verdict phrase, sentence)
    warnings: list[str] = []
    groups = report.exact_duplicates + report.near_duplicates

    def matches(selected: list[DuplicateGroup]) -> str:
        kinds = Counter(g.match for g in selected)
        return ", ".join(f"{kinds[m]} {m}" for m in ("exact", "near") if kinds[m])

    crossing = [g for g in groups if g.across_classes]
    if crossing:
        n = len(crossing)
        problems.append(
            (
                n,
                f"{_plural(n, 'duplicate group')} across classes (likely label errors)",
                f"{_plural(n, 'group')} of duplicate images across classes ({matches(crossing)}): "
                "the same picture under two labels is most likely a labelling error. Keep each "
                "picture in its right class only.",
            )
        )
    leaking = [g for g in groups if g.across_splits]
    if leaking:
        n = len(leaking)
        pairs = sorted(
            {"/".join(sorted({f.split for f in g.files}, key=_split_key)) for g in leaking}
        )
        problems.append(
            (
                n,
                f"{_plural(n, 'duplicate group')} across splits (leakage)",
                f"{_plural(n, 'group')} of duplicate images across splits {', '.join(pairs)} "
                f"({matches(leaking)}): a picture evaluated on and also trained on inflates the "
                "score. Remove the copies from all but one split.",
            )
        )
    if report.bad_files:
        n = len(report.bad_files)
        shown = "; ".join(
            f"{_relative(f.path, report.data_dir)} ({f.reason})" for f in report.bad_files[:3]
        )
        more = ", ..." if n > 3 else ""
        problems.append(
            (
                n,
                f"{_plural(n, 'file')} cannot be decoded",
                f"{_plural(n, 'image file')} cannot be decoded and would be skipped by training: "
                f"{shown}{more}. Replace or delete them.",
            )
        )
    totals = {name: sum(c[name] for c in report.counts.values()) for name in report.class_names}
    empty = [name for name, n in totals.items() if n == 0]
    if "train" in report.counts:
        empty += [n for n, c in report.counts["train"].items() if c == 0 and n not in empty]
    if empty:
        n = len(empty)
        problems.append(
            (
                n,
                f"{_plural(n, 'class', 'classes')} without a decodable image"
                f"{' in train' if 'train' in report.counts else ''}",
                f"{_plural(n, 'class', 'classes')} without a decodable image"
                f"{' in train' if 'train' in report.counts else ''}: "
                + ", ".join(f"'{name}'" for name in empty)
                + ". The model could not learn them: add images, or remove the class folder.",
            )
        )

    within = [g for g in groups if g.kind == "within_class"]
    if within:
        warnings.append(
            f"{_plural(len(within), 'group')} of duplicate images within a class "
            f"({matches(within)}): each copy counts again in training. Consider removing them."
        )
    if report.ignored:
        reasons = Counter(f.reason for f in report.ignored)
        warnings.append(
            f"{_plural(len(report.ignored), 'file')} not used: "
            + "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        )
    for split, counts in report.counts.items():
        missing = [name for name, c in counts.items() if c == 0 and name not in empty]
        ratio = report.imbalance(split)
        if missing and sum(counts.values()):
            warnings.append(
                f"{_plural(len(missing), 'class', 'classes')} without images in {_where(split)}: "
                + ", ".join(f"'{name}'" for name in missing)
            )
        elif ratio is not None and ratio >= IMBALANCE_WARNING:
            most = max(counts, key=counts.get)
            least = min(counts, key=counts.get)
            warnings.append(
                f"classes are imbalanced in {_where(split)}: '{most}' has {counts[most]:,} "
                f"images and '{least}' {counts[least]:,} ({ratio:.1f}x). Consider class weights "
                "or more images of the small classes."
            )

    report.problems = [sentence for _, _, sentence in problems]
    report.warnings = warnings
    if problems:
        total = sum(n for n, _, _ in problems)
        report.verdict = f"{_plural(total, 'problem')}: " + ", ".join(p for _, p, _ in problems)
    else:
        note = f" ({_plural(len(warnings), 'warning')})" if warnings else ""
        report.verdict = (
            f"OK: {_plural(report.images, 'image')}, "
            f"{_plural(len(report.class_names), 'class', 'classes')}, no problems found{note}"
        )


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def _where(split: str) -> str:
    return "the data folder" if split == "all" else f"the {split} split"


def _ordered(splits: Mapping[str, Any]) -> list[str]:
    return sorted(splits, key=_split_key)


def _spread(values: list[tuple[int, int]]) -> dict[str, float | int | None]:
    """min / median / max of sorted (value, count) pairs."""
    if not values:
        return {"min": None, "median": None, "max": None}
    expanded = [v for v, n in values for _ in range(n)]
    return {"min": values[0][0], "median": statistics.median(expanded), "max": values[-1][0]}
