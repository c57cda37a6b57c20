"""Training augmentation as a stack of layers, built from `AugmentConfig`.

The stack runs in the tf.data pipeline on uint8-range float images, only for the training split,
so saved and exported models carry no augmentation. Every seed document's settings map onto it:
`rotation` is in degrees (Keras' `RandomRotation` takes a fraction of a full turn, 0.1 = 36
degrees), shifts and zoom are fractions of the size, `fill_mode` as in Keras. The geometric
transformations are one layer, `RandomGeometry`, which composes them and resamples each image
once; RandAugment's colour and geometry operations are Keras' own.

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

import math
import threading
from collections.abc import Callable

import keras
import tensorflow as tf

from finetune.config import AugmentConfig

Mixing = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def build_augmentation(config: AugmentConfig, seed: int = 0) -> keras.Sequential | None:
    """Returns the augmentation layers for `config`, or None when nothing would change an image.

    Args:
        config: which transformations and how strong.
        seed: base seed; each layer gets its own derived seed. Defaults to 0.

    Returns:
        A `keras.Sequential` (a `RandomGeometry`, then RandAugment if asked) to call with
        `training=True` on batches, or to run keyed with `augment`; or None.
    """
    if not config.enabled:
        return None
    layers: list[keras.layers.Layer] = []
    geometry = RandomGeometry(
        horizontal_flip=config.horizontal_flip,
        vertical_flip=config.vertical_flip,
        rotation=config.rotation,
        width_shift=config.width_shift,
        height_shift=config.height_shift,
        zoom=config.zoom,
        shear=config.shear,
        fill_mode=config.fill_mode,
        seed=seed + 1,
    )
    if geometry.changes_images:
        layers.append(geometry)
    if config.randaugment:
        layers.append(KeyedRandAugment(value_range=(0, 255), seed=seed + 6))
    if not layers:
        return None
    return keras.Sequential(layers, name="augmentation")


class RandomGeometry(keras.layers.Layer):
    """Random flips, rotation, shifts, zoom and shear of each image, resampled once.

    Keras' RandomFlip, RandomRotation, RandomTranslation, RandomZoom and RandomShear each
    resample the whole image in turn. Here each image's transformations are drawn with the same
    meaning (uniform within the bounds, either way) and composed into one affine map about the
    image's centre, resampled once (bilinear): about 3x less work for the default preset
    (benchmarks/augment_pipeline.py), one interpolation instead of up to four, and borders
    filled from the original image. A flip alone moves pixels exactly.

    Args:
        horizontal_flip: mirror left-right with probability 1/2. Defaults to False.
        vertical_flip: mirror up-down with probability 1/2. Defaults to False.
        rotation: maximum rotation in degrees, either way. Defaults to 0.
        width_shift: maximum horizontal shift, a fraction of the width. Defaults to 0.
        height_shift: maximum vertical shift, a fraction of the height. Defaults to 0.
        zoom: maximum zoom in or out, a fraction (0.1: the image shows 90-110% of the
            original's side). Defaults to 0.
        shear: maximum shear along each axis, as a slope, about the centre (Keras'
            RandomShear pivots on the top-left corner and gives both axes one sign).
            Defaults to 0.
        fill_mode: "reflect", "wrap", "constant" (zeros) or "nearest". Defaults to "reflect".
        seed: seed of the generator `call` draws from (`transform` takes a key instead).
    """

    def __init__(
        self,
        horizontal_flip: bool = False,
        vertical_flip: bool = False,
        rotation: float = 0.0,
        width_shift: float = 0.0,
        height_shift: float = 0.0,
        zoom: float = 0.0,
        shear: float = 0.0,
        fill_mode: str = "reflect",
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.pop("dtype", None)  # always float32 pixels, whatever the global policy
        super().__init__(dtype="float32", **kwargs)
        self.horizontal_flip = horizontal_flip
        self.vertical_flip = vertical_flip
        self.rotation = rotation
        self.width_shift = width_shift
        self.height_shift = height_shift
        self.zoom = zoom
        self.shear = shear
        self.fill_mode = fill_mode
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def changes_images(self) -> bool:
        """Whether any transformation is on."""
        bounds = (self.rotation, self.width_shift, self.height_shift, self.zoom, self.shear)
        return self.horizontal_flip or self.vertical_flip or any(b != 0 for b in bounds)

    def call(self, images, training=True):
        if not training:
            return images
        return self.transform(images, self.seed_generator.next())

    def transform(self, images: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
        """The batch `images` (N, H, W, C) transformed with draws from the stateless `key`."""
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        n, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        keys = tf.random.experimental.stateless_split(key, 7)

        def uniform(index: int, bound: float) -> tf.Tensor:
            return tf.random.stateless_uniform([n], keys[index], -bound, bound)

        angle = uniform(0, self.rotation * math.pi / 180.0)
        scale = 1.0 + uniform(1, self.zoom)
        shear_x, shear_y = uniform(2, self.shear), uniform(3, self.shear)
        shift_x = uniform(4, self.width_shift) * width
        shift_y = uniform(5, self.height_shift) * height
        coins = tf.random.stateless_uniform([n, 2], keys[6]) < 0.5
        flip_x = tf.where(coins[:, 0], -1.0, 1.0) if self.horizontal_flip else tf.ones([n])
        flip_y = tf.where(coins[:, 1], -1.0, 1.0) if self.vertical_flip else tf.ones([n])
        cos, sin = tf.cos(angle), tf.sin(angle)
        # Output pixel p samples the input at centre + A (p - centre) + shift, with
        # A = flips . rotation . shear . zoom.
        a00 = flip_x * scale * (cos - sin * shear_y)
        a01 = flip_x * scale * (cos * shear_x - sin)
        a10 = flip_y * scale * (sin + cos * shear_y)
        a11 = flip_y * scale * (sin * shear_x + cos)
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        b0 = cx + shift_x - (a00 * cx + a01 * cy)
        b1 = cy + shift_y - (a10 * cx + a11 * cy)
        zeros = tf.zeros([n])
        matrices = tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)
        return keras.ops.image.affine_transform(
            images, matrices, interpolation="bilinear", fill_mode=self.fill_mode
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config() | {
            "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip,
            "rotation": self.rotation,
            "width_shift": self.width_shift,
            "height_shift": self.height_shift,
            "zoom": self.zoom,
            "shear": self.shear,
            "fill_mode": self.fill_mode,
            "seed": self.seed,
        }


class _KeyedSeeds(keras.random.SeedGenerator):
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
        The batch transformed by the layers in turn, each drawing from `key` instead of its
        own seed generator.
    """
    seeds = _KeyedSeeds(key)
    for layer in augmentation.layers:
        if isinstance(layer, RandomGeometry):
            images = layer.transform(images, seeds.next())
            continue
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
