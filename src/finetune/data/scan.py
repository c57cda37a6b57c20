"""Find the classes and image files of a data folder, without decoding anything.

Two layouts are understood. In the flat layout the data folder's sub-folders are the classes
(`DATA/cat/*.jpg`, `DATA/dog/*.jpg`). In the pre-split layout the data folder holds `train/` and
optionally `val/` (or `validation/`) and `test/`, each holding class folders; the class names come
from `train/` and the other splits may use only those names. Images nested deeper inside a class
folder belong to that class. Hidden files and folders (name starting with '.', and macOS'
`__MACOSX`) are skipped silently; every other file that is not used is listed as ignored with a
reason, so the user can see what was left out. Problems that make training impossible (no class
folders, one class, an empty class, no images) raise a `DataError` that says what to fix.

Names must be text: a file or sub-folder whose name is not valid UTF-8 (on Linux, e.g. a Latin-1
`caf\\xe9.jpg` from an old archive) is listed as ignored, shown with `\\xNN` escapes, because its
path could not be written to the run's JSON, CSV and HTML records; a class folder or data folder
with such a name stops the scan, since class names become the model's labels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.data.decode import IMAGE_EXTENSIONS, is_text, shown_path
from finetune.errors import DataError

__all__ = [
    "SPLIT_NAMES",
    "IgnoredFile",
    "ImageFolder",
    "Sample",
    "check_classes",
    "scan_image_folder",
]

#: Split names, in the order they are used and reported.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

# Folder names (compared in lower case) recognised as splits, and the split each stands for.
_SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}

# Not hidden by a leading dot, but never user data: the resource-fork folder macOS adds to zips.
_SKIPPED_NAMES = frozenset({"__MACOSX"})

NOT_IMAGE = "not an image extension"
NOT_TEXT = "name is not valid UTF-8 text: rename it to use it"


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class in `ImageFolder.class_names`."""

    path: Path
    label: int


@dataclass(frozen=True)
class IgnoredFile:
    """A file (or folder) found in the data folder but not used, and why.

    `path` is for people to read: bytes of a name that are not UTF-8 appear as `\\xNN` escapes
    (see `shown_path`), so it can always be printed and written to JSON.
    """

    path: Path
    reason: str


@dataclass
class ImageFolder:
    """What `scan_image_folder` found in a data folder.

    Attributes:
        root: the data folder as given.
        class_names: class folder names, sorted; a sample's label indexes this list.
        samples: image files per split: keys are a subset of {"train", "val", "test"} for the
            pre-split layout ("train" always present), or just {"all"} for the flat layout.
            Within a split, samples are ordered by class, then by path.
        ignored: files not used (non-image extensions, files outside class folders...).
    """

    root: Path
    class_names: list[str]
    samples: dict[str, list[Sample]]
    ignored: list[IgnoredFile]

    @property
    def layout(self) -> str:
        """The layout found: "flat" (class folders in root) or "split" (train/ [val/] [test/])."""
        return "flat" if "all" in self.samples else "split"

    def class_counts(self, split: str) -> dict[str, int]:
        """Number of images per class name in one split (classes without images count 0)."""
        counts = dict.fromkeys(self.class_names, 0)
        for sample in self.samples.get(split, []):
            counts[self.class_names[sample.label]] += 1
        return counts


def _ignore(path: str | os.PathLike[str], reason: str) -> IgnoredFile:
    return IgnoredFile(shown_path(path), reason)


def _refuse_non_text_classes(folder: Path, dirs: Sequence[os.DirEntry[str]]) -> None:
    """Raises DataError naming the class folders whose names are not valid UTF-8."""
    bad = [shown_path(e.name).name for e in dirs if not is_text(e.name)]
    if bad:
        names = ", ".join(f"'{n}'" for n in bad)
        raise DataError(
            f"class folder name(s) {names} in {folder} are not valid UTF-8 text (shown with \\x "
            "escapes); class names become the model's labels, so rename the folder(s) with UTF-8 "
            "names and retry."
        )


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _SKIPPED_NAMES


def _list_dir(folder: Path) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]]]:
    """Lists a folder's visible sub-folders and other entries, each sorted by name.

    Symbolic links to folders count as folders (datasets are often assembled from links).
    """
    dirs: list[os.DirEntry[str]] = []
    others: list[os.DirEntry[str]] = []
    with os.scandir(folder) as it:
        for entry in it:
            if _is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else others).append(entry)
    dirs.sort(key=lambda e: e.name)
    others.sort(key=lambda e: e.name)
    return dirs, others


def _collect_images(folder: Path, ignored: list[IgnoredFile]) -> list[Path]:
    """Finds the image files anywhere under a class folder, sorted by relative path.

    Files with other extensions are appended to `ignored`; sub-folders reached twice (a symbolic
    link loop, or two links to one folder) are scanned once.
    """
    found: list[tuple[str, Path]] = []
    seen = {os.path.realpath(folder)}
    pending: list[tuple[str, Path]] = [("", folder)]
    while pending:
        prefix, current = pending.pop()
        try:
            dirs, others = _list_dir(current)
        except OSError as exc:
            ignored.append(_ignore(current, f"cannot read folder ({exc.strerror or exc})"))
            continue
        for entry in dirs:
            if not is_text(entry.name):
                ignored.append(_ignore(entry.path, NOT_TEXT))
                continue
            real = os.path.realpath(entry.path)
            if real in seen:
                ignored.append(_ignore(entry.path, "folder already scanned (link loop)"))
                continue
            seen.add(real)
            pending.append((f"{prefix}{entry.name}/", Path(entry.path)))
        for entry in others:
            path = Path(entry.path)
            try:
                regular = entry.is_file()
            except OSError:
                regular = False
            if not is_text(entry.name):
                ignored.append(_ignore(path, NOT_TEXT))
            elif not regular:
                ignored.append(_ignore(path, "not a regular file (broken link, device...)"))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((prefix + entry.name, path))
            else:
                ignored.append(_ignore(path, NOT_IMAGE))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _describe_empty(folder: Path, ignored: list[IgnoredFile]) -> str:
    """Says whether an image-less class folder is empty or holds only other files."""
    others = [f.path.name for f in ignored if f.reason == NOT_IMAGE and folder in f.path.parents]
    if not others:
        return "is empty"
    examples = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    return f"holds only non-image files ({len(others)}: {examples})"


def _scan_classes(
    folder: Path,
    class_dirs: Sequence[os.DirEntry[str]],
    labels: Mapping[str, int],
    ignored: list[IgnoredFile],
    where: str,
    hint: str = "",
) -> list[Sample]:
    """Collects the samples of each class folder; raises DataError naming image-less classes."""
    samples: list[Sample] = []
    empty: list[str] = []
    for entry in sorted(class_dirs, key=lambda e: labels[e.name]):
        class_dir = Path(entry.path)
        images = _collect_images(class_dir, ignored)
        if not images:
            empty.append(f"'{entry.name}' ({class_dir}) {_describe_empty(class_dir, ignored)}")
        samples.extend(Sample(path, labels[entry.name]) for path in images)
    if not samples:
        raise DataError(
            f"no images found in {folder}: every class folder{where} is empty or holds only "
            f"non-image files. Supported image types: {_extensions()}.{hint}"
        )
    if empty:
        noun = "class folder" if len(empty) == 1 else "class folders"
        raise DataError(
            f"{noun}{where} without any image: " + "; ".join(empty) + ". Add images "
            f"({_extensions()}) to it or remove the folder."
        )
    return samples


def _extensions() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


def _check_class_dirs(
    folder: Path, dirs: Sequence[os.DirEntry[str]], files: Sequence, min_classes: int = 2
) -> None:
    """Raises DataError when a folder that should hold class folders holds fewer than
    `min_classes` (two to train on; one to evaluate a model on)."""
    if not dirs:
        loose = [e for e in files if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
        if loose:
            raise DataError(
                f"{folder} holds {len(loose)} image(s) but no class folders: put the images of "
                f"each class in their own sub-folder ({folder}/<class name>/...)."
            )
        raise DataError(
            f"no class folders in {folder}: it should hold one sub-folder of images per class "
            f"({folder}/<class name>/...), or train/ (and optionally val/ and test/) folders "
            "that do."
        )
    if len(dirs) < min_classes:
        raise DataError(
            f"only one class folder in {folder} ('{dirs[0].name}'): a classifier needs at least "
            "two classes. Add one sub-folder of images for each other class."
        )


def scan_image_folder(root: str | os.PathLike[str], min_classes: int = 2) -> ImageFolder:
    """Lists the classes and image files of a data folder (flat or pre-split layout).

    Only names are looked at: nothing is decoded, so a broken image is found later, by the
    decoder. A folder that holds a `train/` sub-folder (any letter case) is read as the pre-split
    layout; otherwise its sub-folders are the classes.

    Args:
        root: the data folder.
        min_classes: fewer class folders are an error. Defaults to 2 (to train on); 1 to
            evaluate a trained model on (the images of some of its classes).

    Returns:
        The classes (sorted folder names), the samples per split ("all" for the flat layout) and
        the files that are not used.

    Raises:
        DataError: root is missing or not a folder; it has no class folders, or fewer than
            `min_classes`; a class
            folder holds no image; there are no images at all; val/ or test/ name a class that
            train/ does not have, or hold no images; both val/ and validation/ exist.
    """
    root = Path(root)
    if not is_text(os.path.abspath(root)):
        raise DataError(
            f"the data folder's path {shown_path(os.path.abspath(root))} is not valid UTF-8 text "
            "(shown with \\x escapes), so it could not be recorded: rename or move it."
        )
    if not root.exists():
        raise DataError(f"data folder {root} does not exist: check the path.")
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder: give the folder that holds one sub-folder per class."
        )
    try:
        dirs, files = _list_dir(root)
    except OSError as exc:
        raise DataError(f"cannot read data folder {root}: {exc.strerror or exc}") from None

    split_dirs: dict[str, os.DirEntry[str]] = {}
    for entry in dirs:
        split = _SPLIT_FOLDERS.get(entry.name.lower())
        if split is None:
            continue
        if split in split_dirs:
            raise DataError(
                f"{root} has both '{split_dirs[split].name}/' and '{entry.name}/', which both "
                f"mean the {split} split: keep only one."
            )
        split_dirs[split] = entry

    ignored: list[IgnoredFile] = []
    if "train" not in split_dirs:
        folder = _scan_flat(root, dirs, files, ignored, min_classes)
    else:
        folder = _scan_split(root, dirs, files, split_dirs, ignored, min_classes)
    folder.ignored.sort(key=lambda f: f.path.as_posix())
    return folder


def _scan_flat(
    root: Path,
    dirs: list[os.DirEntry[str]],
    files: list[os.DirEntry[str]],
    ignored: list[IgnoredFile],
    min_classes: int = 2,
) -> ImageFolder:
    _refuse_non_text_classes(root, dirs)
    _check_class_dirs(root, dirs, files, min_classes)
    class_names = sorted(e.name for e in dirs)
    labels = {name: i for i, name in enumerate(class_names)}
    ignored.extend(_ignore(e.path, "not inside a class folder") for e in files)
    samples = _scan_classes(root, dirs, labels, ignored, where="")
    return ImageFolder(root, class_names, {"all": samples}, ignored)


def _scan_split(
    root: Path,
    dirs: list[os.DirEntry[str]],
    files: list[os.DirEntry[str]],
    split_dirs: dict[str, os.DirEntry[str]],
    ignored: list[IgnoredFile],
    min_classes: int = 2,
) -> ImageFolder:
    used = {e.name for e in split_dirs.values()}
    ignored.extend(
        _ignore(e.path, "folder beside train/ that is not val/ or test/: not used")
        for e in dirs
        if e.name not in used
    )
    ignored.extend(_ignore(e.path, "not inside train/, val/ or test/") for e in files)

    train_dir = Path(split_dirs["train"].path)
    try:
        train_classes, train_files = _list_dir(train_dir)
    except OSError as exc:
        raise DataError(f"cannot read {train_dir}: {exc.strerror or exc}") from None
    _refuse_non_text_classes(train_dir, train_classes)
    _check_class_dirs(train_dir, train_classes, train_files, min_classes)
    class_names = sorted(e.name for e in train_classes)
    labels = {name: i for i, name in enumerate(class_names)}

    samples: dict[str, list[Sample]] = {}
    for split in SPLIT_NAMES:
        if split not in split_dirs:
            continue
        split_dir = Path(split_dirs[split].path)
        if split == "train":
            class_dirs, loose = train_classes, train_files
        else:
            try:
                class_dirs, loose = _list_dir(split_dir)
            except OSError as exc:
                raise DataError(f"cannot read {split_dir}: {exc.strerror or exc}") from None
            _refuse_non_text_classes(split_dir, class_dirs)
            unknown = [e.name for e in class_dirs if e.name not in labels]
            if unknown:
                names = ", ".join(f"'{n}'" for n in unknown)
                raise DataError(
                    f"{split_dir} has class folder(s) {names} that {train_dir} does not have: "
                    f"every class in {split_dirs[split].name}/ must also be in train/ (check the "
                    "spelling, or add training images for it)."
                )
            if not class_dirs:
                raise DataError(
                    f"{split_dir} holds no class folders: put its images in the same class "
                    f"folders as train/, or remove {split_dirs[split].name}/ to have the "
                    f"{split} split made from train/."
                )
        ignored.extend(_ignore(e.path, "not inside a class folder") for e in loose)
        name = split_dirs[split].name
        hint = "" if split == "train" else f" Or remove {name}/ to have it made from train/."
        samples[split] = _scan_classes(
            split_dir, class_dirs, labels, ignored, where=f" of {name}/", hint=hint
        )
    return ImageFolder(root, class_names, samples, ignored)


def check_classes(
    class_names: Sequence[str], samples_by_split: Mapping[str, Sequence[Sample]]
) -> None:
    """Checks that every class still has images once undecodable files were removed.

    Args:
        class_names: all class names; a sample's label indexes this list.
        samples_by_split: the samples that decoded, per split ("all", or "train"/"val"/"test").

    Raises:
        DataError: a class has no decodable image at all, or none in the "train" split (when
            there is one), since the model could never learn it. Each such class is named.
    """
    total = [0] * len(class_names)
    train = [0] * len(class_names)
    for split, samples in samples_by_split.items():
        for sample in samples:
            total[sample.label] += 1
            if split == "train":
                train[sample.label] += 1
    gone = [name for name, n in zip(class_names, total, strict=True) if n == 0]
    if gone:
        names = ", ".join(f"'{n}'" for n in gone)
        raise DataError(
            f"class {names} has no image that can be decoded (see the files reported as "
            "undecodable above): replace those files, or remove the class folder."
        )
    if "train" in samples_by_split:
        missing = [name for name, n in zip(class_names, train, strict=True) if n == 0]
        if missing:
            names = ", ".join(f"'{n}'" for n in missing)
            raise DataError(
                f"class {names} has no decodable image in the train split, so the model could "
                "not learn it: add training images for it."
            )
