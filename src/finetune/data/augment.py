"""Training augmentation as a stack of Keras preprocessing layers, built from `AugmentConfig`.

The stack runs in the tf.data pipeline on uint8-range float images, only for the training split,
so saved and exported models carry no augmentation. Every seed document's settings map onto it:
`rotation` is in degrees (Keras' `RandomRotation` takes a fraction of a full turn, 0.1 = 36
degrees), shifts and zoom are fractions of the size, `fill_mode` as in Keras.

`augment` runs the layers with every random draw keyed by a per-batch key instead of the layers'
own seed generators. A layer called the usual way keeps its generator's state in a variable, a
stateful op; with TensorFlow's op determinism on (finetune's default) tf.data then runs the whole
map on one thread. Keyed, the map holds no state, runs in parallel, and a batch's augmentation
depends on its key alone (the pipeline derives it from the seed, the epoch and the batch), so a
resumed epoch replays it without saving any augmentation state.

MixUp and CutMix mix pairs of images of a batch and their one-hot labels in the same proportion;
`build_mixing` returns them as one batch-level step that runs after the per-image
transformations. Both are written here with stateless random ops keyed by a seeded stream, so
they repeat exactly under a seed whatever tf.data's parallelism. Keras' `CutMix` (3.15) also
weights the labels by the area of a box with fractional corners while the pixels it pastes are
whole, so its label shares differ from the pixel shares (the label check in
tests/data/test_mixing.py fails against it on 16-px images), and its `factor` is not the
paper's Beta alpha; here the label share is the exact share of pasted pixels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import keras
import tensorflow as tf
from keras.src.random.seed_generator import SeedGenerator

from finetune.config import AugmentConfig

Mixing = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def build_augmentation(config: AugmentConfig, seed: int = 0) -> keras.Sequential | None:
    """Returns the augmentation layers for `config`, or None when nothing would change an image.

    Args:
        config: which transformations and how strong.
        seed: base seed; each layer gets its own derived seed. Defaults to 0.

    Returns:
        A `keras.Sequential` to call with `training=True` on batches, or None.
    """
    if not config.enabled:
        return None
    fill = config.fill_mode
    layers: list[keras.layers.Layer] = []
    flip = {
        (True, True): "horizontal_and_vertical",
        (True, False): "horizontal",
        (False, True): "vertical",
    }.get((config.horizontal_flip, config.vertical_flip))
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=seed + 1))
    if config.rotation:
        layers.append(
            keras.layers.RandomRotation(config.rotation / 360.0, fill_mode=fill, seed=seed + 2)
        )
    if config.width_shift or config.height_shift:
        layers.append(
            keras.layers.RandomTranslation(
                config.height_shift, config.width_shift, fill_mode=fill, seed=seed + 3
            )
        )
    if config.shear:
        layers.append(
            keras.layers.RandomShear(config.shear, config.shear, fill_mode=fill, seed=seed + 4)
        )
    if config.zoom:
        layers.append(keras.layers.RandomZoom(config.zoom, fill_mode=fill, seed=seed + 5))
    if config.randaugment:
        layers.append(KeyedRandAugment(value_range=(0, 255), seed=seed + 6))
    if not layers:
        return None
    return keras.Sequential(layers, name="augmentation")


class _KeyedSeeds(SeedGenerator):
    """Seeds for the random draws of one call, all derived from one key, held in no variable.

    Keras' random functions take a `SeedGenerator` and call its `next()` once per draw; these
    come from `stateless_fold_in(key, n)` for the n-th draw, so the draws of a call are
    independent of each other and the same for the same key.
    """

    def __init__(self, key: tf.Tensor):  # no SeedGenerator.__init__: it makes the state variable
        self._key = key
        self._drawn = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._drawn += 1
        return tf.random.experimental.stateless_fold_in(self._key, self._drawn)


_keyed = threading.local()  # the seeds of the RandAugment call being traced, on this thread


class KeyedRandAugment(keras.layers.RandAugment):
    """Keras' RandAugment, drawing from the `seed` given to `get_random_transformation`.

    Keras' own (3.15) ignores that argument and always draws from its generator's state.
    """

    def get_random_transformation(self, data, training=True, seed=None):
        _keyed.seeds = seed
        try:
            return super().get_random_transformation(data, training=training)
        finally:
            _keyed.seeds = None

    def _get_seed_generator(self, backend=None):
        seeds = getattr(_keyed, "seeds", None)
        return seeds if seeds is not None else super()._get_seed_generator(backend)


def augment(augmentation: keras.Sequential, images: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Applies `augmentation` to a batch with every random draw derived from `key`.

    Args:
        augmentation: layers from `build_augmentation`.
        images: float (N, H, W, C) in the 0-255 range.
        key: int32 or int64 (2,) stateless seed; the same key gives the same output.

    Returns:
        The transformed batch, as the layers called with `training=True` would give it.
    """
    seeds = _KeyedSeeds(key)
    for layer in augmentation.layers:
        if not layer.built:
            layer.build(images.shape)
        transformation = layer.get_random_transformation(images, training=True, seed=seeds)
        images = layer.transform_images(images, transformation, training=True)
    return images


def build_mixing(config: AugmentConfig, seed: int = 0) -> Mixing | None:
    """The batch-mixing step `config` asks for (MixUp, CutMix or both), or None.

    Args:
        config: `mixup` (Beta alpha of MixUp) and `cutmix` (Beta alpha of CutMix); 0 is off.
        seed: base seed. Defaults to 0.

    Returns:
        None when both are off; otherwise `mix(images, one_hot_labels, coin)` returning mixed
        images and labels. With both on, each batch gets one of them: MixUp when the int64
        `coin` is even, CutMix when it is odd (the dataset feeds a seeded random stream).
    """
    if not config.enabled or not (config.mixup or config.cutmix):
        return None

    def mixup(images, labels, coin):
        key = tf.stack([tf.cast(coin, tf.int64), tf.constant(seed + 7, tf.int64)])
        return mix_up(images, labels, config.mixup, key)

    def cutmix(images, labels, coin):
        key = tf.stack([tf.cast(coin, tf.int64), tf.constant(seed + 8, tf.int64)])
        return cut_mix(images, labels, config.cutmix, key)

    if not config.cutmix:
        return mixup
    if not config.mixup:
        return cutmix

    def either(images, labels, coin):
        return tf.cond(
            coin % 2 == 0,
            lambda: mixup(images, labels, coin),
            lambda: cutmix(images, labels, coin // 2),
        )

    return either


def _beta(n: tf.Tensor, alpha: float, seeds: tf.Tensor) -> tf.Tensor:
    a = tf.random.stateless_gamma([n], seeds[0], alpha=alpha)
    b = tf.random.stateless_gamma([n], seeds[1], alpha=alpha)
    return a / tf.maximum(a + b, 1e-12)


def mix_up(
    images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp (Zhang et al., 2018) on a batch: each image and label blended with a partner's.

    For each image a weight `lam ~ Beta(alpha, alpha)` is drawn and the image and its label
    become `lam * own + (1 - lam) * partner's`, the partner given by a random permutation.

    Args:
        images: float (N, H, W, C).
        labels: one-hot or soft labels (N, classes).
        alpha: Beta distribution parameter.
        seed: int64 shape (2,) stateless seed.
    """
    n = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    lam = _beta(n, alpha, seeds)
    partner = tf.random.experimental.stateless_shuffle(tf.range(n), seeds[2])
    weight = tf.reshape(tf.cast(lam, images.dtype), [-1, 1, 1, 1])
    mixed = weight * images + (1.0 - weight) * tf.gather(images, partner)
    share = tf.cast(lam, labels.dtype)[:, None]
    return mixed, share * labels + (1.0 - share) * tf.gather(labels, partner)


def cut_mix(
    images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """CutMix (Yun et al., 2019) on a batch, with label shares equal to the pasted pixel shares.

    For each image a share `lam ~ Beta(alpha, alpha)` is drawn; a box of sides
    `round(sqrt(1 - lam) * side)` placed uniformly inside the image is replaced by the same box of
    another image of the batch (a random permutation), and the labels are mixed by the exact
    share of replaced pixels.

    Args:
        images: float (N, H, W, C).
        labels: one-hot or soft labels (N, classes).
        alpha: Beta distribution parameter.
        seed: int64 shape (2,) stateless seed.
    """
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 5)
    cut = tf.sqrt(1.0 - _beta(n, alpha, seeds))

    def box(side, key):
        length = tf.cast(tf.round(cut * tf.cast(side, tf.float32)), tf.int32)
        room = tf.cast(side - length + 1, tf.float32)
        start = tf.cast(tf.random.stateless_uniform([n], key) * room, tf.int32)
        start = tf.minimum(start, side - length)
        index = tf.range(side)[None, :]
        return (index >= start[:, None]) & (index < (start + length)[:, None])

    inside = box(height, seeds[2])[:, :, None] & box(width, seeds[3])[:, None, :]
    partner = tf.random.experimental.stateless_shuffle(tf.range(n), seeds[4])
    mixed = tf.where(inside[..., None], tf.gather(images, partner), images)
    share = tf.reduce_mean(tf.cast(inside, labels.dtype), axis=[1, 2])[:, None]
    return mixed, (1.0 - share) * labels + share * tf.gather(labels, partner)
