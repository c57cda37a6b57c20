"""Adam and AdamW in TensorFlow's fused kernel: Keras' update, one kernel per variable."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from finetune.recipes.discriminative import with_lr_multipliers
from finetune.recipes.optimizers import FusedAdam, FusedAdamW
from tests.helpers import run_python

SHAPES = [(3, 3, 16, 32), (32,), (1, 1, 32, 64), (5, 5, 1, 96), (200, 10)]


def run_steps(cls, steps: int = 25, **options):
    """`steps` updates of fresh variables by `cls(**options)`; the variables and the moments."""
    rng = np.random.default_rng(0)
    variables = [
        keras.Variable(rng.normal(size=s).astype("float32"), name=f"w{i}")
        for i, s in enumerate(SHAPES)
    ]
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=steps)
    optimizer = cls(learning_rate=schedule, **options)
    optimizer.build(variables)
    apply = tf.function(lambda grads: optimizer.apply(grads, variables))
    draws = np.random.default_rng(1)
    for _ in range(steps):
        # Gradients from 1e-7 to 10: Adam's epsilon and its large steps both matter.
        scale = 10.0 ** draws.integers(-7, 2, size=len(SHAPES))
        apply(
            [draws.normal(size=s).astype("float32") * k for s, k in zip(SHAPES, scale, strict=True)]
        )
    return [v.numpy() for v in variables], [v.numpy() for v in optimizer.variables], apply


@pytest.mark.parametrize(
    ("fused", "keras_class", "options"),
    [
        (FusedAdam, keras.optimizers.Adam, {}),
        (FusedAdam, keras.optimizers.Adam, {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4}),
        (FusedAdamW, keras.optimizers.AdamW, {"weight_decay": 0.05}),
    ],
)
def test_the_fused_update_is_keras_update(fused, keras_class, options):
    weights, state, _ = run_steps(fused, **options)
    expected_weights, expected_state, _ = run_steps(keras_class, **options)
    for got, want in zip(weights, expected_weights, strict=True):
        # Rounding: a few units in the last place of values up to about 4.
        np.testing.assert_allclose(got, want, rtol=0, atol=4e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(weights, expected_weights, strict=True))
    for got, want in zip(state, expected_state, strict=True):
        # The second moment moves at 1 - float32(beta_2): a relative 1.3e-5 from Keras' rate;
        # a first moment that cancels to near zero keeps the rounding of its larger terms.
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())


def fused_kernels(apply) -> int:
    graph = apply.get_concrete_function([tf.TensorSpec(s, tf.float32) for s in SHAPES]).graph
    return sum(op.type == "ResourceApplyAdam" for op in graph.get_operations())


def test_each_variable_is_updated_by_one_fused_kernel():
    *_, apply = run_steps(FusedAdam, steps=1)
    assert fused_kernels(apply) == len(SHAPES)


def test_amsgrad_takes_keras_own_update():
    weights, state, apply = run_steps(FusedAdam, amsgrad=True)
    expected_weights, expected_state, _ = run_steps(keras.optimizers.Adam, amsgrad=True)
    assert fused_kernels(apply) == 0
    for got, want in zip(weights + state, expected_weights + expected_state, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_saved_model_keeps_its_fused_optimizer(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=FusedAdamW(1e-3, weight_decay=0.01), loss="mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is FusedAdamW
    assert loaded.optimizer.weight_decay == pytest.approx(0.01)
    assert int(loaded.optimizer.iterations) == 2
    for got, want in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_compiled_load_in_the_command_finds_the_optimizer_classes(tmp_path):
    # In the `finetune` command, the package loads its modules lazily; a compiled load still
    # knows finetune's optimizers (here with discriminative learning rates, as phase 2 saves).
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    optimizer = with_lr_multipliers(FusedAdam(1e-3), {"dense/kernel": 0.1})
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    code = (
        "import _finetune_cli\n"
        "_finetune_cli.STARTED = True\n"
        "from finetune.untrusted import load_keras_model\n"
        f"m = load_keras_model({str(tmp_path / 'm.keras')!r})\n"
        "print(type(m.optimizer).__name__, m.optimizer.lr_multipliers)\n"
    )
    shown = run_python(code)
    assert shown.split()[0] == "DiscriminativeFusedAdam"
    assert "'dense/kernel': 0.1" in shown
