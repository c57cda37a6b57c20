"""Recipe pieces: the phase plan and the optimizers named in configs."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from finetune.config import Config, RecipeConfig
from finetune.recipes import make_optimizer, two_phase_plan
from finetune.recipes.optimizers import FusedAdam, FusedAdamW
from finetune.train import scratch_config


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
        ("adagrad", keras.optimizers.Adagrad),
        ("adam", FusedAdam),  # Keras' Adam in TensorFlow's fused kernel (test_optimizers.py)
        ("adamw", FusedAdamW),
    ],
)
def test_optimizers_by_name(name, cls):
    recipe = RecipeConfig(optimizer=name, momentum=0.8, nesterov=True, weight_decay=0.01)
    optimizer = make_optimizer(recipe, 3e-4)
    assert type(optimizer) is cls
    assert isinstance(optimizer, getattr(keras.optimizers, cls.__name__.removeprefix("Fused")))
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
    # The default phase 2: the top group at finetune_lr, the lowest unfrozen one at a tenth.
    assert plan[1].learning_rate == RecipeConfig().finetune_lr
    assert plan[1].lowest_group_lr == 0.1
    assert [p.name for p in two_phase_plan(RecipeConfig(finetune_epochs=0))] == ["head"]


def test_scratch_baseline_has_the_same_budget_and_trains_everything():
    config = Config(recipe=dataclasses.replace(RecipeConfig(), head_epochs=2, finetune_epochs=3))
    scratch = scratch_config(config)
    plan = two_phase_plan(scratch.recipe)
    assert [(p.name, p.epochs, p.unfreeze_groups, p.train_batchnorm) for p in plan] == [
        ("finetune", 5, -1, True)
    ]
    assert scratch.model.weights == "none" and scratch.data == config.data


@pytest.mark.parametrize("discriminative", [False, True])
def test_weight_decay_skips_biases_and_batchnorm(discriminative):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()]
    )
    factors = {model.layers[0].kernel.path: 0.5} if discriminative else None
    recipe = RecipeConfig(optimizer="adamw", weight_decay=0.5)
    optimizer = make_optimizer(recipe, 0.1, lr_multipliers=factors)
    assert type(optimizer).__name__ == (
        "DiscriminativeFusedAdamW" if discriminative else "FusedAdamW"
    )
    before = {v.path: np.asarray(v).copy() for v in model.trainable_variables}
    # Zero gradients: Adam's step is zero, so whatever changes is weight decay alone.
    optimizer.apply_gradients(
        [(np.zeros(v.shape, "float32"), v) for v in model.trainable_variables]
    )
    for v in model.trainable_variables:
        after = np.asarray(v)
        if v.name == "kernel":
            np.testing.assert_allclose(after, before[v.path] * (1 - 0.1 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(after, before[v.path])


def test_gradual_unfreezing_adds_one_group_per_step():
    recipe = RecipeConfig(
        head_epochs=1, finetune_epochs=5, unfreeze_groups=3, unfreeze="gradual", gradual_epochs=1
    )
    plan = two_phase_plan(recipe)
    assert [(p.name, p.epochs, p.unfreeze_groups) for p in plan] == [
        ("head", 1, None),
        ("finetune_1", 1, 1),
        ("finetune_2", 1, 2),
        ("finetune_3", 3, 3),  # the last step runs the rest of finetune_epochs
    ]
    assert all(p.learning_rate == recipe.finetune_lr for p in plan[1:])
    # -1 (all groups) needs the backbone's group count; too few epochs drop the late steps.
    short = dataclasses.replace(recipe, unfreeze_groups=-1, finetune_epochs=2)
    assert [p.name for p in two_phase_plan(short, num_groups=9)] == [
        "head",
        "finetune_1",
        "finetune_2",
    ]
