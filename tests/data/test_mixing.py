"""MixUp and CutMix mix images and labels in the same proportion, in the training pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.config import AugmentConfig, Config, ConfigError, with_overrides
from finetune.data.augment import build_mixing
from finetune.data.pipeline import image_dataset

N = 8  # one image per class, each a flat grey of its own level


def flat_batch():
    levels = np.linspace(10, 240, N).astype("float32")
    images = np.broadcast_to(levels[:, None, None, None], (N, 16, 16, 3)).copy()
    return images, np.eye(N, dtype="float32"), levels


def mixed(config: AugmentConfig, coin: int = 0):
    images, labels, levels = flat_batch()
    mix = build_mixing(config, seed=1)
    out_images, out_labels = mix(images, labels, np.int64(coin))
    return np.asarray(out_images), np.asarray(out_labels), levels


def assert_labels_match_pixels(images, labels, levels):
    # Each output image's mean level is the label-weighted mean of the input levels: the label
    # weights are exactly the shares of each source image in the pixels.
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), labels @ levels, rtol=1e-3, atol=0.05)


def test_mixup_blends_every_pixel_and_the_labels_alike():
    images, labels, levels = mixed(AugmentConfig(mixup=0.4))
    assert_labels_match_pixels(images, labels, levels)
    assert (labels.max(axis=1) < 0.999).any()  # labels really are mixed
    # MixUp blends whole images: each output is still one flat level.
    np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 0.0, atol=1e-3)


def test_cutmix_pastes_a_box_whose_area_is_the_label_share():
    images, labels, levels = mixed(AugmentConfig(cutmix=1.0))
    assert_labels_match_pixels(images, labels, levels)
    pasted = images.std(axis=(1, 2, 3)) > 1.0
    assert pasted.any()
    for image, label in zip(images[pasted], labels[pasted], strict=True):
        # Exactly two source images show, the ones the label names.
        shown = {round(float(v), 3) for v in np.unique(image)}
        named = {round(float(levels[k]), 3) for k in np.flatnonzero(label > 1e-6)}
        assert shown == named and len(shown) == 2


def test_with_both_each_batch_gets_one_of_them():
    both = AugmentConfig(mixup=0.4, cutmix=1.0)
    assert np.allclose(mixed(both, coin=0)[0].std(axis=(1, 2, 3)), 0.0, atol=1e-3)  # MixUp
    assert (mixed(both, coin=1)[0].std(axis=(1, 2, 3)) > 1.0).any()  # CutMix


def test_off_unless_asked_and_values_are_checked():
    assert build_mixing(AugmentConfig()) is None
    assert build_mixing(AugmentConfig(enabled=False, mixup=0.4)) is None
    with pytest.raises(ConfigError, match="augment.mixup"):
        with_overrides(Config(), **{"augment.mixup": -1.0})


def test_the_training_dataset_mixes_and_the_evaluation_dataset_does_not():
    images = np.repeat(np.arange(0, 250, 25, dtype=np.uint8), 16 * 16 * 3).reshape(10, 16, 16, 3)
    labels = np.arange(10)
    mix = build_mixing(AugmentConfig(mixup=0.4), seed=0)
    train = image_dataset(images, labels, 10, batch_size=10, training=True, mixing=mix, seed=0)
    evaluation = image_dataset(images, labels, 10, batch_size=10, mixing=mix)
    _, train_labels = next(iter(train))
    _, eval_labels = next(iter(evaluation))
    assert np.asarray(train_labels).max(axis=1).min() < 0.999
    np.testing.assert_array_equal(np.asarray(eval_labels), np.eye(10))


def test_the_same_seed_mixes_the_same_way_through_a_parallel_pipeline():
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(64) % 10

    def epoch(seed):
        mix = build_mixing(AugmentConfig(mixup=0.4, cutmix=1.0), seed=seed)
        ds = image_dataset(images, labels, 10, batch_size=8, training=True, mixing=mix, seed=seed)
        return [np.asarray(y) for _, y in ds]

    first, again, other = epoch(1), epoch(1), epoch(2)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
