"""BatchNorm layers set as a trained network has them, for speed benchmarks on random weights.

A freshly built BatchNorm layer has moving mean 0, variance 1, gamma 1 and beta 0. Folded into
its convolution (`finetune.fold`), such a pair has a bias of exactly zero, which TensorFlow
drops from a view whose weights are compiled in (`snapshot=True`), and then it cannot fuse the
activation after it into the convolution either. In a throwaway probe at 128 px, the
compiled-in view ran at 0.91x the view reading its weights with zero biases, and at 1.16x
with these.
Benchmarks that build with `weights=None` call `set_trained_like_batchnorm` first.
"""

from __future__ import annotations

import numpy as np


def set_trained_like_batchnorm(model, seed: int = 0) -> None:
    """Random moving statistics, scales and offsets in every BatchNorm layer of `model`."""
    import keras

    from finetune.model import sublayers

    rng = np.random.default_rng(seed)
    for layer in sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n).astype("float32"))
