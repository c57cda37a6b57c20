"""Tests for the dataset check: counts, sizes and modes, broken files, and duplicates.

Every folder is built from real pixels: smooth random colour fields and random shapes drawn
with Pillow (distinct pictures), photos bundled with scikit-learn and scikit-image (to copy,
resize and re-encode), and the bundled Fashion-MNIST sample (look-alike real pictures).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from finetune.data import duplicates
from finetune.data.inspect import (
    DEFAULT_NEAR_DUPLICATE_DISTANCE,
    IMBALANCE_WARNING,
    DatasetReport,
    inspect_folder,
)
from finetune.data.scan import Sample, scan_image_folder
from finetune.data.split import DEFAULT_FRACTIONS, complete_splits
from finetune.errors import ConfigError, DataError
from tests.helpers import FASHION

# ---------------------------------------------------------------------------------------------
# Pictures


def colour_field(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A smooth random colour image: a 5x5 grid of random colours, upscaled."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def shapes(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Random ellipses and rectangles in random colours on a random background."""
    rng = np.random.default_rng(10_000 + seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = int(rng.integers(0, size[0] - 8)), int(rng.integers(0, size[1] - 8))
        box = [x, y, x + int(rng.integers(8, 40)), y + int(rng.integers(8, 40))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def distinct(i: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """The i-th of a series of different pictures."""
    return colour_field(i, size) if i % 2 == 0 else shapes(i, size)


def photo(name: str, width: int = 320) -> Image.Image:
    """A real photo bundled with scikit-learn ("china.jpg") or scikit-image, as RGB."""
    if name in ("china.jpg", "flower.jpg"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / name
    else:
        skimage = pytest.importorskip("skimage")
        path = Path(skimage.__file__).parent / "data" / name
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return rgb.resize((width, round(rgb.height * width / rgb.width)), Image.Resampling.LANCZOS)


def reencoded(img: Image.Image, scale: float, quality: int) -> Image.Image:
    """The same picture resized by `scale` (bicubic), to be saved as JPEG at `quality`."""
    size = (round(img.width * scale), round(img.height * scale))
    return img.resize(size, Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)
    return path


def flat_folder(root: Path, per_class: dict[str, int], start: int = 0) -> Path:
    """Class folders of distinct PNG pictures: <class>/img<k>.png."""
    k = start
    for name, n in per_class.items():
        for _ in range(n):
            save(distinct(k), root / name / f"img{k}.png")
            k += 1
    return root


def rel_groups(report: DatasetReport, match: str) -> list[tuple[str, set[str]]]:
    """(kind, set of relative paths) of each exact or near duplicate group."""
    groups = report.to_dict()[f"{match}_duplicates"]
    return [(g["kind"], set(g["paths"])) for g in groups]


# ---------------------------------------------------------------------------------------------
# A clean folder: counts, imbalance, sizes, modes, verdict


def test_a_clean_folder_reports_counts_sizes_modes_and_an_ok_verdict(tmp_path):
    root = tmp_path / "data"
    k = 0
    # cat: 12 RGB PNGs 64x64; dog: 10 images in other modes and sizes; fox: 8 JPEGs 80x48.
    for _ in range(12):
        save(distinct(k), root / "cat" / f"{k}.png")
        k += 1
    dog_modes = ["L", "L", "RGBA", "RGBA", "P", "P", "CMYK", "RGB", "RGB", "RGB"]
    for mode in dog_modes:
        img = distinct(k, (48, 96))
        palette = {"palette": Image.Palette.ADAPTIVE} if mode == "P" else {}
        img = img.convert(mode, **palette)
        ext = "jpg" if mode == "CMYK" else "png"
        save(img, root / "dog" / f"{k}.{ext}")
        k += 1
    for _ in range(8):
        save(distinct(k, (80, 48)), root / "fox" / f"{k}.jpg", quality=92)
        k += 1

    report = inspect_folder(root)

    assert report.ok
    assert report.problems == [] and report.warnings == []
    assert report.verdict == "OK: 30 images, 3 classes, no problems found"
    assert report.counts == {"all": {"cat": 12, "dog": 10, "fox": 8}}
    assert report.imbalance("all") == pytest.approx(12 / 8)
    assert report.modes == {"RGB": 12 + 3 + 8, "L": 2, "RGBA": 2, "P": 2, "CMYK": 1}
    assert report.formats == {"PNG": 21, "JPEG": 9}
    sizes = report.size_summary()
    assert sizes["most_common"][0] == {"width": 64, "height": 64, "count": 12}
    assert {(s["width"], s["height"], s["count"]) for s in sizes["most_common"]} == {
        (64, 64, 12),
        (48, 96, 10),
        (80, 48, 8),
    }
    assert sizes["width"] == {"min": 48, "median": 64, "max": 80}
    assert sizes["height"] == {"min": 48, "median": 64, "max": 96}
    assert report.exact_duplicates == [] and report.near_duplicates == []
    assert report.bad_files == [] and report.ignored == []


# ---------------------------------------------------------------------------------------------
# Planted problems in a flat folder


@pytest.fixture
def planted(tmp_path) -> Path:
    """A flat folder with one of each kind of trouble (see the assertions below)."""
    root = flat_folder(tmp_path / "data", {"cat": 5, "dog": 5, "fox": 5})
    cat, dog, fox = root / "cat", root / "dog", root / "fox"
    # An exact copy in the same class, and an exact copy in another class.
    (cat / "img0_copy.png").write_bytes((cat / "img0.png").read_bytes())
    (dog / "img1_copy.png").write_bytes((cat / "img1.png").read_bytes())
    # A real photo in cat, and the same photo at 60% size, re-encoded as JPEG, in fox.
    china = photo("china.jpg")
    save(china, cat / "china.png")
    save(reencoded(china, 0.6, 70), fox / "china_small.jpg", quality=70)
    # A zero-byte .jpg, a text file named .png, and a non-image file.
    (cat / "empty.jpg").write_bytes(b"")
    (dog / "fake.png").write_text("this is not a picture\n")
    (fox / "notes.txt").write_text("labelled by hand\n")
    return root


def test_planted_duplicates_bad_files_and_other_files_are_found_and_classified(planted):
    report = inspect_folder(planted)

    assert sorted(rel_groups(report, "exact"), key=str) == sorted(
        [
            ("within_class", {"cat/img0.png", "cat/img0_copy.png"}),
            ("across_classes", {"cat/img1.png", "dog/img1_copy.png"}),
        ],
        key=str,
    )
    assert rel_groups(report, "near") == [
        ("across_classes", {"cat/china.png", "fox/china_small.jpg"})
    ]
    near = report.near_duplicates[0]
    assert near.match == "near" and 0 < near.distance <= DEFAULT_NEAR_DUPLICATE_DISTANCE
    assert [f.class_name for f in near.files] == ["cat", "fox"]

    bad = {f["path"]: f["reason"] for f in report.to_dict()["bad_files"]}
    assert bad == {
        "cat/empty.jpg": "empty file",
        "dog/fake.png": "not an image file (or not JPEG, PNG, BMP, GIF or WebP)",
    }
    ignored = {f["path"]: f["reason"] for f in report.to_dict()["ignored_files"]}
    assert ignored == {"fox/notes.txt": "not an image extension"}

    # Counts are of decodable images: the copies count, the broken files do not.
    assert report.counts == {"all": {"cat": 7, "dog": 6, "fox": 6}}
    assert not report.ok
    assert report.verdict == (
        "4 problems: 2 duplicate groups across classes (likely label errors), "
        "2 files cannot be decoded"
    )
    assert len(report.problems) == 2
    assert "label" in report.problems[0] and "1 exact, 1 near" in report.problems[0]
    assert "cat/empty.jpg (empty file)" in report.problems[1]
    # A copy within a class and an unused file are warnings, not problems.
    assert len(report.warnings) == 2
    assert "within a class (1 exact)" in report.warnings[0]
    assert report.warnings[1] == "1 file not used: 1 not an image extension"


def test_fixing_the_problems_turns_the_verdict_to_ok(planted):
    for name in ("dog/img1_copy.png", "fox/china_small.jpg", "cat/empty.jpg", "dog/fake.png"):
        (planted / name).unlink()
    report = inspect_folder(planted)
    assert report.ok
    assert report.verdict == "OK: 17 images, 3 classes, no problems found (2 warnings)"


def test_the_report_is_json_ready_and_paths_are_relative(planted):
    report = inspect_folder(planted)
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    assert data["verdict"] == report.verdict and data["ok"] is False
    assert data["problems"] == report.problems and data["warnings"] == report.warnings
    assert data["images"] == 19 and data["classes"] == ["cat", "dog", "fox"]
    assert data["splits"]["all"]["class_counts"] == {"cat": 7, "dog": 6, "fox": 6}
    assert data["splits"]["all"]["imbalance"] == pytest.approx(7 / 6)
    assert data["near_duplicate_distance"] == DEFAULT_NEAR_DUPLICATE_DISTANCE
    assert data["hash_bits"] == 256
    group = data["near_duplicates"][0]
    assert group["kind"] == "across_classes" and group["across_classes"] is True
    assert group["across_splits"] is False
    assert group["files"] == [
        {"path": "cat/china.png", "split": "all", "class": "cat"},
        {"path": "fox/china_small.jpg", "split": "all", "class": "fox"},
    ]
    every_path = [p for g in data["exact_duplicates"] + data["near_duplicates"] for p in g["paths"]]
    every_path += [f["path"] for f in data["bad_files"] + data["ignored_files"]]
    assert every_path and not any(p.startswith("/") or str(planted) in p for p in every_path)


def test_the_text_summary_shows_verdict_counts_problems_and_the_files(planted):
    text = inspect_folder(planted).format_text()
    lines = text.splitlines()
    assert lines[0].startswith("4 problems:")
    assert any(line.split() == ["cat", "7"] for line in lines)
    assert any(line.split() == ["imbalance", "1.2x"] for line in lines)
    for expected in (
        "Problems:",
        "Warnings:",
        "Files that cannot be decoded (2):",
        "  cat/empty.jpg: empty file",
        "Files not used (1):",
        "Exact duplicates (2):",
        "  across classes: cat/img1.png | dog/img1_copy.png",
        "Near duplicates (1):",
        "Modes: RGB 19",
    ):
        assert expected in lines, expected


# ---------------------------------------------------------------------------------------------
# Near duplicates: found when they should be, not when they should not


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg", "astronaut.png", "coffee.png"])
@pytest.mark.parametrize(("scale", "quality"), [(0.5, 60), (0.35, 40), (1.5, 90), (1.0, 75)])
def test_a_resized_and_reencoded_photo_is_a_near_duplicate(tmp_path, name, scale, quality):
    root = flat_folder(tmp_path / "data", {"a": 3, "b": 3})
    original = photo(name)
    save(original, root / "a" / "photo.png")
    save(reencoded(original, scale, quality), root / "b" / "copy.jpg", quality=quality)

    report = inspect_folder(root)

    assert rel_groups(report, "near") == [("across_classes", {"a/photo.png", "b/copy.jpg"})]
    assert report.exact_duplicates == []
    assert "1 duplicate group across classes" in report.verdict


def test_the_threshold_decides_what_is_near(tmp_path):
    root = flat_folder(tmp_path / "data", {"a": 2, "b": 2})
    original = photo("china.jpg")
    save(original, root / "a" / "photo.png")
    save(reencoded(original, 0.35, 40), root / "b" / "copy.jpg", quality=40)
    found = inspect_folder(root).near_duplicates
    assert len(found) == 1 and found[0].distance > 0
    assert inspect_folder(root, near_duplicate_distance=found[0].distance).near_duplicates
    assert not inspect_folder(root, near_duplicate_distance=found[0].distance - 1).near_duplicates


def test_distinct_pictures_are_not_reported_as_duplicates(tmp_path):
    root = tmp_path / "data"
    for k in range(36):  # fields and shapes of assorted sizes, PNG and JPEG
        size = [(64, 64), (96, 64), (50, 70)][k % 3]
        ext = "jpg" if k % 4 == 0 else "png"
        save(distinct(k, size), root / f"class{k % 3}" / f"{k}.{ext}")
    for k, name in enumerate(["china.jpg", "flower.jpg", "astronaut.png", "coffee.png"]):
        save(photo(name), root / f"class{k % 3}" / f"photo{k}.png")
    # Two frames of the same scene from two viewpoints are distinct pictures too.
    save(photo("motorcycle_left.png"), root / "class0" / "left.png")
    save(photo("motorcycle_right.png"), root / "class1" / "right.png")

    report = inspect_folder(root)

    assert report.images == 42
    assert report.exact_duplicates == [] and report.near_duplicates == []
    assert report.ok, report.problems


def test_look_alike_real_pictures_are_not_reported_as_duplicates():
    # 2,500 Fashion-MNIST pictures: 250 shirts, 250 sandals... of similar shape and pose.
    report = inspect_folder(FASHION)
    assert report.images == 2500
    assert report.exact_duplicates == [] and report.near_duplicates == []


def test_the_same_shape_in_other_colours_is_not_a_near_duplicate(tmp_path):
    root = flat_folder(tmp_path / "data", {"stop": 2, "go": 2})
    for cls, colour in (("stop", (220, 30, 30)), ("go", (30, 30, 220))):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse([12, 12, 52, 52], fill=colour)
        save(img, root / cls / "sign.png")
    # The perceptual hash ignores colour: the two signs hash alike...
    red, blue = (duplicates._examine(root / c / "sign.png") for c in ("stop", "go"))
    hash_distance = int(np.bitwise_count(red.phash ^ blue.phash).sum())
    assert hash_distance <= DEFAULT_NEAR_DUPLICATE_DISTANCE
    # ...so only the colour comparison keeps them apart.
    assert inspect_folder(root).near_duplicates == []


# ---------------------------------------------------------------------------------------------
# Splits: leakage


def test_copies_across_train_val_and_test_are_leakage(tmp_path):
    root = tmp_path / "data"
    k = 0
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("cat", "dog"):
            for _ in range(n):
                save(distinct(k), root / split / cls / f"{k}.png")
                k += 1
    (root / "test" / "cat" / "leak.png").write_bytes(
        (root / "train" / "cat" / "0.png").read_bytes()
    )
    china = photo("china.jpg")
    save(china, root / "train" / "dog" / "china.png")
    save(reencoded(china, 0.5, 80), root / "val" / "dog" / "china.jpg", quality=80)

    report = inspect_folder(root)

    assert report.layout == "split"
    assert rel_groups(report, "exact") == [
        ("across_splits", {"train/cat/0.png", "test/cat/leak.png"})
    ]
    assert rel_groups(report, "near") == [
        ("across_splits", {"train/dog/china.png", "val/dog/china.jpg"})
    ]
    assert report.exact_duplicates[0].files[0].split == "train"
    assert report.verdict == "2 problems: 2 duplicate groups across splits (leakage)"
    assert "train/test, train/val" in report.problems[0]
    assert report.counts == {
        "train": {"cat": 4, "dog": 5},
        "val": {"cat": 2, "dog": 3},
        "test": {"cat": 3, "dog": 2},
    }


def test_given_splits_of_a_flat_folder_reveal_leakage(tmp_path):
    root = flat_folder(tmp_path / "data", {"cat": 10, "dog": 10})
    original = root / "cat" / "img0.png"
    (root / "cat" / "img0_copy.png").write_bytes(original.read_bytes())

    # The folder alone: a copy within a class, a warning.
    alone = inspect_folder(root)
    assert alone.ok and rel_groups(alone, "exact")[0][0] == "within_class"

    # The split training would use, with the copy and its original in different splits.
    folder = scan_image_folder(root)
    splits = complete_splits(folder, DEFAULT_FRACTIONS, seed=0)
    where = {s.path.name: name for name, samples in splits.items() for s in samples}
    copy = next(s for s in splits[where["img0_copy.png"]] if s.path.name == "img0_copy.png")
    splits[where["img0_copy.png"]].remove(copy)
    target = "test" if where["img0.png"] != "test" else "val"
    splits[target].append(copy)

    report = inspect_folder(root, splits)

    assert report.splits_given and list(report.counts) == ["train", "val", "test"]
    assert sum(sum(c.values()) for c in report.counts.values()) == 21
    assert rel_groups(report, "exact") == [("across_splits", {"cat/img0.png", "cat/img0_copy.png"})]
    assert {f.split for f in report.exact_duplicates[0].files} == {where["img0.png"], target}
    assert not report.ok and "leakage" in report.verdict
    assert f"cat/img0_copy.png [{target}]" in report.format_text()


def test_the_same_file_in_two_given_splits_is_leakage(tmp_path):
    root = flat_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    samples = scan_image_folder(root).samples["all"]
    report = inspect_folder(root, {"train": samples, "test": samples[:1]})
    assert rel_groups(report, "exact") == [("across_splits", {"cat/img0.png"})]
    assert len(report.exact_duplicates[0].files) == 2
    assert report.verdict == "1 problem: 1 duplicate group across splits (leakage)"


def test_a_given_sample_with_a_foreign_label_is_refused(tmp_path):
    root = flat_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    with pytest.raises(DataError, match="label 5 but .* has 2 classes"):
        inspect_folder(root, {"train": [Sample(root / "cat" / "img0.png", 5)]})


# ---------------------------------------------------------------------------------------------
# Other problems and warnings


def test_a_class_without_any_decodable_image_is_a_problem(tmp_path):
    root = flat_folder(tmp_path / "data", {"cat": 3})
    (root / "dog").mkdir()
    (root / "dog" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "dog" / "b.png").write_bytes(b"")
    report = inspect_folder(root)
    assert report.counts == {"all": {"cat": 3, "dog": 0}}
    assert report.imbalance("all") is None
    assert report.verdict == (
        "3 problems: 2 files cannot be decoded, 1 class without a decodable image"
    )
    assert "'dog'" in report.problems[1]
    assert (
        json.loads(json.dumps(report.to_dict(), allow_nan=False))["splits"]["all"]["imbalance"]
        is None
    )


def test_a_large_imbalance_is_a_warning(tmp_path):
    root = flat_folder(tmp_path / "data", {"many": int(IMBALANCE_WARNING) * 2, "few": 2})
    report = inspect_folder(root)
    assert report.ok
    assert report.imbalance("all") == IMBALANCE_WARNING
    assert report.warnings == [
        "classes are imbalanced in the data folder: 'many' has 20 images and 'few' 2 (10.0x). "
        "Consider class weights or more images of the small classes."
    ]
    assert inspect_folder(flat_folder(tmp_path / "b", {"many": 19, "few": 2})).warnings == []


def test_the_number_of_workers_does_not_change_the_report(planted):
    one = inspect_folder(planted, workers=1).to_dict()
    three = inspect_folder(planted, workers=3, progress=True).to_dict()
    one.pop("seconds"), three.pop("seconds")
    assert one == three


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"near_duplicate_distance": -1}, ConfigError, "from 0 to 255"),
        ({"near_duplicate_distance": 256}, ConfigError, "from 0 to 255"),
        ({"near_duplicate_distance": 2.5}, ConfigError, "from 0 to 255"),
        ({"near_duplicate_distance": True}, ConfigError, "from 0 to 255"),
        ({"workers": 0}, ConfigError, "workers must be a positive integer"),
    ],
)
def test_invalid_options_are_refused(tmp_path, options, error, match):
    root = flat_folder(tmp_path / "data", {"cat": 1, "dog": 1})
    with pytest.raises(error, match=match):
        inspect_folder(root, **options)


def test_a_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        inspect_folder(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# The pair search


def test_the_blockwise_pair_search_finds_exactly_the_close_pairs(monkeypatch):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, (300, 4), dtype=np.uint64)
    bits = np.unpackbits(hashes.view(np.uint8), axis=1)
    for a, b, flips in ((3, 250, 0), (10, 11, 7), (42, 299, 24), (100, 5, 25), (7, 8, 40)):
        changed = bits[a].copy()
        changed[rng.choice(256, flips, replace=False)] ^= 1
        bits[b] = changed
    bits[200] = 1 - bits[201]  # all 256 bits differ: must not wrap around to distance 0
    hashes = np.packbits(bits, axis=1).view(np.uint64)
    monkeypatch.setattr(duplicates, "_PAIR_BLOCK", 1000)  # 3 rows per block: many blocks

    i, j, d = duplicates._near_pairs(hashes, 24)

    expected = {
        (a, b, int((bits[a] != bits[b]).sum()))
        for a in range(300)
        for b in range(a + 1, 300)
        if (bits[a] != bits[b]).sum() <= 24
    }
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == expected
    assert {(a, b) for a, b, _ in expected} >= {(3, 250), (10, 11), (42, 299)}
    assert (5, 100) not in {(a, b) for a, b, _ in expected}


def test_the_popcount_table_agrees_with_numpy():
    x = np.random.default_rng(1).integers(0, 2**63, (7, 9), dtype=np.uint64) * 2 + 1
    np.testing.assert_array_equal(duplicates._popcount_table(x), np.bitwise_count(x))


def test_a_copy_in_another_class_and_split_counts_as_both_problems(tmp_path):
    root = tmp_path / "data"
    for k in range(8):
        split = "train" if k < 4 else "test"
        save(distinct(k), root / split / ("cat" if k % 2 else "dog") / f"{k}.png")
    (root / "test" / "dog" / "copy.png").write_bytes(
        (root / "train" / "cat" / "1.png").read_bytes()
    )
    report = inspect_folder(root)
    group = report.exact_duplicates[0]
    assert group.kind == "across_classes" and group.across_splits
    assert report.verdict == (
        "2 problems: 1 duplicate group across classes (likely label errors), "
        "1 duplicate group across splits (leakage)"
    )
