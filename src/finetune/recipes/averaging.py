"""Weight averaging over the last epochs of training (`recipe.average_last_epochs`).

`WeightAveraging` keeps a running arithmetic mean of a model's trainable weights, taken at the end
of each of the last N epochs of a `fit`, and sets the model to that mean when the `fit` ends: the
"average the last epochs" form of stochastic weight averaging (Izmailov et al. 2018,
https://arxiv.org/abs/1803.05407), with the recipe's own learning-rate schedule rather than a
cyclic one. The recipe applies it to the final phase (`finetune.recipes.two_phase`), whose
early stopping is then left out: it would restore one epoch's weights over the average, and cut
the window being averaged.

Only trainable weights are averaged. Frozen weights do not change, with one exception:
BatchNorm's moving statistics are non-trainable but change while a BatchNorm layer trains
(`--train-batchnorm`). Statistics gathered under the last epoch's weights do not fit the averaged
weights, so when the averaged model holds trainable BatchNorm layers their statistics are
computed again (`recompute_batchnorm_statistics`): one pass over the training images, without
augmentation, with the averaged weights. With the default recipe BatchNorm stays frozen (inference
mode), its statistics are the pretrained ones, and nothing needs recomputing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np

from finetune.model import sublayers


def trainable_batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The BatchNorm layers of `model` (nested ones too) that train, so update their statistics."""
    return [
        layer
        for layer in sublayers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def recompute_batchnorm_statistics(model: keras.Model, batches: Iterable[Any]) -> int:
    """Sets the moving statistics of the model's trainable BatchNorm layers from `batches`.

    Each layer's moving mean and variance become the plain mean, over the batches, of the batch
    means and variances it sees with the current weights (as PyTorch's `update_bn` does for
    SWA): its momentum is set to `1 - 1/k` for the k-th batch. The model runs in training mode
    (dropout switched off for the pass), so frozen BatchNorm layers, which Keras runs in
    inference mode, are left as they are. Nothing else changes.

    Args:
        model: the model, its weights already final (e.g. averaged).
        batches: image batches, or (images, ...) tuples as a `tf.data` pipeline yields them.

    Returns:
        How many BatchNorm layers were recomputed (0: none trains, nothing was done).
    """
    layers = trainable_batchnorm_layers(model)
    if not layers:
        return 0
    dropouts = [layer for layer in sublayers(model) if isinstance(layer, keras.layers.Dropout)]
    momenta = [layer.momentum for layer in layers]
    rates = [layer.rate for layer in dropouts]
    for layer in layers:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for k, batch in enumerate(batches, 1):
            images = batch[0] if isinstance(batch, tuple | list) else batch
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / k
            model(images, training=True)  # eager: each layer reads its momentum on this call
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates, strict=True):
            layer.rate = rate
    return len(layers)


class WeightAveraging(keras.callbacks.Callback):
    """Sets the model to the mean of its trainable weights over the last epochs of a `fit`.

    The window is the last `last_epochs` epochs the `fit` is set to run (`epochs` of `fit`),
    all of them when it runs fewer. If the `fit` stops before the window (an early-stopping
    callback), the weights are left alone. When the `fit` ends, the trainable weights become the
    running mean, and trainable BatchNorm layers get their statistics recomputed from
    `batchnorm_batches` (see `recompute_batchnorm_statistics`).

    Args:
        last_epochs: how many final epochs to average (1 keeps the last epoch's weights).
        records: history records (one dict per epoch, as `PhaseLogger` appends them); the
            record of each averaged epoch gets `"averaged": True`, and the last one
            `"batchnorm_recomputed"` when statistics were recomputed. Defaults to None.
        batchnorm_batches: returns the (unaugmented) training batches for recomputing
            BatchNorm statistics; needed only when BatchNorm trains. Defaults to None.

    Attributes:
        averaged_epochs: the (1-based) epochs in the mean.
        batchnorm_recomputed: BatchNorm layers whose statistics were recomputed.

    Raises:
        ValueError: `last_epochs` below 1; or, when the `fit` ends, trainable BatchNorm layers
            and no `batchnorm_batches` to recompute them from.
    """

    def __init__(
        self,
        last_epochs: int,
        records: list[dict[str, Any]] | None = None,
        batchnorm_batches: Callable[[], Iterable[Any]] | None = None,
    ):
        super().__init__()
        if last_epochs < 1:
            raise ValueError(f"last_epochs must be 1 or more, got {last_epochs}.")
        self.last_epochs = last_epochs
        self.records = records
        self.batchnorm_batches = batchnorm_batches
        self.averaged_epochs: list[int] = []
        self.batchnorm_recomputed = 0
        self._mean: list[np.ndarray] | None = None

    def on_train_begin(self, logs=None):
        self.averaged_epochs = []
        self.batchnorm_recomputed = 0
        self._mean = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.params["epochs"] - self.last_epochs:
            return
        weights = [np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in self._weights()]
        if self._mean is None:
            self._mean = weights
        else:
            n = len(self.averaged_epochs) + 1
            for mean, w in zip(self._mean, weights, strict=True):
                mean += (w - mean) / n
        self.averaged_epochs.append(epoch + 1)
        if self.records and self.records[-1].get("epoch") == epoch + 1:
            self.records[-1]["averaged"] = True

    def on_train_end(self, logs=None):
        if self._mean is None:
            return
        for variable, mean in zip(self._weights(), self._mean, strict=True):
            variable.assign(mean.astype(variable.dtype))
        if trainable_batchnorm_layers(self.model):
            if self.batchnorm_batches is None:
                raise ValueError(
                    "the averaged model trains BatchNorm layers, whose statistics must be "
                    "recomputed for the averaged weights: give batchnorm_batches."
                )
            self.batchnorm_recomputed = recompute_batchnorm_statistics(
                self.model, self.batchnorm_batches()
            )
            if self.records and self.records[-1].get("averaged"):
                self.records[-1]["batchnorm_recomputed"] = self.batchnorm_recomputed
        self._mean = None

    def _weights(self) -> list[keras.Variable]:
        return list(self.model.trainable_weights)


def averaging_record(records: list[dict[str, Any]], last_epochs: int) -> dict[str, Any]:
    """What `run.json` says about weight averaging, from the history records it marked."""
    averaged = [r for r in records if r.get("averaged")]
    record: dict[str, Any] = {
        "last_epochs": last_epochs,
        "averaged_epochs": [r["epoch"] for r in averaged],
        "phase": averaged[-1]["phase"] if averaged else None,
    }
    if not averaged:
        record["note"] = "not applied: the final phase did not run"
        return record
    recomputed = averaged[-1].get("batchnorm_recomputed", 0)
    record["batchnorm"] = (
        f"statistics of {recomputed} trainable BatchNorm layers recomputed on the training "
        "images for the averaged weights"
        if recomputed
        else "no BatchNorm layer trained: the pretrained statistics fit the averaged weights"
    )
    return record
