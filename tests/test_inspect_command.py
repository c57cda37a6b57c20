"""`finetune inspect` and the dataset check at the start of `train`."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.errors import DataError
from tests.helpers import FASHION, image_subset


@pytest.fixture
def leaky(tmp_path):
    """A train/val/test folder where one test image is a copy of a training image."""
    root = image_subset(FASHION, tmp_path / "data", classes=3, per_class=10, layout="split")
    first = sorted((root / "train" / "bag").glob("*.png"))[0]
    shutil.copy(first, root / "test" / "bag" / "copy_of_train.png")
    return root


def test_clean_folder_exits_0_and_leakage_exits_1_with_the_files_named(tmp_path, leaky):
    clean = image_subset(FASHION, tmp_path / "clean", classes=3, per_class=10)
    result = CliRunner().invoke(app, ["inspect", str(clean), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True

    result = CliRunner().invoke(app, ["inspect", str(leaky), "--json"])
    assert result.exit_code == 1
    found = json.loads(result.output)
    assert found["ok"] is False
    (group,) = found["exact_duplicates"]
    assert group["kind"] == "across_splits"
    assert "test/bag/copy_of_train.png" in group["paths"]

    result = CliRunner().invoke(app, ["inspect", str(leaky)])
    assert result.exit_code == 1
    assert "copy_of_train.png" in result.output


def test_bad_folder_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert isinstance(result.exception, DataError)
    assert "missing" in str(result.exception)


@pytest.mark.slow
def test_train_records_the_check_and_goes_on(leaky, tmp_path):
    out = tmp_path / "run"
    finetune.train(leaky, out=out, image_size=32, head_epochs=1, finetune_epochs=0, progress=False)
    check = json.loads((out / "inspect.json").read_text())
    assert check["ok"] is False and check["splits_given"] is True
    assert any("copy_of_train.png" in p for p in check["exact_duplicates"][0]["paths"])
    assert (out / "model.keras").is_file()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "copy_of_train.png" in page  # the duplicate group is listed on the report page

    out2 = tmp_path / "run_unchecked"
    finetune.train(
        leaky,
        out=out2,
        image_size=32,
        head_epochs=1,
        finetune_epochs=0,
        progress=False,
        check_data=False,
    )
    assert not (out2 / "inspect.json").exists()
