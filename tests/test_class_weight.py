"""Balanced class weights: computed from the training split and applied through the pipeline."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from finetune.config import RecipeConfig
from finetune.data.pipeline import image_dataset, with_class_weights
from finetune.train import class_weights


def test_balanced_weights_follow_the_class_counts():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    weights = class_weights(labels, RecipeConfig(class_weight="balanced"))
    # n / (k * n_c): 10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)
    assert weights == pytest.approx({0: 10 / 18, 1: 10 / 9, 2: 10 / 3})
    assert class_weights(labels, RecipeConfig()) is None


def test_the_pipeline_weights_match_keras_class_weight_and_follow_mixed_labels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    weights = class_weights(labels, RecipeConfig(class_weight="balanced"))
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    ds = image_dataset(images, labels, 3, batch_size=10)
    keras_way = model.fit(ds, class_weight=weights, epochs=1, shuffle=False, verbose=0)
    history = model.fit(with_class_weights(ds, weights, 3), epochs=1, shuffle=False, verbose=0)
    reported = history.history["loss"][0]
    assert reported == pytest.approx(keras_way.history["loss"][0], rel=1e-6)
    logits = model.predict(images.astype(np.float32), verbose=0)
    z = logits - logits.max(1, keepdims=True)
    per_image = -(z[np.arange(10), labels] - np.log(np.exp(z).sum(1)))
    expected = np.mean([weights[int(c)] for c in labels] * per_image)
    assert reported == pytest.approx(expected, rel=1e-4)
    assert reported != pytest.approx(per_image.mean(), rel=1e-3)


def test_mixed_labels_mix_the_class_weights():
    labels = np.array([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]], dtype=np.float32)
    ds = tf.data.Dataset.from_tensors((np.zeros((2, 1), np.float32), labels))
    _, _, sample_weight = next(iter(with_class_weights(ds, {0: 1.0, 1: 2.0, 2: 4.0}, 3)))
    np.testing.assert_allclose(sample_weight, [0.7 + 0.6, 0.8 + 2.4], rtol=1e-6)
