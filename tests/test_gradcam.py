"""Grad-CAM points at the part of the image that decides the class, on the fine-tuned model."""

from __future__ import annotations

import keras
import matplotlib
import numpy as np
import pytest
import tensorflow as tf

import finetune.model  # noqa: F401  (registers Normalize for loading a saved model)
from finetune.backbones.registry import get_backbone
from finetune.config import ModelConfig
from finetune.gradcam import grad_cam, overlay
from finetune.model import build_classifier, freeze_backbone
from finetune.recipes.feature_cache import split_at_pool

SPEC = get_backbone("efficientnet_lite0")
SIZE = 224  # a 7x7 last feature map of 32-pixel cells
CELL = 32
PATCH = 16  # centred in one cell
COLOURS = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220]], np.float32)  # the classes


def patch_images(count: int, rng: np.random.Generator):
    """Mid-grey noise with one coloured square in a random cell; the colour is the class.

    Returns:
        (uint8 images (count, SIZE, SIZE, 3), labels (count,), patch masks (count, SIZE, SIZE),
        the (row, column) of each patch's feature cell (count, 2)).
    """
    images = np.clip(rng.normal(128.0, 25.0, (count, SIZE, SIZE, 3)), 0, 255)
    labels = rng.permutation(np.arange(count) % len(COLOURS))
    cells = rng.integers(0, SIZE // CELL, (count, 2))
    masks = np.zeros((count, SIZE, SIZE), bool)
    offset = (CELL - PATCH) // 2
    for i, (row, col) in enumerate(cells):
        top, left = row * CELL + offset, col * CELL + offset
        images[i, top : top + PATCH, left : left + PATCH] = COLOURS[labels[i]]
        masks[i, top : top + PATCH, left : left + PATCH] = True
    return images.astype(np.uint8), labels, masks, cells


@pytest.fixture(scope="module")
def patch_classifier():
    """The real classifier (ImageNet EfficientNet-Lite0, frozen) with its head trained on patches.

    The head trains on cached pooled features, as `feature_cache` does; it shares its layers
    with the classifier, so the classifier itself is the fine-tuned model.
    """
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train_images, train_labels, _, _ = patch_images(96, rng)
    held_out = patch_images(48, rng)
    model = build_classifier(SPEC, len(COLOURS), image_size=SIZE)
    freeze_backbone(model)
    extractor, head = split_at_pool(model)
    features = extractor.predict(train_images.astype(np.float32), batch_size=32, verbose=0)
    head.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    head.fit(features, train_labels, epochs=20, batch_size=16, verbose=0)
    return model, held_out


def predicted_classes(model, images):
    return np.argmax(model.predict(images.astype(np.float32), verbose=0), axis=-1)


@pytest.mark.slow
def test_grad_cam_highlights_the_patch_that_decides_the_class(patch_classifier):
    model, (images, labels, masks, cells) = patch_classifier
    assert np.mean(predicted_classes(model, images) == labels) >= 0.9  # measured 1.0

    maps = grad_cam(model, images)

    # Where the heat peaks, in feature cells. The last feature map of EfficientNet-Lite0 spreads
    # a patch over the 3x3 cells around it about evenly (its features change as much one cell
    # away as in the patch's own cell), so the top of a map is a plateau over that block and its
    # highest cell within it is arbitrary (the patch's own cell: measured 0-6% over six seeds).
    # So the peak must lie in the patch's cell or a neighbour: by chance about 15% of a 7x7 map,
    # measured 100% over six seeds.
    peaks = np.array([np.unravel_index(np.argmax(m), m.shape) for m in maps]) // CELL
    near = np.all(np.abs(peaks - cells) <= 1, axis=1)
    assert near.mean() >= 0.9

    # The heat lies on the patch itself. Mean heat on the patch over mean heat elsewhere, pooled
    # over the images: measured 4.3 here, 4.2-4.8 over six seeds; per image: median 5.0 here,
    # and >= 2 on 96-100% of the images over six seeds.
    pooled = maps[masks].mean() / maps[~masks].mean()
    per_image = np.array(
        [m[k].mean() / max(m[~k].mean(), 1e-6) for m, k in zip(maps, masks, strict=True)]
    )
    assert pooled >= 3.0
    assert np.median(per_image) >= 3.0
    assert np.mean(per_image >= 2.0) >= 0.9


@pytest.mark.slow
def test_maps_are_at_image_size_in_0_1_and_follow_class_indices(patch_classifier):
    model, (images, _, masks, _) = patch_classifier
    images, masks = images[:12], masks[:12]
    predicted = predicted_classes(model, images)

    maps = grad_cam(model, images)
    assert maps.shape == (12, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, atol=1e-6)
    # The default is each image's predicted class; the batch size does not change the maps.
    np.testing.assert_allclose(grad_cam(model, images, predicted), maps, atol=1e-6)
    in_fives = grad_cam(model, images, list(predicted), batch_size=5)
    np.testing.assert_allclose(in_fives, maps, atol=1e-5)

    # Another class gives another map, and one that no longer concentrates on the patch.
    other = grad_cam(model, images, (predicted + 1) % len(COLOURS))
    assert np.abs(other - maps).mean() > 0.1
    assert other[masks].mean() < 0.5 * maps[masks].mean()


@pytest.mark.slow
def test_a_saved_and_reloaded_model_gives_the_same_maps(patch_classifier, tmp_path):
    model, (images, *_) = patch_classifier
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)

    np.testing.assert_allclose(grad_cam(loaded, images[:6]), grad_cam(model, images[:6]), atol=1e-5)


@pytest.fixture(scope="module")
def small_classifier():
    """An untrained classifier at 96 pixels (a 3x3 feature map) whose dropout would show."""
    keras.utils.set_random_seed(1)
    model = build_classifier(SPEC, 4, image_size=96, head=ModelConfig(dropout=0.9))
    # Blocks of random colours, so the cells of the feature map differ from one another.
    blocks = np.random.default_rng(1).uniform(0, 255, (5, 6, 6, 3)).astype(np.uint8)
    images = blocks.repeat(16, axis=1).repeat(16, axis=2)
    return model, images


def test_grad_cam_of_a_pooled_linear_head_is_the_class_weighted_feature_map(small_classifier):
    # With average pooling and a Dense head, the gradient of logit c is kernel[:, c] / (h * w)
    # at every position, so Grad-CAM is ReLU(feature_map @ kernel[:, c]) up to a scale. Equality
    # also shows that dropout (rate 0.9 here) is off.
    model, images = small_classifier
    classes = np.array([0, 1, 2, 3, 1])
    feature_model = keras.Model(model.input, model.get_layer("pool").input)
    features = feature_model(images.astype(np.float32), training=False).numpy()
    kernel = model.get_layer("logits").kernel.numpy()
    cam = np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0.0)
    expected = tf.image.resize(cam[..., None], (96, 96), method="bilinear").numpy()[..., 0]
    peak = expected.max(axis=(1, 2), keepdims=True)
    expected = np.divide(expected, peak, out=np.zeros_like(expected), where=peak > 0)
    assert np.sum(peak > 0) >= 3  # mostly real maps, not the all-zero case

    # Two float32 paths (the gradient tape, and an einsum here) to maps scaled to [0, 1]: they
    # differ by rounding, measured up to 1.1e-5 with the seeded initial weights; dropout left on
    # or another class's weights would be off by a share of the map.
    np.testing.assert_allclose(grad_cam(model, images, classes), expected, atol=5e-5)


def test_grad_cam_works_through_hidden_head_layers():
    model = build_classifier(
        SPEC, 3, image_size=64, head=ModelConfig(hidden_units=[8]), weights=None
    )
    images = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3))

    maps = grad_cam(model, images, [0, 1, 2])
    assert maps.shape == (3, 64, 64) and maps.min() >= 0.0 and maps.max() <= 1.0


def test_an_all_zero_map_stays_zero(small_classifier):
    model, images = small_classifier
    logits = model.get_layer("logits")
    saved = [w.numpy() for w in logits.weights]
    try:
        # A class whose weights are all negative meets only non-negative (ReLU6) features.
        logits.kernel.assign(-np.abs(saved[0]))
        maps = grad_cam(model, images, [0] * len(images))
    finally:
        logits.set_weights(saved)
    assert np.all(maps == 0.0)


def test_clear_errors(small_classifier):
    model, images = small_classifier
    plain = keras.Sequential([keras.Input((96, 96, 3)), keras.layers.Dense(2)], name="no_pool_net")
    with pytest.raises(ValueError, match="no_pool_net.*no layer named 'pool'"):
        grad_cam(plain, images)
    with pytest.raises(ValueError, match=r"\(N, height, width, 3\)"):
        grad_cam(model, images[0])
    with pytest.raises(ValueError, match="takes 96x96 images"):
        grad_cam(model, images[:, :64, :64])
    with pytest.raises(ValueError, match="one integer class index per image"):
        grad_cam(model, images, [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        grad_cam(model, images, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="batch_size"):
        grad_cam(model, images, batch_size=0)


def test_overlay_blends_the_image_with_the_jet_colours_of_the_map():
    image = np.full((4, 6, 3), 200, np.uint8)
    heat = np.zeros((4, 6), np.float32)
    heat[1, 2] = 1.0
    jet = matplotlib.colormaps["jet"]

    out = overlay(image, heat, alpha=0.5)
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[1, 2], 0.5 * 200 + 0.5 * 255 * np.array(jet(1.0)[:3]), atol=1)
    np.testing.assert_allclose(out[0, 0], 0.5 * 200 + 0.5 * 255 * np.array(jet(0.0)[:3]), atol=1)
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image[..., 0], heat, alpha=0.0), image)  # grey input
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, heat[:3])
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, heat, alpha=1.5)
