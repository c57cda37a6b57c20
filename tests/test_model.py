"""The classifier: preprocessing from the registry, logits output, freezing by layer group."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import finetune
from finetune.backbones import get_backbone
from finetune.config import ModelConfig
from finetune.model import (
    Normalize,
    backbone_of,
    build_classifier,
    freeze_backbone,
    is_batchnorm,
    unfreeze_top_groups,
)


def test_normalize_matches_the_backbone_preprocessing():
    x = np.array([[[[0.0, 127.0, 255.0]]]], np.float32)
    lite = Normalize.from_preprocessing(get_backbone("efficientnet_lite0").preprocessing)
    np.testing.assert_allclose(np.asarray(lite(x)), [[[[-127 / 128, 0.0, 1.0]]]], rtol=1e-6)
    caffe = Normalize.from_preprocessing(get_backbone("vgg16").preprocessing)
    # Caffe style: RGB -> BGR, then the ImageNet BGR means are subtracted.
    np.testing.assert_allclose(
        np.asarray(caffe(x)), [[[[255 - 103.939, 127 - 116.779, 0 - 123.68]]]], rtol=1e-5
    )


@pytest.fixture(scope="module")
def classifier():
    spec = get_backbone("efficientnet_lite0")
    head = ModelConfig(hidden_units=[16], dropout=0.5)
    return spec, build_classifier(spec, 3, image_size=32, head=head, weights=None)


def test_head_returns_logits_and_the_seed_004_shape(classifier):
    _, model = classifier
    assert model.get_layer("logits").activation is keras.activations.linear
    assert [layer.name for layer in model.layers[-3:]] == ["head_dense_0", "head_dropout", "logits"]
    out = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert out.shape == (2, 3)


def test_freeze_and_unfreeze_by_group(classifier):
    spec, model = classifier
    freeze_backbone(model)
    assert not any(w.trainable for w in backbone_of(model).weights)
    head_weights = len(model.trainable_weights)
    assert head_weights == 4  # hidden Dense and logits, kernel and bias each

    groups = unfreeze_top_groups(model, spec, 2)
    assert groups == spec.group_names[-2:] == ["block7", "top"]
    for layer in backbone_of(model).layers:
        expected = spec.group_of(layer.name) in groups and not is_batchnorm(layer)
        assert layer.trainable == expected or not layer.weights, layer.name

    unfreeze_top_groups(model, spec, -1, train_batchnorm=True)
    assert all(layer.trainable for layer in backbone_of(model).layers if layer.weights)
    assert unfreeze_top_groups(model, spec, 0) == []
    assert len(model.trainable_weights) == head_weights


def test_saved_classifier_round_trips_in_safe_mode(classifier, tmp_path):
    _, model = classifier
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_public_names_are_importable_from_the_package():
    for name in finetune.__all__:
        assert getattr(finetune, name) is not None, name
