"""Grad-CAM heat maps: which part of an image a fine-tuned classifier looked at for a class.

Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) weighs each channel of the
backbone's last feature map by the spatial mean of the gradient of a class logit with respect to
it, sums the weighted channels, keeps the positive part and upsamples the result to the image.
Here the last feature map is the input of the classifier's "pool" layer (see
`finetune.model.build_classifier`), so the maps come from the fine-tuned model itself, whether
it was just trained or loaded back from a run's `model.keras`. The classifier is split at that
layer into a feature extractor and a head: the extractor runs compiled and without recording
gradients (the backbone's operations need not be kept for a backward pass that stops at its
output), and only the small head runs under `tf.GradientTape`, which watches the feature map
explicitly.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import keras
import matplotlib
import numpy as np
import tensorflow as tf

from finetune.inference import keras_forward

POOL_LAYER = "pool"

# The split of each model seen, kept while the model lives: the extractor's function is
# traced once per model instead of once per call (a report page calls grad_cam many times on
# one model, and TensorFlow warns about functions retraced that often). It is its own
# function (`keras_forward`), not Keras' predict_on_batch, whose traces TensorFlow counts
# together for all models: reports of many runs in one process warned too.
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _split_at_feature_map(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(pixels -> last feature map, last feature map -> logits), sharing the model's layers."""
    if model in _SPLITS:
        return _SPLITS[model]
    if POOL_LAYER not in [layer.name for layer in model.layers]:
        raise ValueError(
            f"model {model.name!r} has no layer named '{POOL_LAYER}', so Grad-CAM cannot find its "
            "last feature map. Use a classifier made by finetune.model.build_classifier (or a "
            "model.keras saved from one)."
        )
    feature_map = model.get_layer(POOL_LAYER).input
    if len(feature_map.shape) != 4:
        raise ValueError(
            f"the '{POOL_LAYER}' layer of model {model.name!r} takes a tensor of shape "
            f"{tuple(feature_map.shape)}, not a (batch, height, width, channels) feature map."
        )
    extractor = keras.Model(model.inputs, feature_map, name=f"{model.name}_feature_map")
    # Keras clones the graph between an intermediate tensor and the outputs, reusing the layers,
    # so the head is the model's own head (hidden layers, dropout, logits) whatever its shape.
    head = keras.Model(feature_map, model.outputs[0], name=f"{model.name}_head")
    _SPLITS[model] = (extractor, head)
    return extractor, head


def _check_images(model: keras.Model, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be a (N, height, width, 3) array of RGB pixels; got shape "
            f"{images.shape}. For one image, pass image[None]."
        )
    expected = tuple(model.inputs[0].shape[1:3])
    if None not in expected and images.shape[1:3] != expected:
        raise ValueError(
            f"model {model.name!r} takes {expected[0]}x{expected[1]} images, but the images are "
            f"{images.shape[1]}x{images.shape[2]}; resize them to the model's size first."
        )
    return images


def _check_class_indices(class_indices, count: int, num_classes: int) -> np.ndarray:
    indices = np.asarray(class_indices)
    if indices.shape != (count,) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"class_indices must hold one integer class index per image ({count}); got "
            f"{indices.dtype} values of shape {indices.shape}."
        )
    if count and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(
            f"class_indices must lie in [0, {num_classes - 1}] for a {num_classes}-class model; "
            f"got values from {indices.min()} to {indices.max()}."
        )
    return indices.astype(np.int32)


def grad_cam(
    model: keras.Model,
    images: np.ndarray,
    class_indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM heat maps of `model` for one class per image.

    For each image: the gradient of the chosen class's logit with respect to the last feature
    map (the input of the "pool" layer), averaged over space, gives one weight per channel; the
    ReLU of the channel-weighted sum of the feature map is upsampled bilinearly to the image
    size and scaled so that its maximum is 1 (a map that is zero everywhere stays zero). The
    model runs in inference mode (`training=False`: dropout off, BatchNorm on its statistics).

    Args:
        model: a classifier made by `finetune.model.build_classifier`, or loaded back from a
            saved `model.keras` of one: RGB pixels in [0, 255] -> logits, with a layer "pool".
        images: (N, H, W, 3) RGB pixels in [0, 255] at the model's input size.
        class_indices: the class to explain for each image, N integers. Defaults to None (each
            image's predicted class).
        batch_size: images per forward and backward pass. Defaults to 16.

    Returns:
        float32 array (N, H, W) of heat maps in [0, 1], at the images' size.

    Raises:
        ValueError: the model has no "pool" layer (the message names the model), the images
            are not (N, H, W, 3) at the model's input size, class_indices does not hold one
            valid class per image, or batch_size is below 1.

    Example:
        >>> maps = grad_cam(run.model, images)              # the predicted classes
        >>> maps = grad_cam(run.model, images, [2] * len(images))  # why (not) class 2
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    # The backbone traced and in inference mode (training=False), about twice as fast as an
    # eager call; no gradient flows through it.
    extractor, head = _split_at_feature_map(model)
    backbone = keras_forward(extractor)  # traced once per extractor
    images = _check_images(model, images)
    count, height, width = images.shape[:3]
    num_classes = int(head.outputs[0].shape[-1])
    if class_indices is not None:
        class_indices = _check_class_indices(class_indices, count, num_classes)

    maps = np.zeros((count, height, width), np.float32)
    for start in range(0, count, batch_size):
        stop = min(count, start + batch_size)
        batch = images[start:stop].astype(np.float32)
        features = tf.convert_to_tensor(backbone(batch))
        with tf.GradientTape() as tape:
            tape.watch(features)
            logits = tf.cast(head(features, training=False), tf.float32)
            if class_indices is None:
                chosen = tf.argmax(logits, axis=-1, output_type=tf.int32)
            else:
                chosen = tf.constant(class_indices[start:stop])
            target = tf.gather(logits, chosen[:, None], batch_dims=1)
        # In inference mode each image's logits depend on its own features only, so the
        # gradient of the batch's summed targets holds each image's own gradient.
        grads = tf.cast(tape.gradient(target, features), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))
        cam = tf.image.resize(cam[..., None], (height, width), method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        scaled = tf.math.divide_no_nan(cam, peak)
        maps[start:stop] = np.clip(keras.ops.convert_to_numpy(scaled), 0.0, 1.0)
    return maps


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends an image with the 'jet' colour map of a heat map, for display.

    Args:
        image: (H, W, 3) RGB or (H, W) grey pixels in [0, 255].
        heatmap: (H, W) values in [0, 1], e.g. one map from `grad_cam`.
        alpha: weight of the colour map; 0 gives the image, 1 the colour map alone.
            Defaults to 0.45.

    Returns:
        uint8 array (H, W, 3): `(1 - alpha) * image + alpha * jet(heatmap)`.

    Raises:
        ValueError: the shapes do not match or alpha is outside [0, 1].

    Example:
        >>> picture = overlay(images[0], grad_cam(model, images[:1])[0])
    """
    image = np.asarray(image, dtype=np.float32)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grey; got shape {image.shape}.")
    if heatmap.shape != image.shape[:2]:
        raise ValueError(
            f"heatmap shape {heatmap.shape} does not match the image's {image.shape[:2]}."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}.")
    colours = matplotlib.colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * np.clip(image, 0.0, 255.0) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
