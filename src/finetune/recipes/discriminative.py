"""Discriminative learning rates: one learning rate per layer group, correct for every optimizer.

Keras 3 optimizers have a single learning rate. Scaling gradients instead is wrong for adaptive
optimizers (Adam divides the gradient by its own running scale, so a scaled gradient gives the
same step). Here each optimizer class gets a subclass whose `update_step` multiplies the learning
rate it passes to the parent's update by a per-variable factor, so the step of a variable is
exactly the parent optimizer's step at `factor * learning_rate`, its state untouched. Factors are
keyed by the variable's path (`backbone/top_conv/kernel`); variables not listed use 1.0.
`group_lr_multipliers` derives the factors from the backbone's layer groups, geometric from the
head (1.0) down to the lowest unfrozen group (`lowest`), as fastai's `slice(lo, hi)` does.
"""

from __future__ import annotations

import keras

from finetune.backbones.registry import BackboneSpec
from finetune.model import backbone_of
from finetune.recipes.optimizers import FusedAdam, FusedAdamW


class _PerVariableLearningRate:
    """Mixin for a Keras optimizer: a learning-rate factor per variable path."""

    def __init__(self, *args, lr_multipliers: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}

    def build(self, variables):
        super().build(variables)
        # update_step may receive the backend's own variable objects (tf.Variable), which have
        # no Keras path: look factors up by position, as Adam finds its moments.
        self._lr_factors = [self.lr_multipliers.get(v.path, 1.0) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        factor = self._lr_factors[self._get_variable_index(variable)]
        if factor != 1.0:
            learning_rate = learning_rate * factor
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": dict(self.lr_multipliers)}


def _discriminative_class(base: type[keras.optimizers.Optimizer]) -> type:
    cls = type(f"Discriminative{base.__name__}", (_PerVariableLearningRate, base), {})
    cls.__doc__ = f"`keras.optimizers.{base.__name__}` with a learning-rate factor per variable."
    return keras.saving.register_keras_serializable(package="finetune")(cls)


DISCRIMINATIVE_OPTIMIZERS: dict[type, type] = {
    base: _discriminative_class(base)
    for base in (
        keras.optimizers.SGD,
        keras.optimizers.RMSprop,
        keras.optimizers.Adagrad,
        keras.optimizers.Adam,
        keras.optimizers.AdamW,
        FusedAdam,
        FusedAdamW,
    )
}


def with_lr_multipliers(
    optimizer: keras.optimizers.Optimizer, multipliers: dict[str, float]
) -> keras.optimizers.Optimizer:
    """Returns an optimizer like `optimizer` whose step for each listed variable is scaled.

    Args:
        optimizer: a fresh (unbuilt) SGD, RMSprop, Adagrad, Adam or AdamW optimizer.
        multipliers: variable path -> learning-rate factor.

    Returns:
        A new optimizer of the matching `Discriminative*` class, same configuration.

    Raises:
        TypeError: for an optimizer class without a discriminative variant.

    Example:
        >>> opt = with_lr_multipliers(keras.optimizers.Adam(1e-3), {"stem_conv/kernel": 0.1})
    """
    cls = DISCRIMINATIVE_OPTIMIZERS.get(type(optimizer))
    if cls is None:
        raise TypeError(f"no per-variable learning rates for {type(optimizer).__name__}")
    # from_config, not cls(**config): it turns a serialized learning-rate schedule back into one.
    return cls.from_config({**optimizer.get_config(), "lr_multipliers": multipliers})


def group_lr_multipliers(
    model: keras.Model, spec: BackboneSpec, groups: list[str], lowest: float
) -> dict[str, float]:
    """Learning-rate factors of the unfrozen backbone groups, geometric from `lowest` to 1.

    With `n` unfrozen groups, the groups (bottom to top) and the head form `n + 1` steps evenly
    spaced in log scale: the lowest group gets `lowest`, the head 1.0 (fastai's `slice(lo, hi)`
    with `lowest = lo / hi`).

    Args:
        model: a classifier made by `build_classifier`.
        spec: its backbone's registry entry.
        groups: the unfrozen groups, bottom to top (as returned by `unfreeze_top_groups`).
        lowest: the factor of the lowest unfrozen group, e.g. 0.01 for `slice(1e-5, 1e-3)`.

    Returns:
        Variable path -> factor, for the trainable variables of the unfrozen groups.
    """
    n = len(groups)
    factors = {g: lowest ** ((n - i) / n) for i, g in enumerate(groups)} if n else {}
    multipliers = {}
    for layer in backbone_of(model).layers:
        group = spec.group_of(layer.name)
        if group in factors:
            for variable in layer.trainable_weights:
                multipliers[variable.path] = factors[group]
    return multipliers
