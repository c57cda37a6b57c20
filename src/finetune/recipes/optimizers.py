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


class _FusedAdamStep:
    """Mixin for Keras' Adam and AdamW: each variable's update in TensorFlow's fused kernel.

    Keras 3 writes Adam's update as about fifteen tensor operations per variable, each a pass
    over the variable's memory, and traces them all. `ResourceApplyAdam` is the same update in
    one kernel and one pass: for EfficientNet-Lite0's 3.3 million trained values it took 3.6 ms a
    step against Keras' 8.3 ms, and its first call (the trace) 0.2 s against 1.0 s
    (benchmarks/RESULTS.md). The arithmetic is Keras' (alpha = lr * sqrt(1 - beta_2^t) /
    (1 - beta_1^t), moments updated in place, the step m * alpha / (sqrt(v) + epsilon)). It
    takes 1 - beta from the float32 beta: 1 - 0.999 is 0.00099998713 there, 0.001 in Keras (a
    relative 1.3e-5 in how fast the second moment moves; weights a few units in the last place
    apart after 25 steps). Keras' Adam given the float32 betas trained to the same scores.
    Anything the kernel does not do (AMSGrad, sparse gradients, callable betas, another
    backend) takes Keras' own update.
    """

    def update_step(self, gradient, variable, learning_rate):
        if not self._fused_step_applies(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        dtype = variable.dtype
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable),
            m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, local_step),
            beta2_power=tf.pow(beta_2, local_step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )

    def _fused_step_applies(self, gradient, variable) -> bool:
        if keras.backend.backend() != "tensorflow" or self.amsgrad:
            return False
        import tensorflow as tf

        numbers = all(isinstance(x, int | float) for x in (self.beta_1, self.beta_2, self.epsilon))
        dense = isinstance(gradient, tf.Tensor)  # a sparse gradient (IndexedSlices) is not one
        return (
            numbers
            and dense
            and hasattr(_value(variable), "handle")
            and keras.backend.standardize_dtype(variable.dtype) in ("float32", "float64")
        )


def _value(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _handle(variable):
    return _value(variable).handle


@keras.saving.register_keras_serializable(package="finetune")
class FusedAdam(_FusedAdamStep, keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose update runs in TensorFlow's fused kernel (same arguments)."""


@keras.saving.register_keras_serializable(package="finetune")
class FusedAdamW(_FusedAdamStep, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose update runs in TensorFlow's fused kernel (same arguments).

    The decoupled weight decay is Keras' own, applied before the update.
    """


_CLASSES = {
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adagrad": keras.optimizers.Adagrad,
    "adam": FusedAdam,
    "adamw": FusedAdamW,
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
    step was traced twice: 2.3-2.6 s more on the first batch of a fine-tuning phase of
    EfficientNet-Lite0 (benchmarks/RESULTS.md). Call it after any change of what is trainable.
    """
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
