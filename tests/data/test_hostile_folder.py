"""A data folder full of hostile and odd files: each is decoded right or named, and the run goes on.

One folder holds real digit images plus a truncated JPEG, an empty file, text named .jpg, a
decompression bomb, a file whose name is not UTF-8, and files that are odd but fine (16-bit,
CMYK, palette with transparency, animated GIF, EXIF-rotated, a name with spaces). The dataset
check and a real (one-epoch) training run must both finish, name every bad file with its reason,
keep every good one, and write records that are valid UTF-8 text without lone surrogates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

import finetune
from finetune.data.pipeline import prepare_image_data
from tests.data.test_decode import png_header_only, raw_png
from tests.helpers import DIGITS, image_subset

BAD = {
    "cut.jpg": "truncated or corrupt",
    "empty.png": "empty file",
    "notes.jpg": "not an image",
    "bomb.png": "decompression bomb",
}
ODD_BUT_FINE = [
    "with space.png",
    "grey16.png",
    "cmyk.jpg",
    "palette.png",
    "anim.gif",
    "rotated.jpg",
]
NON_UTF8 = b"caf\xe9.png"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    root = image_subset(DIGITS, tmp_path_factory.mktemp("hostile"), classes=2, per_class=12)
    folder = sorted(p for p in root.iterdir() if p.is_dir())[0]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "x.jpg")
    data = (folder / "x.jpg").read_bytes()
    (folder / "x.jpg").unlink()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture\n")
    png_header_only(folder / "bomb.png", 50_000, 50_000)

    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "with space.png")
    raw_png(folder / "grey16.png", np.full((16, 16), 40_000, np.uint16), colour_type=0)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0, 0, 0] * 254)
    palette.save(folder / "palette.png", transparency=0)
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 0, 250), (250, 0, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    rotated = Image.new("RGB", (32, 16), (20, 20, 20))
    exif = rotated.getexif()
    exif[ExifTags.Base.Orientation] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (16, 16)).save(os.path.join(os.fsencode(folder), NON_UTF8), format="PNG")
    return root


def assert_text_record(path: Path) -> None:
    """Valid UTF-8; JSON that parses, with no string holding a lone surrogate."""
    text = path.read_bytes().decode("utf-8")
    if path.suffix != ".json":
        return
    pending = [json.loads(text)]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            item.encode("utf-8")  # raises on a lone surrogate
    assert "\\ud" not in text.lower(), f"{path} holds an escaped surrogate"


def test_decoding_keeps_the_good_and_names_the_bad(hostile):
    data = prepare_image_data(hostile, image_size=16, progress=False)
    bad = {b.path.name: b.reason for b in data.bad_files}
    assert set(bad) == set(BAD)
    for name, reason in BAD.items():
        assert reason in bad[name], (name, bad[name])
    kept = {s.path.name for samples in data.splits.values() for s in samples}
    assert set(ODD_BUT_FINE) <= kept
    assert len(kept) == 2 * 12 + len(ODD_BUT_FINE)
    ignored = {f.path.name: f.reason for f in data.ignored}
    assert ignored == {"caf\\xe9.png": "name is not valid UTF-8 text: rename it to use it"}


def test_dataset_check_names_the_bad_files(hostile):
    report = finetune.inspect_folder(hostile, progress=False)
    assert {Path(f.path).name for f in report.bad_files} == set(BAD)
    text = json.dumps(report.to_dict(), ensure_ascii=False)
    assert "caf\\\\xe9.png" in text
    text.encode("utf-8")


@pytest.mark.slow
def test_a_run_on_the_folder_finishes_and_its_records_are_text(hostile, tmp_path):
    out = tmp_path / "run"
    run = finetune.train(
        hostile, out=out, image_size=32, head_epochs=1, finetune_epochs=0, progress=False
    )
    assert run.metrics["num_images"] > 0
    left_out = json.loads((out / "bad_files.json").read_text(encoding="utf-8"))
    named = {Path(f["path"]).name: f["reason"] for f in left_out["bad_files"]}
    assert set(named) == set(BAD)
    assert any(f["path"].endswith("caf\\xe9.png") for f in left_out["ignored"])
    for record in out.rglob("*"):
        if record.suffix in (".json", ".csv", ".html", ".toml"):
            assert_text_record(record)
    assert "cut.jpg" in (out / "report.html").read_text(encoding="utf-8")
