"""Optimizers by name, configured from `RecipeConfig`."""

from __future__ import annotations

import keras

from finetune.config import RecipeConfig


def make_optimizer(recipe: RecipeConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    """Returns the optimizer named by `recipe.optimizer` at `learning_rate`.

    Args:
        recipe: supplies the name ("sgd", "rmsprop", "adagrad", "adam", "adamw"), momentum,
            Nesterov flag and weight decay.
        learning_rate: the phase's learning rate.

    Returns:
        A new `keras.optimizers.Optimizer` (each phase gets a fresh one).
    """
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(
            learning_rate, momentum=recipe.momentum, nesterov=recipe.nesterov
        )
    if recipe.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, momentum=recipe.momentum)
    if recipe.optimizer == "adagrad":
        return keras.optimizers.Adagrad(learning_rate)
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=recipe.weight_decay)
    return keras.optimizers.Adam(learning_rate)
