"""Recipe pieces: the phase plan and the optimizers named in configs."""

from __future__ import annotations

import dataclasses

import keras
import pytest

from finetune.config import Config, RecipeConfig
from finetune.recipes import make_optimizer, two_phase_plan
from finetune.train import scratch_config


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
        ("adagrad", keras.optimizers.Adagrad),
        ("adam", keras.optimizers.Adam),
        ("adamw", keras.optimizers.AdamW),
    ],
)
def test_optimizers_by_name(name, cls):
    recipe = RecipeConfig(optimizer=name, momentum=0.8, nesterov=True, weight_decay=0.01)
    optimizer = make_optimizer(recipe, 3e-4)
    assert type(optimizer) is cls
    assert float(optimizer.learning_rate) == pytest.approx(3e-4)
    if name == "sgd":
        assert optimizer.momentum == 0.8 and optimizer.nesterov
    if name == "adamw":
        assert optimizer.weight_decay == 0.01


def test_two_phase_plan_skips_empty_phases():
    plan = two_phase_plan(RecipeConfig(head_epochs=2, finetune_epochs=3, unfreeze_groups=4))
    assert [(p.name, p.epochs, p.unfreeze_groups) for p in plan] == [
        ("head", 2, None),
        ("finetune", 3, 4),
    ]
    assert plan[1].learning_rate <= plan[0].learning_rate / 10
    assert [p.name for p in two_phase_plan(RecipeConfig(finetune_epochs=0))] == ["head"]


def test_scratch_baseline_has_the_same_budget_and_trains_everything():
    config = Config(recipe=dataclasses.replace(RecipeConfig(), head_epochs=2, finetune_epochs=3))
    scratch = scratch_config(config)
    plan = two_phase_plan(scratch.recipe)
    assert [(p.name, p.epochs, p.unfreeze_groups, p.train_batchnorm) for p in plan] == [
        ("finetune", 5, -1, True)
    ]
    assert scratch.model.weights == "none" and scratch.data == config.data
