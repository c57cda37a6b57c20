"""The learning-rate range test: the ramp, the suggestion, the curve, and `--lr auto`."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.data.pipeline import image_dataset
from finetune.recipes.lr_finder import LRRangeTest, find_learning_rate, suggest_learning_rate
from tests.helpers import DIGITS, image_subset


def test_the_ramp_is_geometric_from_start_to_end():
    ramp = LRRangeTest(start=1e-6, end=1.0, num_steps=7)
    rates = [ramp.learning_rate_at(i) for i in range(7)]
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(np.log10(rates)), 1.0)


def test_the_suggestion_is_a_tenth_of_the_rate_at_the_lowest_loss():
    rates = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert suggest_learning_rate(rates, [2.0, 1.5, 0.7, 0.9, 5.0]) == pytest.approx(1e-4)
    assert np.isnan(suggest_learning_rate(rates, [np.nan] * 5))


def test_range_test_restores_the_weights_and_finds_the_valley():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 4, 4, 3), dtype=np.uint8)
    labels = (images[:, 0, 0, 0] > 127).astype(np.int64)  # learnable from one pixel
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    before = [np.array(w) for w in model.get_weights()]
    result = find_learning_rate(
        model,
        image_dataset(images, labels, 2, batch_size=16, training=True),
        optimizer=keras.optimizers.SGD(),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        num_steps=60,
        start=1e-4,
        end=1e3,
    )
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert 10 < len(result.losses) <= 60
    assert np.all(np.diff(result.learning_rates) > 0)
    # Huge rates blow the loss up, and the test stops there; the suggestion sits a decade
    # below the lowest smoothed loss.
    assert result.smoothed[-1] > 2 * min(result.smoothed)
    best = int(np.argmin(result.smoothed))
    assert result.suggestion == pytest.approx(result.learning_rates[best] / 10)
    assert best < len(result.smoothed) - 1


@pytest.mark.slow
def test_cli_lr_find_then_train_with_lr_auto(tmp_path):
    data = image_subset(DIGITS, tmp_path / "d", classes=3, per_class=30)
    runner = CliRunner()
    found = runner.invoke(
        app,
        [
            "lr-find",
            str(data),
            "--out",
            str(tmp_path / "lr"),
            "--image-size",
            "32",
            "--steps",
            "30",
        ],
        catch_exceptions=False,
    )
    assert found.exit_code == 0, found.output
    assert "Suggested learning rate" in found.stdout
    with Image.open(tmp_path / "lr" / "lr_find.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    curve = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert len(curve["learning_rates"]) == len(curve["smoothed"]) > 5

    run = finetune.train(
        data,
        out=tmp_path / "run",
        image_size=32,
        head_epochs=1,
        finetune_epochs=1,
        schedule="constant",  # so the recorded rate is the rate used
        lr="auto",
        progress=False,
    )
    suggestion = json.loads((tmp_path / "run" / "lr_find.json").read_text())["suggestion"]
    assert run.config.recipe.head_lr == pytest.approx(suggestion)
    # Discriminative rates (the default): the top group trains at the head's rate.
    assert run.config.recipe.finetune_lr == pytest.approx(suggestion)
    assert finetune.load_config(tmp_path / "run" / "config.toml").recipe.head_lr == pytest.approx(
        suggestion
    )
    assert run.history[0]["learning_rate"] == pytest.approx(suggestion, rel=1e-5)
