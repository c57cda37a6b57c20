"""Every seed scenario in examples/ runs end to end on the bundled data.

The examples name the seeds' backbones (ResNet50, VGG16), whose ImageNet weights cannot be
downloaded here, so `--backbone efficientnet_lite0` (offline weights) overrides them, as a user
would, and the budget is cut to one epoch per phase at 32 px. Everything else in the config
(head, augmentation, optimizer, split fractions, phases) is used as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import load_config
from tests.helpers import DIGITS, EXAMPLES, FASHION, image_subset

SEED_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("seed*.toml"))


def test_there_is_one_example_per_seed_document():
    seeds = sorted(p.name[:3] for p in (Path(__file__).parents[2] / "shared" / "seeds").glob("*"))
    names = [name[4:7] for name in SEED_EXAMPLES]
    assert names == ["000", "001", "002", "003", "004"]
    if seeds:  # the seed documents sit beside the repository in this workplace
        assert names == seeds


@pytest.mark.slow
@pytest.mark.parametrize("example", SEED_EXAMPLES)
def test_example_trains_on_bundled_data(example, tmp_path):
    config = load_config(EXAMPLES / example)
    if "digits" in example:
        data = image_subset(DIGITS, tmp_path / "data", classes=3, per_class=20)
    elif "train_val_test" in example:
        data = image_subset(FASHION, tmp_path / "data", classes=3, per_class=20, layout="split")
    else:
        data = image_subset(FASHION, tmp_path / "data", classes=3, per_class=20)
    out = tmp_path / "run"
    finetune_epochs = min(1, config.recipe.finetune_epochs)
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(data),
            "--config",
            str(EXAMPLES / example),
            "--out",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--image-size",
            "32",
            "--head-epochs",
            "1",
            "--finetune-epochs",
            str(finetune_epochs),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    resolved = load_config(out / "config.toml")
    assert resolved.model.backbone == "efficientnet_lite0"
    assert resolved.model.hidden_units == config.model.hidden_units
    assert resolved.augment == config.augment
    assert resolved.recipe.finetune_lr == config.recipe.finetune_lr
    history = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history] == ["head"] + ["finetune"] * finetune_epochs
    split = json.loads((out / "split.json").read_text())
    if "train_val_test" in example:  # the given folders are used as they are
        assert split["counts"]["test"] == {name: 4 for name in split["class_names"]}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] > 0
