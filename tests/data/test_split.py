"""Tests for seeded stratified splits, completing pre-split folders, and split.json."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from finetune.data.scan import ImageFolder, Sample, scan_image_folder
from finetune.data.split import (
    complete_splits,
    read_split,
    stratified_split,
    write_split,
)
from finetune.errors import ConfigError, DataError

ROOT = Path("/data")
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def make_samples(sizes: list[int], root: Path = ROOT) -> list[Sample]:
    return [
        Sample(root / f"c{label}" / f"{i:04d}.jpg", label)
        for label, n in enumerate(sizes)
        for i in range(n)
    ]


def per_class(samples: list[Sample]) -> Counter:
    return Counter(s.label for s in samples)


def paths(splits: dict[str, list[Sample]]) -> dict[str, list[str]]:
    return {k: [s.path.as_posix() for s in v] for k, v in splits.items()}


# --- stratified_split --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fractions", [FRACTIONS, {"train": 0.8, "val": 0.2}, {"train": 0.7, "val": 0.2, "test": 0.1}]
)
def test_stratified_proportions_within_one_image(fractions):
    sizes = [100, 57, 23, 11, 1000]
    samples = make_samples(sizes)
    splits = stratified_split(samples, fractions, seed=0)
    assert list(splits) == list(fractions)
    for name, fraction in fractions.items():
        counts = per_class(splits[name])
        for label, n in enumerate(sizes):
            assert abs(counts[label] - n * fraction) <= 1, (name, label, counts[label])
    # A partition: every sample exactly once.
    everything = [s for part in splits.values() for s in part]
    assert sorted(everything, key=str) == sorted(samples, key=str)


def test_same_seed_same_split_different_seed_different_split():
    samples = make_samples([50, 50, 50])
    first = stratified_split(samples, FRACTIONS, seed=7)
    assert paths(first) == paths(stratified_split(samples, FRACTIONS, seed=7))
    other = stratified_split(samples, FRACTIONS, seed=8)
    assert paths(first)["val"] != paths(other)["val"]
    assert [len(v) for v in first.values()] == [len(v) for v in other.values()]


def test_split_does_not_depend_on_input_order():
    samples = make_samples([40, 33, 12])
    shuffled = list(samples)
    random.Random(3).shuffle(shuffled)
    assert paths(stratified_split(samples, FRACTIONS, 1)) == paths(
        stratified_split(shuffled, FRACTIONS, 1)
    )


def test_adding_a_class_leaves_other_classes_alone():
    two = stratified_split(make_samples([30, 30]), FRACTIONS, 5)
    three = stratified_split(make_samples([30, 30, 30]), FRACTIONS, 5)
    for name in FRACTIONS:
        assert [s for s in three[name] if s.label < 2] == two[name]


def test_output_is_sorted_by_label_then_path():
    splits = stratified_split(make_samples([20, 20]), FRACTIONS, 0)
    for part in splits.values():
        assert part == sorted(part, key=lambda s: (s.label, s.path.as_posix()))


def test_the_split_is_a_shuffle_not_a_prefix():
    splits = stratified_split(make_samples([100]), {"train": 0.5, "val": 0.5}, 0)
    assert [s.path.name for s in splits["train"]] != [f"{i:04d}.jpg" for i in range(50)]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (1, 0, 0)),  # too few images: train first
        (2, (1, 1, 0)),  # then val
        (3, (1, 1, 1)),  # enough for every split to see the class
        (4, (2, 1, 1)),
        (9, (7, 1, 1)),
        (10, (8, 1, 1)),
        (15, (12, 2, 1)),  # 12 / 1.5 / 1.5: the tie on the remainder goes to val
    ],
)
def test_small_classes(n, expected):
    splits = stratified_split(make_samples([n]), FRACTIONS, 0)
    assert tuple(len(splits[k]) for k in ("train", "val", "test")) == expected


def test_zero_fraction_split_stays_empty():
    splits = stratified_split(make_samples([3, 2, 1]), {"train": 0.9, "val": 0.1, "test": 0.0}, 0)
    assert splits["test"] == []
    assert per_class(splits["val"]) == Counter({0: 1, 1: 1})


def test_empty_input():
    assert stratified_split([], FRACTIONS, 0) == {"train": [], "val": [], "test": []}


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.8, "val": 0.1},  # 0.9
        {"train": 0.8, "val": 0.3},  # 1.1
        {"train": 1.2, "val": -0.2},
        {"train": float("nan"), "val": 0.5},
        {"train": "0.8", "val": 0.2},
        {},
    ],
)
def test_bad_fractions_are_config_errors(fractions):
    with pytest.raises(ConfigError):
        stratified_split(make_samples([10, 10]), fractions, 0)


def test_fractions_not_summing_to_one_are_named():
    with pytest.raises(ConfigError, match="add up to 1") as info:
        stratified_split(make_samples([10, 10]), {"train": 0.7, "val": 0.1}, 0)
    assert "train=0.7" in str(info.value)


def test_float_rounding_in_fractions_is_tolerated():
    stratified_split(make_samples([10, 10]), {"train": 0.7, "val": 0.2, "test": 0.1}, 0)


def test_negative_seed_is_a_config_error():
    with pytest.raises(ConfigError, match="seed"):
        stratified_split(make_samples([10, 10]), FRACTIONS, -1)


# --- complete_splits ---------------------------------------------------------------------------


def flat_folder(sizes: list[int]) -> ImageFolder:
    return ImageFolder(ROOT, [f"c{i}" for i in range(len(sizes))], {"all": make_samples(sizes)}, [])


def presplit_folder(**splits: list[int]) -> ImageFolder:
    samples = {k: make_samples(v, ROOT / k) for k, v in splits.items()}
    return ImageFolder(ROOT, ["c0", "c1"], samples, [])


def test_complete_flat_layout():
    folder = flat_folder([100, 50])
    splits = complete_splits(folder, FRACTIONS, 0)
    assert list(splits) == ["train", "val", "test"]
    assert paths(splits) == paths(stratified_split(folder.samples["all"], FRACTIONS, 0))


def test_complete_flat_layout_without_test():
    splits = complete_splits(flat_folder([100, 50]), {"train": 0.8, "val": 0.2}, 0)
    assert splits["test"] == []
    assert len(splits["val"]) == 30


def test_presplit_with_everything_is_kept():
    folder = presplit_folder(train=[20, 20], val=[5, 5], test=[4, 4])
    splits = complete_splits(folder, FRACTIONS, 0)
    assert splits == folder.samples


def test_presplit_missing_test_is_carved_from_train():
    folder = presplit_folder(train=[90, 45], val=[5, 5])
    splits = complete_splits(folder, FRACTIONS, 0)
    assert splits["val"] == folder.samples["val"]
    # test takes 0.1 / (0.8 + 0.1) = 1/9 of train, per class.
    assert per_class(splits["test"]) == Counter({0: 10, 1: 5})
    assert per_class(splits["train"]) == Counter({0: 80, 1: 40})
    assert set(splits["train"]) | set(splits["test"]) == set(folder.samples["train"])
    assert all(s.path.parts[2] == "train" for s in splits["test"])


def test_presplit_missing_val_is_carved_from_train():
    folder = presplit_folder(train=[90, 45], test=[3, 3])
    splits = complete_splits(folder, FRACTIONS, 0)
    assert splits["test"] == folder.samples["test"]
    assert per_class(splits["val"]) == Counter({0: 10, 1: 5})


def test_presplit_missing_val_and_test():
    folder = presplit_folder(train=[100, 50])
    splits = complete_splits(folder, FRACTIONS, 0)
    assert paths(splits) == paths(stratified_split(folder.samples["train"], FRACTIONS, 0))


def test_presplit_missing_val_with_zero_fraction_stays_empty():
    folder = presplit_folder(train=[20, 20], test=[2, 2])
    splits = complete_splits(folder, {"train": 0.9, "val": 0.0, "test": 0.1}, 0)
    assert splits["val"] == []
    assert splits["train"] == folder.samples["train"]


def test_complete_splits_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="unknown split"):
        complete_splits(flat_folder([5, 5]), {"train": 0.8, "holdout": 0.2}, 0)
    with pytest.raises(ConfigError, match="train fraction"):
        complete_splits(flat_folder([5, 5]), {"train": 0.0, "val": 1.0}, 0)


# --- split.json --------------------------------------------------------------------------------


def real_folder(tmp_path: Path) -> ImageFolder:
    for name in ["cat/a.jpg", "cat/sub/b.jpg", "cat/c.jpg", "dog/d.png", "dog/e.png", "dog/f.png"]:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"x")
    return scan_image_folder(tmp_path / "data")


def test_split_json_round_trip(tmp_path):
    folder = real_folder(tmp_path)
    splits = complete_splits(folder, FRACTIONS, 42)
    run_dir = tmp_path / "run"
    written = write_split(
        run_dir / "split.json", splits, folder.root, folder.class_names, 42, FRACTIONS
    )
    assert written == run_dir / "split.json"
    assert [p.name for p in run_dir.iterdir()] == ["split.json"]  # no temp file left behind

    document = json.loads(written.read_text())
    assert document["class_names"] == ["cat", "dog"]
    assert document["seed"] == 42 and document["fractions"] == FRACTIONS
    assert document["root"] == str(folder.root.absolute())
    listed = [e["path"] for part in document["splits"].values() for e in part]
    assert sorted(listed) == sorted(
        ["cat/a.jpg", "cat/sub/b.jpg", "cat/c.jpg", "dog/d.png", "dog/e.png", "dog/f.png"]
    )
    assert {"path": "cat/sub/b.jpg", "class": "cat"} in [
        e for part in document["splits"].values() for e in part
    ]
    assert document["counts"] == {
        k: {"cat": per_class(v)[0], "dog": per_class(v)[1]} for k, v in splits.items()
    }

    loaded = read_split(written)
    assert loaded.class_names == ["cat", "dog"]
    assert loaded.seed == 42 and loaded.fractions == FRACTIONS
    assert loaded.root == folder.root.absolute()
    assert loaded.splits == splits
    assert loaded.counts == document["counts"]


def test_read_split_with_moved_data_folder(tmp_path):
    folder = real_folder(tmp_path)
    splits = complete_splits(folder, FRACTIONS, 0)
    write_split(tmp_path / "split.json", splits, folder.root, folder.class_names, 0, FRACTIONS)
    loaded = read_split(tmp_path / "split.json", root=tmp_path / "moved")
    assert all(
        tmp_path / "moved" in s.path.parents for part in loaded.splits.values() for s in part
    )


def test_write_split_overwrites_atomically(tmp_path):
    folder = real_folder(tmp_path)
    target = tmp_path / "split.json"
    target.write_text("old")
    splits = complete_splits(folder, FRACTIONS, 0)
    write_split(target, splits, folder.root, folder.class_names, 0, FRACTIONS)
    assert read_split(target).splits == splits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "split.json"]


def test_write_split_refuses_a_sample_outside_root(tmp_path):
    splits = {"train": [Sample(tmp_path / "elsewhere" / "a.jpg", 0)]}
    with pytest.raises(DataError, match="not inside"):
        write_split(tmp_path / "s.json", splits, tmp_path / "data", ["a", "b"], 0, FRACTIONS)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot read"),
        ('{"format": "something-else"}', "format"),
        (
            '{"format": "finetune-split", "version": 1, "class_names": ["a"], "root": "/d",'
            ' "splits": {"train": [{"path": "../x.jpg", "class": "a"}]}}',
            r"'\.\.'",
        ),
        (
            '{"format": "finetune-split", "version": 1, "class_names": ["a"], "root": "/d",'
            ' "splits": {"train": [{"path": "x.jpg", "class": "b"}]}}',
            "class",
        ),
    ],
)
def test_read_split_rejects_bad_files(tmp_path, content, match):
    (tmp_path / "split.json").write_text(content)
    with pytest.raises(DataError, match=match):
        read_split(tmp_path / "split.json")


def test_read_split_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "split.json")
