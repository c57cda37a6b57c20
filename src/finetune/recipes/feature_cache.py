"""The frozen-phase fast path: run the frozen backbone once, then train the head on its features.

While the whole backbone is frozen and the training images are not augmented, every epoch feeds
the same images through the same frozen layers and gets the same features. Computing them once
and training only the head (pooling output -> hidden layers -> dropout -> logits) on them gives
the head the same inputs, the same shuffling order, the same dropout masks and therefore the
same weights as training through the frozen backbone, at the cost of one inference pass instead
of one forward pass per epoch (tests/test_feature_cache.py checks the equality;
benchmarks/feature_cache.py measures the speed-up). One exception: a backbone with dropout
inside it (Keras' EfficientNetB0 has drop-connect in its blocks) keeps that dropout active in
`fit` even when frozen, while the cached features are computed without it; the head then
trains on clean features instead of noisy ones, and is not the same as without the cache.
Another: where `finetune.inference`'s "auto" computes the features in bfloat16 (from 2,000
images on a CPU with it), the head trains on features within a few percent of these, and ends
near the same weights, not at them.

The same holds below the trained groups of a partly unfrozen backbone (`cut_layer`,
`split_at_cut`): nothing there trains, so without augmentation their output is the same every
epoch, and the top groups and the head can train on it computed once (the same weights as
through the whole network, up to float rounding; tests/test_feature_cache.py). Augmented, it
can be streamed instead, as the frozen backbone's features are (`streamed_features`).

The head (or top) model built here shares its layers with the classifier, so training it trains
the classifier in place. Once the features held in memory would exceed a configurable size,
further ones are written to a memory-mapped file in a temporary folder (under `TMPDIR`, or a
folder given) instead.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from finetune.backbones.registry import BackboneSpec
from finetune.data.pipeline import epoch_batches, index_batches, rows_reader
from finetune.inference import keras_forward
from finetune.model import BACKBONE_LAYER, backbone_of

POOL_LAYER = "pool"


def split_at_pool(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a classifier made by `build_classifier` at its pooling layer.

    Returns:
        (feature extractor: pixels -> pooled features, head: pooled features -> logits). The
        head reuses the classifier's own layers (shared weights), so fitting it trains them.
    """
    names = [layer.name for layer in model.layers]
    if POOL_LAYER not in names:
        raise ValueError(f"{model.name} has no '{POOL_LAYER}' layer; it was not built here.")
    pool = model.get_layer(POOL_LAYER)
    extractor = keras.Model(model.inputs, pool.output, name="features")
    features = keras.Input(shape=pool.output.shape[1:], name="features")
    x = features
    for layer in model.layers[names.index(POOL_LAYER) + 1 :]:
        x = layer(x)
    return extractor, keras.Model(features, x, name="head")


def cut_layer(
    model: keras.Model,
    spec: BackboneSpec,
    trained_groups: list[str],
    max_bytes: int | None = None,
) -> str | None:
    """The backbone layer below which nothing trains, when the backbone can be cut after it.

    Args:
        model: a classifier made by `build_classifier`.
        spec: its backbone's registry entry (which defines the groups).
        trained_groups: the groups that train (`unfreeze_top_groups`' answer).
        max_bytes: the most bytes per image the layer's output may take as float32, or None.
            Defaults to None. (A cut low in the network saves little computation and its
            output is large: several times the image after EfficientNet's stem.)

    Returns:
        The name of the last backbone layer before the first layer of `trained_groups`, or
        None when there is nothing below them, a layer of another group comes after it, its
        output is larger than `max_bytes`, or more than its output crosses from below to
        above (a skip connection over the cut).
    """
    backbone = backbone_of(model)
    layers = backbone.layers
    chosen = set(trained_groups)
    first = next((i for i, layer in enumerate(layers) if spec.group_of(layer.name) in chosen), None)
    if first is None or first < 2:  # nothing to cut off above the input layer
        return None
    if any(spec.group_of(layer.name) not in chosen for layer in layers[first:]):
        return None
    cut = layers[first - 1].output
    if max_bytes is not None and 4 * int(np.prod(cut.shape[1:])) > max_bytes:
        return None
    try:
        keras.Model(cut, backbone.outputs)
    except ValueError:  # "graph disconnected": the top needs a tensor from below the cut
        return None
    return layers[first - 1].name


def split_at_cut(model: keras.Model, layer_name: str) -> tuple[keras.Model, keras.Model]:
    """Splits a classifier made by `build_classifier` after backbone layer `layer_name`.

    The generalisation of `split_at_pool` to a partly trained backbone (see `cut_layer`).

    Returns:
        (lower part: pixels -> that layer's output, top: that output flattened -> logits). The
        top reuses the classifier's own layers (shared weights), so fitting it trains them.
    """
    backbone = backbone_of(model)
    cut = backbone.get_layer(layer_name).output
    upper = keras.Model(cut, backbone.output, name="backbone_top")
    names = [layer.name for layer in model.layers]
    at = names.index(BACKBONE_LAYER)
    x = model.inputs[0]
    for layer in model.layers[1:at]:  # the classifier's own preprocessing, e.g. normalize
        x = layer(x)
    lower = keras.Model(
        model.inputs, keras.Model(backbone.inputs, cut, name="backbone_bottom")(x), name="features"
    )
    width = int(np.prod(cut.shape[1:]))
    features = keras.Input(shape=(width,), name="features")
    x = upper(keras.layers.Reshape(tuple(cut.shape[1:]), name="unflatten")(features))
    for layer in model.layers[at + 1 :]:
        x = layer(x)
    return lower, keras.Model(features, x, name="top")


_RANDOM_LAYERS = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D too
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


def has_random_layers(model: keras.Model) -> bool:
    """Whether `model` (nested models included) has a layer that is random while training.

    Such a layer stays active in `fit` even when frozen, so features computed in inference
    mode are not what training through it would see.
    """
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, _RANDOM_LAYERS):
            return True
        stack.extend(getattr(layer, "layers", None) or [])
    return False


def streamed_features(
    dataset: tf.data.Dataset, forward: Callable[[np.ndarray], np.ndarray], width: int
) -> tf.data.Dataset:
    """`dataset`'s (images, labels) batches as (features, labels), computed by `forward`.

    For a frozen backbone (or the frozen groups below a cut) under augmentation: every epoch's
    images differ, so nothing can be cached, but the frozen part's forward pass can run in a
    faster inference runtime than the training step (`finetune.inference`) while what is above
    it trains on its output, flattened to `width` values an image. The order, the augmentation
    and the labels are `dataset`'s own.
    """

    def features(images: np.ndarray) -> np.ndarray:
        return np.asarray(forward(images), np.float32).reshape(len(images), width)

    def to_features(images, labels):
        x = tf.numpy_function(features, [images], tf.float32, stateful=False)
        x.set_shape((None, width))
        return x, labels

    return dataset.map(to_features).prefetch(tf.data.AUTOTUNE)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@dataclass
class FeatureStore:
    """Backbone features of one set of images, in memory or memory-mapped on disk.

    Args:
        max_memory_bytes: the most all feature arrays of this store may take in memory; one that
            would go over goes to disk. Defaults to 2 GiB.
        spill_dir: where the on-disk features go (a temporary folder is made in it). Defaults
            to None (the system's temporary folder, `TMPDIR`).
    """

    max_memory_bytes: int = 2 * 1024**3
    spill_dir: Path | None = None
    _tmp: Path | None = field(default=None, repr=False)
    _in_memory: int = field(default=0, repr=False)

    def compute(
        self,
        extractor: keras.Model,
        images: np.ndarray,
        batch_size: int,
        name: str,
        forward: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Features of `images` (uint8 pixels) in order, as float32 (N, features).

        `forward` computes a float32 batch's features instead of `extractor` (for example in
        ONNX Runtime, see `finetune.inference`); it must compute the same function.
        """
        if forward is None:
            forward = keras_forward(extractor)
        width = int(np.prod(extractor.output.shape[1:]))
        shape = (len(images), width)
        nbytes = shape[0] * shape[1] * 4
        if self._in_memory + nbytes > self.max_memory_bytes:
            if self._tmp is None:
                if self.spill_dir is not None:
                    Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
                self._tmp = Path(tempfile.mkdtemp(prefix="finetune-features-", dir=self.spill_dir))
            out = np.lib.format.open_memmap(
                self._tmp / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape
            )
        else:
            out = np.empty(shape, np.float32)
            self._in_memory += nbytes
        for rows in _batches(len(images), batch_size):
            batch = images[rows].astype(np.float32)
            out[rows] = forward(batch).reshape(len(batch), width)
        if isinstance(out, np.memmap):
            out.flush()
        return out

    def close(self) -> None:
        """Deletes the on-disk features, if any, and forgets the in-memory ones."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._in_memory = 0


def feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    batch_size: int,
    training: bool = False,
    seed: int = 0,
    first_epoch: int | None = None,
) -> tf.data.Dataset:
    """Batches of (features, one-hot labels), ordered exactly as `image_dataset` orders images.

    With `training` and `first_epoch`, the batches of epochs `first_epoch`, `first_epoch + 1`,
    ... without end, in the order of `epoch_permutation` (`epoch_batches`, as
    `finetune.data.pipeline.image_dataset` with the same `first_epoch`), so epoch k visits the
    samples in the same order; `fit` it with `steps_per_epoch`. Otherwise one epoch per
    iteration, shuffled by tf.data when `training`.
    Memory-mapped features are read batch by batch instead of being copied into the graph.
    """
    # In memory: gathered from a tensor (2-3x as many batches a second as reading rows through
    # Python, and a head's features are small); memory-mapped: read from the file batch by batch.
    read = rows_reader(features if isinstance(features, np.memmap) else tf.constant(features))
    classes = tf.constant(np.asarray(labels))

    def batch(index, *_):
        return read(index), tf.one_hot(tf.gather(classes, index), num_classes)

    if training and first_epoch is not None:
        ds = epoch_batches(len(labels), batch_size, seed, first_epoch)
    elif training:
        ds = tf.data.Dataset.range(len(labels))
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    else:
        ds = index_batches(len(labels), batch_size)
    ds = ds.map(batch)
    return ds.prefetch(tf.data.AUTOTUNE)
