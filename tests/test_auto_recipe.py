"""`--recipe auto` picks the recipe from the data and backbone, says why, keeps user options."""

from __future__ import annotations

import json

import numpy as np
import pytest

import finetune
from finetune.backbones.registry import get_backbone
from finetune.config import Config, with_overrides
from finetune.recipes.auto import auto_recipe
from tests.helpers import DIGITS, image_subset

LITE0 = get_backbone("efficientnet_lite0")  # 9 layer groups


def labels(per_class: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])


def chosen(decisions) -> dict:
    return {d.option: d.value for d in decisions}


def test_few_images_adapt_few_layers_and_many_images_adapt_all():
    few, few_why = auto_recipe(Config(), labels([10] * 10), 10, LITE0, epochs=40)
    many, many_why = auto_recipe(Config(), labels([1000] * 10), 10, LITE0, epochs=4)

    assert (few.recipe.head_epochs, few.recipe.finetune_epochs) == (20, 20)
    tiny, _ = auto_recipe(Config(), labels([5] * 10), 10, LITE0, epochs=40)
    assert tiny.recipe.unfreeze_groups == 6  # the top two thirds of 9
    assert few.recipe.unfreeze_groups == many.recipe.unfreeze_groups == -1
    assert few.recipe.finetune_lr > many.recipe.finetune_lr
    assert many.recipe.label_smoothing == 0.1 and few.recipe.label_smoothing == 0.0
    # Every decision carries its reason, naming what it was based on.
    assert all(d.reason for d in few_why + many_why)
    assert "10 training images per class" in chosen_reason(few_why, "recipe.unfreeze_groups")


def chosen_reason(decisions, option):
    return next(d.reason for d in decisions if d.option == option)


def test_the_epoch_budget_follows_the_number_of_steps():
    small, _ = auto_recipe(Config(), labels([10] * 10), 10, LITE0)  # 4 steps per epoch
    large, _ = auto_recipe(Config(), labels([2000] * 10), 10, LITE0)  # 625 steps per epoch
    assert small.recipe.head_epochs + small.recipe.finetune_epochs == 40
    assert large.recipe.head_epochs + large.recipe.finetune_epochs == 6


def test_imbalance_turns_on_class_weights_and_user_options_are_kept():
    given = with_overrides(Config(), **{"recipe.finetune_lr": 5e-5, "recipe.head_epochs": 7})
    config, decisions = auto_recipe(
        given,
        labels([200, 20, 200]),
        3,
        LITE0,
        keep=frozenset({"recipe.finetune_lr", "recipe.head_epochs"}),
        epochs=20,
    )
    assert chosen(decisions)["recipe.class_weight"] == "balanced"
    assert config.recipe.finetune_lr == 5e-5
    assert config.recipe.head_epochs == 7
    assert config.recipe.finetune_epochs == 13  # the rest of the budget after the kept 7
    assert "recipe.finetune_lr" not in chosen(decisions)
    assert "recipe.head_epochs" not in chosen(decisions)


@pytest.mark.slow
def test_train_with_the_auto_recipe_records_its_choices(tmp_path):
    data = image_subset(DIGITS, tmp_path / "digits", classes=3, per_class=30)
    run = finetune.train(
        data, out=tmp_path / "run", recipe="auto", image_size=32, head_epochs=1,
        finetune_epochs=1, progress=False,
    )  # fmt: skip
    written = json.loads((tmp_path / "run" / "recipe_auto.json").read_text())
    options = {d["option"]: d["value"] for d in written}
    assert options["recipe.unfreeze_groups"] == -1 and options["recipe.finetune_lr"] == 2e-3
    assert "recipe.head_epochs" not in options  # given by the user, kept
    assert run.config.recipe.finetune_lr == 2e-3
    assert [r["phase"] for r in run.history] == ["head", "finetune"]
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert "finetune_lr = 0.002" in saved and "head_epochs = 1" in saved
    with pytest.raises(finetune.FinetuneError, match="recipe='fancy'"):
        finetune.train(data, recipe="fancy", progress=False)
