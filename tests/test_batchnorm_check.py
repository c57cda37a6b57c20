"""The BatchNorm check finds BatchNorm layers that would train inside a frozen part of a model."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import finetune
from finetune.backbones.registry import get_backbone
from finetune.model import backbone_of, build_classifier, freeze_backbone, unfreeze_top_groups

SPEC = get_backbone("efficientnet_lite0")


@pytest.fixture
def model():
    return build_classifier(SPEC, 3, image_size=32, weights=None)


def bn_layers(model):
    layers = backbone_of(model).layers
    return [x for x in layers if isinstance(x, keras.layers.BatchNormalization)]


def test_our_recipes_leave_no_batchnorm_training_in_a_frozen_part(model):
    freeze_backbone(model)
    assert finetune.check_batchnorm(model) == []
    unfreeze_top_groups(model, SPEC, 2, train_batchnorm=True)
    assert finetune.check_batchnorm(model) == []
    backbone_of(model).trainable = True  # everything trains: nothing is frozen
    assert finetune.check_batchnorm(model) == []


def test_batchnorm_unfrozen_in_a_frozen_backbone_is_named_and_really_drifts(model):
    freeze_backbone(model)
    for layer in bn_layers(model):
        layer.trainable = True
    with pytest.warns(finetune.BatchNormWarning, match="backbone/stem_bn"):
        found = finetune.check_batchnorm(model)
    assert len(found) == len(bn_layers(model))

    # What the warning is about: fit() overwrites the frozen backbone's statistics.
    stem_bn = backbone_of(model).get_layer("stem_bn")
    before = stem_bn.moving_mean.numpy().copy()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]]
    with pytest.warns(finetune.BatchNormWarning):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[finetune.BatchNormCheck()])
    assert np.abs(stem_bn.moving_mean.numpy() - before).max() > 0  # exactly equal if frozen


def test_the_callback_is_silent_on_a_safe_model(model):
    freeze_backbone(model)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.zeros((4, 32, 32, 3), "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", finetune.BatchNormWarning)
        model.fit(x, np.eye(3)[[0, 1, 2, 0]], verbose=0, callbacks=[finetune.BatchNormCheck()])


def test_a_new_batchnorm_after_a_frozen_backbone_is_fine_one_inside_is_not():
    backbone = build_classifier(SPEC, 3, image_size=32, weights=None).get_layer("backbone")
    backbone.trainable = False
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.BatchNormalization(name="new_bn")(backbone(inputs))
    model = keras.Model(inputs, x)
    assert finetune.check_batchnorm(model) == []  # new layer: meant to train

    # Frozen layer by layer, BatchNorm skipped, an activation in between: still found.
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")
    x = keras.layers.ReLU()(conv(inputs))
    x = keras.layers.BatchNormalization(name="bn_after_relu")(x)
    model = keras.Model(inputs, x)
    conv.trainable = False
    with pytest.warns(finetune.BatchNormWarning, match="bn_after_relu"):
        assert finetune.check_batchnorm(model) == ["bn_after_relu"]
