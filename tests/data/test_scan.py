"""Tests for scanning data folders: both layouts, odd files, and the errors users can cause."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from finetune.data.scan import (
    IgnoredFile,
    ImageFolder,
    Sample,
    check_classes,
    scan_image_folder,
)
from finetune.errors import DataError


def make_tree(root: Path, files: list[str]) -> Path:
    """Creates files (content irrelevant: scanning never decodes); names ending in / are dirs."""
    for name in files:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not decoded")
    return root


def rel(folder: ImageFolder, samples: list[Sample]) -> list[tuple[str, str]]:
    return [
        (s.path.relative_to(folder.root).as_posix(), folder.class_names[s.label]) for s in samples
    ]


def ignored_rel(folder: ImageFolder) -> dict[str, str]:
    return {f.path.relative_to(folder.root).as_posix(): f.reason for f in folder.ignored}


# --- flat layout -------------------------------------------------------------------------------


def test_flat_layout(tmp_path):
    make_tree(tmp_path, ["dog/b.png", "dog/a.JPG", "cat/x.jpeg", "cat/y.webp", "bird/z.gif"])
    folder = scan_image_folder(tmp_path)
    assert folder.layout == "flat"
    assert folder.root == tmp_path
    assert folder.class_names == ["bird", "cat", "dog"]
    assert list(folder.samples) == ["all"]
    assert rel(folder, folder.samples["all"]) == [
        ("bird/z.gif", "bird"),
        ("cat/x.jpeg", "cat"),
        ("cat/y.webp", "cat"),
        ("dog/a.JPG", "dog"),
        ("dog/b.png", "dog"),
    ]
    assert folder.ignored == []
    assert folder.class_counts("all") == {"bird": 1, "cat": 2, "dog": 2}


def test_nested_files_belong_to_the_class(tmp_path):
    make_tree(tmp_path, ["cat/2020/jan/a.jpg", "cat/b.jpg", "cat/2019/c.bmp", "dog/d.png"])
    folder = scan_image_folder(tmp_path)
    assert rel(folder, folder.samples["all"]) == [
        ("cat/2019/c.bmp", "cat"),
        ("cat/2020/jan/a.jpg", "cat"),
        ("cat/b.jpg", "cat"),
        ("dog/d.png", "dog"),
    ]


def test_hidden_files_and_folders_are_skipped_silently(tmp_path):
    make_tree(
        tmp_path,
        [
            "cat/a.jpg",
            "cat/.b.jpg",
            "cat/.thumbs/c.jpg",
            "dog/d.jpg",
            ".DS_Store",
            ".cache/e.jpg",
            "__MACOSX/cat/._a.jpg",
        ],
    )
    folder = scan_image_folder(tmp_path)
    assert folder.class_names == ["cat", "dog"]
    assert rel(folder, folder.samples["all"]) == [("cat/a.jpg", "cat"), ("dog/d.jpg", "dog")]
    assert folder.ignored == []


def test_non_image_files_are_listed_as_ignored(tmp_path):
    make_tree(tmp_path, ["cat/a.jpg", "cat/notes.txt", "dog/b.png", "dog/sub/c.tiff", "README.md"])
    folder = scan_image_folder(tmp_path)
    assert ignored_rel(folder) == {
        "README.md": "not inside a class folder",
        "cat/notes.txt": "not an image extension",
        "dog/sub/c.tiff": "not an image extension",
    }
    assert all(isinstance(f, IgnoredFile) for f in folder.ignored)
    assert len(folder.samples["all"]) == 2


def test_symlink_loop_is_not_followed_forever(tmp_path):
    make_tree(tmp_path, ["cat/a.jpg", "dog/b.jpg"])
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")
    folder = scan_image_folder(tmp_path)
    assert rel(folder, folder.samples["all"]) == [("cat/a.jpg", "cat"), ("dog/b.jpg", "dog")]


def test_symlinked_class_folder_is_followed(tmp_path):
    make_tree(tmp_path / "elsewhere", ["a.jpg"])
    make_tree(tmp_path / "data", ["dog/b.jpg"])
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "cat")
    folder = scan_image_folder(tmp_path / "data")
    assert rel(folder, folder.samples["all"]) == [("cat/a.jpg", "cat"), ("dog/b.jpg", "dog")]


# --- pre-split layout --------------------------------------------------------------------------


def test_pre_split_layout_with_val_and_test(tmp_path):
    make_tree(
        tmp_path,
        [
            "train/cat/a.jpg",
            "train/cat/b.jpg",
            "train/dog/c.jpg",
            "val/cat/d.jpg",
            "val/dog/e.jpg",
            "test/dog/f.jpg",  # test may lack a class
        ],
    )
    folder = scan_image_folder(tmp_path)
    assert folder.layout == "split"
    assert folder.class_names == ["cat", "dog"]
    assert list(folder.samples) == ["train", "val", "test"]
    assert rel(folder, folder.samples["train"]) == [
        ("train/cat/a.jpg", "cat"),
        ("train/cat/b.jpg", "cat"),
        ("train/dog/c.jpg", "dog"),
    ]
    assert rel(folder, folder.samples["val"]) == [
        ("val/cat/d.jpg", "cat"),
        ("val/dog/e.jpg", "dog"),
    ]
    assert rel(folder, folder.samples["test"]) == [("test/dog/f.jpg", "dog")]
    assert folder.class_counts("test") == {"cat": 0, "dog": 1}


def test_pre_split_layout_train_only(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg"])
    folder = scan_image_folder(tmp_path)
    assert list(folder.samples) == ["train"]
    assert folder.class_names == ["cat", "dog"]


def test_pre_split_layout_with_test_but_no_val(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg", "test/cat/c.jpg"])
    assert list(scan_image_folder(tmp_path).samples) == ["train", "test"]


def test_validation_folder_counts_as_val(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg", "validation/cat/c.jpg"])
    folder = scan_image_folder(tmp_path)
    assert list(folder.samples) == ["train", "val"]
    assert rel(folder, folder.samples["val"]) == [("validation/cat/c.jpg", "cat")]


def test_pre_split_layout_ignores_stray_files_and_folders(tmp_path):
    make_tree(
        tmp_path,
        ["train/cat/a.jpg", "train/dog/b.jpg", "train/loose.jpg", "notes.txt", "extra/x/y.jpg"],
    )
    folder = scan_image_folder(tmp_path)
    ignored = ignored_rel(folder)
    assert set(ignored) == {"extra", "notes.txt", "train/loose.jpg"}
    assert ignored["train/loose.jpg"] == "not inside a class folder"
    assert len(folder.samples["train"]) == 2


def test_both_val_and_validation_is_an_error(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg", "val/cat/c.jpg", "validation/"])
    with pytest.raises(DataError, match="validation"):
        scan_image_folder(tmp_path)


def test_unknown_class_in_val_is_named(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg", "val/cat/c.jpg", "val/dgo/d.jpg"])
    with pytest.raises(DataError, match="'dgo'") as info:
        scan_image_folder(tmp_path)
    assert "train" in str(info.value)


def test_unknown_class_in_test_is_named(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg", "test/cow/c.jpg"])
    with pytest.raises(DataError, match="'cow'"):
        scan_image_folder(tmp_path)


def test_val_without_images_is_an_error(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg", "val/cat/notes.txt"])
    with pytest.raises(DataError, match="remove val/"):
        scan_image_folder(tmp_path)


# --- errors ------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_root_is_a_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        scan_image_folder(tmp_path / "a.jpg")


def test_no_class_folders(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path)


def test_images_directly_in_root(tmp_path):
    make_tree(tmp_path, ["a.jpg", "b.jpg"])
    with pytest.raises(DataError, match="no class folders") as info:
        scan_image_folder(tmp_path)
    assert "2 image(s)" in str(info.value)


def test_single_class(tmp_path):
    make_tree(tmp_path, ["cat/a.jpg", "cat/b.jpg"])
    with pytest.raises(DataError, match="only one class") as info:
        scan_image_folder(tmp_path)
    assert "'cat'" in str(info.value) and "at least two" in str(info.value)


def test_a_single_class_is_enough_to_evaluate_on(tmp_path):
    make_tree(tmp_path, ["cat/a.jpg", "cat/b.jpg"])
    folder = scan_image_folder(tmp_path, min_classes=1)
    assert folder.class_names == ["cat"] and len(folder.samples["all"]) == 2


def test_single_class_in_train(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg"])
    with pytest.raises(DataError, match="only one class"):
        scan_image_folder(tmp_path)


def test_empty_class_is_named(tmp_path):
    make_tree(tmp_path, ["cat/a.jpg", "dog/", "bird/b.jpg"])
    with pytest.raises(DataError, match="'dog'") as info:
        scan_image_folder(tmp_path)
    assert "is empty" in str(info.value)
    assert "'cat'" not in str(info.value) and "'bird'" not in str(info.value)


def test_class_with_only_non_images_is_named(tmp_path):
    make_tree(tmp_path, ["cat/a.jpg", "dog/readme.txt", "dog/sub/"])
    with pytest.raises(DataError, match="'dog'") as info:
        scan_image_folder(tmp_path)
    assert "only non-image files" in str(info.value) and "readme.txt" in str(info.value)


def test_empty_class_in_val_is_named(tmp_path):
    make_tree(tmp_path, ["train/cat/a.jpg", "train/dog/b.jpg", "val/cat/c.jpg", "val/dog/"])
    with pytest.raises(DataError, match="'dog'") as info:
        scan_image_folder(tmp_path)
    assert "val/" in str(info.value)


def test_no_images_at_all(tmp_path):
    make_tree(tmp_path, ["cat/", "dog/notes.txt"])
    with pytest.raises(DataError, match="no images found"):
        scan_image_folder(tmp_path)


def test_no_images_in_train(tmp_path):
    make_tree(tmp_path, ["train/cat/", "train/dog/", "val/cat/a.jpg"])
    with pytest.raises(DataError, match="no images found"):
        scan_image_folder(tmp_path)


# --- check_classes -----------------------------------------------------------------------------


def test_check_classes_accepts_complete_data():
    samples = {"all": [Sample(Path("a"), 0), Sample(Path("b"), 1)]}
    check_classes(["cat", "dog"], samples)


def test_check_classes_names_a_class_left_without_images():
    samples = {"all": [Sample(Path("a"), 0), Sample(Path("b"), 2)]}
    with pytest.raises(DataError, match="'dog'") as info:
        check_classes(["cat", "dog", "eel"], samples)
    assert "'cat'" not in str(info.value)


def test_check_classes_needs_every_class_in_train():
    samples = {
        "train": [Sample(Path("a"), 0)],
        "val": [Sample(Path("b"), 1)],
    }
    with pytest.raises(DataError, match="'dog'.*train"):
        check_classes(["cat", "dog"], samples)


# --- speed -------------------------------------------------------------------------------------


def test_scanning_10000_files_is_fast(tmp_path):
    for c in range(10):
        class_dir = tmp_path / f"class_{c}"
        class_dir.mkdir()
        for i in range(1000):
            (class_dir / f"{i:05d}.jpg").touch()
    start = time.perf_counter()
    folder = scan_image_folder(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(folder.samples["all"]) == 10_000
    # Generous: another test process may share the cores (make test runs two). A scan that
    # went quadratic in the number of files would take minutes.
    assert elapsed < 6.0, f"scanning took {elapsed:.2f}s"


# --- file names: spaces and bytes that are not UTF-8 ---------------------------------------------


def raw_tree(root: Path, files: list[bytes]) -> Path:
    """Like make_tree, with names given as raw bytes (Linux file names need not be UTF-8)."""
    base = os.fsencode(root)
    for name in files:
        path = os.path.join(base, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"not decoded")
    return root


def test_names_with_spaces_are_ordinary(tmp_path):
    make_tree(tmp_path, ["big cat/a b.jpg", "big cat/ c .png", "dog/d.jpg"])
    folder = scan_image_folder(tmp_path)
    assert folder.class_names == ["big cat", "dog"]
    assert rel(folder, folder.samples["all"]) == [
        ("big cat/ c .png", "big cat"),
        ("big cat/a b.jpg", "big cat"),
        ("dog/d.jpg", "dog"),
    ]


def test_non_utf8_names_are_listed_as_ignored_and_printable(tmp_path):
    raw_tree(
        tmp_path,
        [b"cat/a.jpg", b"cat/caf\xe9.jpg", b"cat/sub\xff/b.jpg", b"dog/c.jpg", b"notes\xe9.txt"],
    )
    folder = scan_image_folder(tmp_path)
    assert rel(folder, folder.samples["all"]) == [("cat/a.jpg", "cat"), ("dog/c.jpg", "dog")]
    assert ignored_rel(folder) == {
        "cat/caf\\xe9.jpg": "name is not valid UTF-8 text: rename it to use it",
        "cat/sub\\xff": "name is not valid UTF-8 text: rename it to use it",
        "notes\\xe9.txt": "not inside a class folder",
    }
    for entry in folder.ignored:
        str(entry.path).encode("utf-8")  # no lone surrogates: printable, storable in JSON


@pytest.mark.parametrize(
    "files",
    [
        [b"caf\xe9/a.jpg", b"dog/b.jpg"],
        [b"train/caf\xe9/a.jpg", b"train/dog/b.jpg"],
        [b"train/cat/a.jpg", b"train/dog/b.jpg", b"val/caf\xe9/c.jpg"],
    ],
)
def test_non_utf8_class_folder_is_refused_by_name(tmp_path, files):
    raw_tree(tmp_path, files)
    with pytest.raises(DataError, match="not valid UTF-8") as caught:
        scan_image_folder(tmp_path)
    message = str(caught.value)
    assert "'caf\\xe9'" in message
    message.encode("utf-8")


def test_non_utf8_data_folder_is_refused(tmp_path):
    root = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xe9ta")))
    make_tree(root, ["cat/a.jpg", "dog/b.jpg"])
    with pytest.raises(DataError, match="not valid UTF-8") as caught:
        scan_image_folder(root)
    assert "d\\xe9ta" in str(caught.value)
