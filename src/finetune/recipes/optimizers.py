"""Optimizers by name, configured from `RecipeConfig`.

Weight decay (AdamW's `weight_decay`) never applies to biases or to BatchNorm's gamma and beta:
decaying them pulls the network's offsets and normalisation scales towards zero, which only
hurts (the common practice of timm and fastai).
"""

from __future__ import annotations

import keras

from finetune.config import RecipeConfig

# Matched with re.search against variable names: Dense/Conv biases, BatchNorm gamma and beta.
NO_DECAY_NAMES = ("bias", "gamma", "beta")

_CLASSES = {
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adagrad": keras.optimizers.Adagrad,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
}


def make_optimizer(
    recipe: RecipeConfig,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    lr_multipliers: dict[str, float] | None = None,
) -> keras.optimizers.Optimizer:
    """Returns the optimizer named by `recipe.optimizer` at `learning_rate`.

    Args:
        recipe: supplies the name ("sgd", "rmsprop", "adagrad", "adam", "adamw"), momentum,
            Nesterov flag and weight decay.
        learning_rate: the phase's learning rate, or a schedule of it.
        lr_multipliers: optional learning-rate factor per variable path (discriminative rates,
            see `finetune.recipes.discriminative`). Defaults to None.

    Returns:
        A new, unbuilt `keras.optimizers.Optimizer` (each phase gets a fresh one).
    """
    options: dict = {"learning_rate": learning_rate}
    if recipe.optimizer == "sgd":
        options.update(momentum=recipe.momentum, nesterov=recipe.nesterov)
    elif recipe.optimizer == "rmsprop":
        options.update(momentum=recipe.momentum)
    elif recipe.optimizer == "adamw":
        options.update(weight_decay=recipe.weight_decay)
    optimizer = _CLASSES[recipe.optimizer](**options)
    if lr_multipliers:
        from finetune.recipes.discriminative import with_lr_multipliers

        optimizer = with_lr_multipliers(optimizer, lr_multipliers)
    if optimizer.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
    return optimizer


def build_optimizer(model: keras.Model) -> None:
    """Builds a compiled model's optimizer (its moments...) on the variables `fit` trains.

    Keras' TensorFlow trainer otherwise builds it inside the first traced train step, and
    TensorFlow traces a function again when its first trace created variables: the whole train
    step was traced twice, about 2.2 s more on the first batch of every fine-tuning phase
    (EfficientNet-Lite0, benchmarks/RESULTS.md). Call it after any change of what is trainable.
    """
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
