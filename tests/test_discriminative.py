"""Discriminative learning rates: after one step, update sizes differ by the configured factors.

Checked on a real EfficientNet-Lite0 classifier (random weights, 32 px) for Adam, where scaling
the gradient would change nothing, and for SGD against a plain SGD step from the same weights.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from finetune.backbones import get_backbone
from finetune.config import ModelConfig
from finetune.model import backbone_of, build_classifier, unfreeze_top_groups
from finetune.recipes.discriminative import group_lr_multipliers, with_lr_multipliers
from finetune.recipes.optimizers import FusedAdam

SPEC = get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def setup():
    keras.utils.set_random_seed(0)
    model = build_classifier(SPEC, 3, image_size=32, head=ModelConfig(dropout=0.0), weights=None)
    groups = unfreeze_top_groups(model, SPEC, 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    y = np.eye(3)[rng.integers(0, 3, 8)].astype(np.float32)
    return model, groups, x, y, [np.asarray(w) for w in model.get_weights()]


def one_step(model, optimizer, x, y, initial):
    model.set_weights(initial)
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, y)
    return {v.path: np.asarray(v) - initial[i] for i, v in enumerate(model.weights) if v.trainable}


def kernel_of(model, layer_name):
    return next(
        v.path for v in model.trainable_weights if v.path.startswith(f"{layer_name}/kernel")
    )


def test_multipliers_are_geometric_from_the_lowest_group_to_the_head(setup):
    model, groups, *_ = setup
    assert groups == ["block7", "top"]
    factors = group_lr_multipliers(model, SPEC, groups, 0.01)
    assert factors[kernel_of(model, "block7a_project_conv")] == pytest.approx(0.01)
    assert factors[kernel_of(model, "top_conv")] == pytest.approx(0.1)
    assert kernel_of(model, "logits") not in factors  # the head keeps the base rate
    frozen = {
        v.path
        for layer in backbone_of(model).layers
        for v in layer.weights
        if SPEC.group_of(layer.name) not in groups
    }
    assert not frozen & set(factors)


@pytest.mark.parametrize("adam", [keras.optimizers.Adam, FusedAdam])  # FusedAdam: the default
def test_adam_steps_scale_with_the_group_factor(setup, adam):
    model, groups, x, y, initial = setup
    factors = group_lr_multipliers(model, SPEC, groups, 0.01)
    lr = 1e-3
    steps = one_step(model, with_lr_multipliers(adam(lr), factors), x, y, initial)
    # Adam's first step is lr * g / (|g| + eps): lr per element wherever the gradient is not tiny.
    for layer, factor in (("block7a_project_conv", 0.01), ("top_conv", 0.1), ("logits", 1.0)):
        step = np.abs(steps[kernel_of(model, layer)]).max()
        assert step == pytest.approx(lr * factor, rel=1e-3), layer
    ratio = (
        np.abs(steps[kernel_of(model, "top_conv")]).max()
        / np.abs(steps[kernel_of(model, "block7a_project_conv")]).max()
    )
    assert ratio == pytest.approx(10.0, rel=1e-3)


def test_sgd_steps_are_the_plain_steps_times_the_factor(setup):
    model, groups, x, y, initial = setup
    factors = group_lr_multipliers(model, SPEC, groups, 0.25)
    plain = one_step(model, keras.optimizers.SGD(0.01), x, y, initial)
    scaled = one_step(
        model, with_lr_multipliers(keras.optimizers.SGD(0.01), factors), x, y, initial
    )
    # Steps are differences of float32 weights: equal to within a few ulps of the weights.
    for path, step in plain.items():
        np.testing.assert_allclose(
            scaled[path], step * factors.get(path, 1.0), rtol=1e-4, atol=2e-7
        )


def test_a_model_compiled_with_it_saves_and_loads_in_safe_mode(setup, tmp_path):
    model, groups, x, y, initial = setup
    factors = group_lr_multipliers(model, SPEC, groups, 0.1)
    one_step(model, with_lr_multipliers(keras.optimizers.AdamW(1e-3), factors), x, y, initial)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert type(loaded.optimizer).__name__ == "DiscriminativeAdamW"
    assert loaded.optimizer.lr_multipliers == factors
