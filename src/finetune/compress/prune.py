"""Magnitude pruning of a Keras 3 classifier: Conv2D, DepthwiseConv2D and Dense kernels.

The TensorFlow Model Optimization Toolkit does not accept Keras 3 models, so this is the Keras 3
path. Each pruned layer gets a mask; `MagnitudePruning`, a callback of an ordinary `fit`, raises
the share of zeros in every mask from 0 to the target on a polynomial schedule (Zhu & Gupta,
"To prune, or not to prune", 2017: `s_t = s_f * (1 - (1 - t / T) ** power)`), each update zeroing
the smallest-magnitude weights of the layer. The mask is applied twice per step so the zeros stay
zeros: to the kernel when it changes, and as the kernel variable's constraint, which Keras'
optimizer applies right after every update inside the compiled train step. At the end the masks
are removed (`strip`), leaving a plain Keras model whose pruned weights are exact zeros: it
saves, loads in safe mode and exports like any other, and compresses (gzip, or the zeros of an
int8 LiteRT file) by the share of zeros.

Sparsity is per layer (each pruned layer reaches the target), not global.
"""

from __future__ import annotations

import fnmatch
import gzip
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from finetune.backbones.registry import BackboneSpec
from finetune.config import PruneConfig, RecipeConfig
from finetune.data.pipeline import with_class_weights
from finetune.errors import ConfigError
from finetune.model import unfreeze_top_groups
from finetune.recipes.averaging import recompute_batchnorm_statistics
from finetune.recipes.optimizers import make_optimizer
from finetune.recipes.schedules import phase_learning_rate, schedule_callbacks
from finetune.recipes.two_phase import PhaseData, PhaseLogger, compile_phase

PRUNABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def polynomial_sparsity(
    step: int, target: float, ramp_steps: int, power: float = 3.0, initial: float = 0.0
) -> float:
    """The share of zeros at `step` of a ramp from `initial` to `target` over `ramp_steps`.

    Example:
        >>> polynomial_sparsity(0, 0.5, 100), polynomial_sparsity(100, 0.5, 100)
        (0.0, 0.5)
    """
    progress = min(max(step / max(ramp_steps, 1), 0.0), 1.0)
    return target + (initial - target) * (1.0 - progress) ** power


def _walk(layer: keras.layers.Layer, prefix: str = ""):
    """Every layer inside `layer` (nested models included), with a slash-separated path."""
    for child in getattr(layer, "layers", []):
        path = f"{prefix}{child.name}"
        yield path, child
        yield from _walk(child, path + "/")


@dataclass
class LayerChoice:
    """Which layers a pruning run sets to zero, and which it leaves dense and why."""

    pruned: dict[str, keras.layers.Layer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def choose_layers(model: keras.Model, config: PruneConfig) -> LayerChoice:
    """The Conv2D, DepthwiseConv2D and Dense layers of `model` that `config` prunes.

    A layer is left dense when its name (or path, e.g. "backbone/stem_conv") matches one of
    `config.exclude`, its kernel has fewer than `config.min_weights` weights, or it is a
    DepthwiseConv2D and `config.depthwise` is off.
    """
    choice = LayerChoice()
    for path, layer in _walk(model):
        if not isinstance(layer, PRUNABLE) or getattr(layer, "kernel", None) is None:
            continue
        size = int(np.prod(layer.kernel.shape))
        if any(fnmatch.fnmatchcase(n, p) for p in config.exclude for n in (layer.name, path)):
            choice.skipped[path] = "excluded"
        elif isinstance(layer, keras.layers.DepthwiseConv2D) and not config.depthwise:
            choice.skipped[path] = "depthwise (prune.depthwise = false)"
        elif size < config.min_weights:
            choice.skipped[path] = f"{size} weights < min_weights {config.min_weights}"
        else:
            choice.pruned[path] = layer
    return choice


class _Mask(keras.constraints.Constraint):
    """Multiplies a kernel by its mask after each optimizer update (then any old constraint)."""

    def __init__(self, mask: keras.Variable, inner: Any = None):
        self.mask, self.inner = mask, inner

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        return w * keras.ops.cast(self.mask, w.dtype)


class MagnitudePruning(keras.callbacks.Callback):
    """Prunes `layers` of the model being fitted to `sparsity` on a polynomial schedule.

    Args:
        layers: the layers to prune (see `choose_layers`), by path.
        sparsity: the target share of zeros in each layer.
        ramp_steps: training steps over which sparsity rises from 0 to the target; later
            steps keep the target.
        frequency: steps between two mask updates (the last ramp step always updates).
            Defaults to one tenth of the ramp.
        power: exponent of the schedule. Defaults to 3.

    Install it before `compile` (the masks become the kernels' constraints, which the compiled
    train step applies); `strip()` when done. Until then `masks` hold the current masks.
    """

    def __init__(
        self,
        layers: dict[str, keras.layers.Layer],
        sparsity: float,
        ramp_steps: int,
        frequency: int = 0,
        power: float = 3.0,
    ):
        super().__init__()
        self.layers = dict(layers)
        self.sparsity = float(sparsity)
        self.ramp_steps = max(int(ramp_steps), 1)
        self.frequency = frequency if frequency > 0 else max(self.ramp_steps // 10, 1)
        self.power = power
        self.step = 0
        self.current = 0.0
        self.masks: dict[str, keras.Variable] = {}
        self._old_constraints: dict[str, Any] = {}

    def install(self) -> None:
        """Gives every pruned kernel an all-ones mask as its constraint."""
        for path, layer in self.layers.items():
            if path in self.masks:
                continue
            kernel = layer.kernel
            mask = keras.Variable(
                np.ones(kernel.shape, np.float32), trainable=False, name="prune_mask"
            )
            self.masks[path] = mask
            self._old_constraints[path] = kernel.constraint
            kernel.constraint = _Mask(mask, kernel.constraint)

    def set_sparsity(self, sparsity: float) -> None:
        """Zeros the `sparsity` share of smallest-magnitude weights of each layer, and keeps them.

        Weights already pruned are zeros, so they are among the smallest and stay pruned as
        the share rises.
        """
        self.install()
        for path, layer in self.layers.items():
            w = np.asarray(keras.ops.convert_to_numpy(layer.kernel.value))
            k = int(round(sparsity * w.size))
            mask = np.ones(w.size, np.float32)
            if k > 0:
                mask[np.argpartition(np.abs(w).ravel(), k - 1)[:k]] = 0.0
            mask = mask.reshape(w.shape)
            self.masks[path].assign(mask)
            layer.kernel.assign((w * mask).astype(w.dtype))
        self.current = sparsity

    def on_train_begin(self, logs=None):
        self.install()

    def on_train_batch_begin(self, batch, logs=None):
        if self.step <= self.ramp_steps and (
            self.step % self.frequency == 0 or self.step == self.ramp_steps
        ):
            target = polynomial_sparsity(self.step, self.sparsity, self.ramp_steps, self.power)
            if target > self.current:
                self.set_sparsity(target)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:  # the same dict the history logger records next
            logs["sparsity"] = self.current

    def on_train_end(self, logs=None):
        # A phase cut short (or shorter than its ramp) still ends at the target.
        if self.current < self.sparsity:
            self.set_sparsity(self.sparsity)

    def strip(self) -> None:
        """Removes the masks: the kernels keep their zeros and their old constraints."""
        for path, layer in self.layers.items():
            if path in self.masks:
                mask = np.asarray(keras.ops.convert_to_numpy(self.masks[path].value))
                layer.kernel.assign(keras.ops.convert_to_numpy(layer.kernel.value) * mask)
                layer.kernel.constraint = self._old_constraints.pop(path)
        self.masks.clear()


def kernel_sparsity(layer: keras.layers.Layer) -> float:
    """The share of exact zeros in a layer's kernel."""
    w = keras.ops.convert_to_numpy(layer.kernel.value)
    return float(np.mean(w == 0))


def gzipped_weights_size(model: keras.Model) -> int:
    """Bytes of the model's weights (float32, as stored) after gzip: what pruning saves.

    Only the model's own weights count (not an optimizer's state), so the figure compares
    models, whatever file format later holds them.
    """
    stream = gzip.compress(
        b"".join(
            np.ascontiguousarray(keras.ops.convert_to_numpy(w.value)).tobytes()
            for w in model.weights
        ),
        compresslevel=6,
    )
    return len(stream)


def sparsity_record(choice: LayerChoice) -> dict[str, Any]:
    """Per-layer sparsity of the pruned layers, the skipped ones, and the overall share."""
    pruned = {path: kernel_sparsity(layer) for path, layer in choice.pruned.items()}
    sizes = {path: int(np.prod(layer.kernel.shape)) for path, layer in choice.pruned.items()}
    total = sum(sizes.values())
    zeros = sum(pruned[p] * sizes[p] for p in pruned)
    return {
        "layers": {p: {"sparsity": pruned[p], "weights": sizes[p]} for p in pruned},
        "skipped": dict(choice.skipped),
        "pruned_weights": total,
        "overall_sparsity_of_pruned_layers": zeros / total if total else 0.0,
    }


def prune_phase(
    model: keras.Model,
    spec: BackboneSpec,
    recipe: RecipeConfig,
    config: PruneConfig,
    data: PhaseData,
    *,
    first_epoch: int = 0,
    class_weight: dict[int, float] | None = None,
    verbose: int | str = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prunes `model` to `config.sparsity` while fine-tuning it for `config.epochs` epochs.

    The whole network trains (BatchNorm as `config.train_batchnorm` says) with the recipe's
    optimizer and schedule at `config.learning_rate`, on augmented training batches. There is
    no early stopping and no restoring of earlier weights: those would bring back a less
    sparse model. The model is left stripped (plain Keras, zeros in place).

    Returns:
        (one history record per epoch, phase "prune" with the epoch's `sparsity`; the
        per-layer sparsity record of `sparsity_record` plus the settings).

    Raises:
        ConfigError: no layer is left to prune after `exclude` and `min_weights`.
    """
    choice = choose_layers(model, config)
    if not choice.pruned:
        raise ConfigError(
            f"prune: no layer to prune: all {len(choice.skipped)} Conv2D/DepthwiseConv2D/Dense "
            "layers are excluded or smaller than prune.min_weights; lower min_weights or "
            "shorten exclude."
        )
    unfreeze_top_groups(model, spec, -1, train_batchnorm=config.train_batchnorm)
    train_ds = data.train_dataset(augment=True, first_epoch=first_epoch)
    steps = data.steps_per_epoch
    pruning = MagnitudePruning(
        choice.pruned,
        config.sparsity,
        ramp_steps=round(config.ramp_fraction * steps * config.epochs),
        frequency=config.frequency,
        power=config.power,
    )
    pruning.install()  # before compiling: the train step applies the masks
    learning_rate = phase_learning_rate(recipe, config.learning_rate, steps, config.epochs)
    compile_phase(model, recipe, make_optimizer(recipe, learning_rate))
    if class_weight:
        train_ds = with_class_weights(train_ds, class_weight, data.num_classes)
    if verbose:
        print(
            f"Phase 'prune': {config.epochs} epoch(s) at learning rate {config.learning_rate:g}, "
            f"{len(choice.pruned)} layers to {config.sparsity:.0%} zeros "
            f"({len(choice.skipped)} left dense)",
            flush=True,
        )
    records: list[dict[str, Any]] = []
    val_ds = data.val_dataset()
    try:
        model.fit(
            train_ds,
            steps_per_epoch=steps,
            validation_data=val_ds,
            initial_epoch=first_epoch,
            epochs=first_epoch + config.epochs,
            callbacks=[pruning, PhaseLogger("prune", records)]
            + schedule_callbacks(recipe, val_ds is not None),
            shuffle=False,
            verbose=verbose,
        )
    finally:
        pruning.strip()
    batchnorm = 0
    if config.train_batchnorm:
        # The moving statistics lag behind weights that changed this much in a short phase:
        # set them from one pass over the training images with the final pruned weights.
        batchnorm = recompute_batchnorm_statistics(
            model, data.one_epoch(augment=False, epoch=first_epoch)
        )
    settings = {
        "target_sparsity": config.sparsity,
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "ramp_steps": pruning.ramp_steps,
        "update_every_steps": pruning.frequency,
        "power": config.power,
        "batchnorm_layers_recomputed": batchnorm,
    }
    return records, settings | sparsity_record(choice)
