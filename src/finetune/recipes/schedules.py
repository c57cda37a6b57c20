"""Learning-rate schedules of a phase: constant, warm-up + cosine, one-cycle, reduce-on-plateau.

Each phase of a recipe gets its own schedule over its own steps. Cosine decay with a linear
warm-up is Keras' own `CosineDecay`; reduce-on-plateau is Keras' `ReduceLROnPlateau` callback;
one-cycle (Smith's 1cycle as fastai's `fit_one_cycle` runs it: cosine from `max / div` up to
`max` over the first `pct_start` of the steps, then cosine down to `max / (div * final_div)`) is
`OneCycle`, a serializable `LearningRateSchedule`, since Keras has none.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from finetune.config import RecipeConfig

# fastai's defaults: start and end of a cycle relative to its peak.
WARMUP_DIV = 25.0
FINAL_DIV = 1e4


@keras.saving.register_keras_serializable(package="finetune")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle learning rate: cosine warm-up to `max_learning_rate`, then cosine annealing.

    Args:
        max_learning_rate: the peak.
        total_steps: steps of the whole cycle; later steps stay at the final value.
        pct_start: share of the steps spent rising. Defaults to 0.25.
        div: the start is `max_learning_rate / div`. Defaults to 25.
        final_div: the end is `max_learning_rate / (div * final_div)`. Defaults to 1e4.

    Example:
        >>> OneCycle(1e-3, total_steps=100)(25)  # the peak, 1e-3
    """

    def __init__(
        self,
        max_learning_rate: float,
        total_steps: int,
        pct_start: float = 0.25,
        div: float = WARMUP_DIV,
        final_div: float = FINAL_DIV,
    ):
        self.max_learning_rate = float(max_learning_rate)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div = float(div)
        self.final_div = float(final_div)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.max_learning_rate
        start, end = peak / self.div, peak / (self.div * self.final_div)
        up_steps = max(1.0, math.floor(self.total_steps * self.pct_start))
        down_steps = max(1.0, self.total_steps - up_steps)
        up = ops.clip(step / up_steps, 0.0, 1.0)
        down = ops.clip((step - up_steps) / down_steps, 0.0, 1.0)

        def cosine(a, b, t):  # from a to b as t goes 0 -> 1
            return b + (a - b) * (1.0 + ops.cos(math.pi * t)) / 2.0

        return ops.where(step < up_steps, cosine(start, peak, up), cosine(peak, end, down))

    def get_config(self):
        return {
            "max_learning_rate": self.max_learning_rate,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div": self.div,
            "final_div": self.final_div,
        }


MAX_WARMUP_SHARE = 0.3


def phase_learning_rate(
    recipe: RecipeConfig, learning_rate: float, steps_per_epoch: int, epochs: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate (a constant or a schedule) an optimizer gets for one phase.

    Args:
        recipe: `schedule` and `warmup_epochs` come from here.
        learning_rate: the phase's base (peak) learning rate.
        steps_per_epoch: training batches per epoch.
        epochs: the phase's epochs.
    """
    total = max(1, steps_per_epoch * epochs)
    if recipe.schedule == "one_cycle":
        return OneCycle(learning_rate, total)
    if recipe.schedule == "cosine":
        # Warm-up takes at most 30% of the phase, so a short phase still decays.
        warmup = min(int(MAX_WARMUP_SHARE * total), round(recipe.warmup_epochs * steps_per_epoch))
        if warmup <= 0:
            return keras.optimizers.schedules.CosineDecay(learning_rate, total)
        return keras.optimizers.schedules.CosineDecay(
            learning_rate / WARMUP_DIV,
            decay_steps=total - warmup,
            warmup_target=learning_rate,
            warmup_steps=warmup,
        )
    return learning_rate


def schedule_callbacks(
    recipe: RecipeConfig, has_validation: bool
) -> list[keras.callbacks.Callback]:
    """Callbacks the schedule needs: `ReduceLROnPlateau` for "plateau", none otherwise."""
    if recipe.schedule != "plateau":
        return []
    return [
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss" if has_validation else "loss",
            factor=recipe.plateau_factor,
            patience=recipe.plateau_patience,
        )
    ]
