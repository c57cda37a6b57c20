"""Learning-rate schedules: their values step by step, and a phase that follows one."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import finetune
from finetune.config import RecipeConfig
from finetune.recipes.schedules import OneCycle, phase_learning_rate, schedule_callbacks
from tests.helpers import DIGITS, image_subset


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_one_cycle_rises_to_the_peak_then_anneals():
    schedule = OneCycle(1e-3, total_steps=100)
    lr = values(schedule, range(101))
    assert lr[0] == pytest.approx(1e-3 / 25, rel=1e-5)  # computed in float32
    assert lr.argmax() == 25 and lr[25] == pytest.approx(1e-3, rel=1e-5)
    assert np.all(np.diff(lr[:26]) > 0) and np.all(np.diff(lr[25:]) < 0)
    assert lr[100] == pytest.approx(1e-3 / 25 / 1e4, rel=1e-3)
    peak, end = 1e-3, 1e-3 / 25 / 1e4
    assert lr[50] == pytest.approx(end + (peak - end) * (1 + np.cos(np.pi / 3)) / 2, rel=1e-5)


def test_one_cycle_round_trips_through_keras_serialization():
    schedule = OneCycle(2e-3, total_steps=40, pct_start=0.3)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    np.testing.assert_allclose(values(again, range(41)), values(schedule, range(41)))


def test_cosine_with_warmup():
    recipe = RecipeConfig(schedule="cosine", warmup_epochs=1)
    schedule = phase_learning_rate(recipe, 1e-3, steps_per_epoch=10, epochs=5)
    lr = values(schedule, range(51))
    assert lr[0] == pytest.approx(1e-3 / 25, rel=1e-5)
    assert lr[10] == pytest.approx(1e-3, rel=1e-5) and lr.max() == pytest.approx(1e-3, rel=1e-5)
    assert np.all(np.diff(lr[:11]) > 0) and np.all(np.diff(lr[10:]) <= 0)
    assert lr[50] == pytest.approx(0.0, abs=1e-9)
    # A 2-epoch phase: the warm-up is capped at 30% of it, so the phase still decays to 0.
    short = values(phase_learning_rate(recipe, 1e-3, steps_per_epoch=10, epochs=2), range(21))
    assert short.argmax() == 6 and short[20] == pytest.approx(0.0, abs=1e-9)


def test_constant_and_plateau():
    assert phase_learning_rate(RecipeConfig(schedule="constant"), 1e-3, 10, 5) == 1e-3
    plateau = RecipeConfig(schedule="plateau", plateau_factor=0.5, plateau_patience=2)
    assert phase_learning_rate(plateau, 1e-3, 10, 5) == 1e-3
    (callback,) = schedule_callbacks(plateau, has_validation=True)
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau)
    assert (callback.factor, callback.patience, callback.monitor) == (0.5, 2, "val_loss")
    assert schedule_callbacks(RecipeConfig(schedule="one_cycle"), True) == []


@pytest.mark.slow
def test_a_phase_follows_its_one_cycle(tmp_path):
    data = image_subset(DIGITS, tmp_path / "d", classes=3, per_class=30)
    run = finetune.train(
        data,
        image_size=32,
        head_epochs=3,
        finetune_epochs=0,
        batch_size=8,
        schedule="one_cycle",
        head_lr=1e-2,
        early_stopping_patience=0,
        progress=False,
    )
    steps = 9  # 72 training images / 8
    expected = values(OneCycle(1e-2, total_steps=3 * steps), [steps, 2 * steps, 3 * steps])
    recorded = [r["learning_rate"] for r in run.history]
    np.testing.assert_allclose(recorded, expected, rtol=1e-5)
    assert recorded[0] > recorded[1] > recorded[2]
