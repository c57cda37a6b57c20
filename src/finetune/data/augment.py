"""Training augmentation as a stack of Keras preprocessing layers, built from `AugmentConfig`.

The stack runs in the tf.data pipeline on uint8-range float images, only for the training split,
so saved and exported models carry no augmentation. Every seed document's settings map onto it:
`rotation` is in degrees (Keras' `RandomRotation` takes a fraction of a full turn, 0.1 = 36
degrees), shifts and zoom are fractions of the size, `fill_mode` as in Keras.
"""

from __future__ import annotations

import keras

from finetune.config import AugmentConfig


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
        layers.append(keras.layers.RandAugment(value_range=(0, 255), seed=seed + 6))
    if not layers:
        return None
    return keras.Sequential(layers, name="augmentation")
