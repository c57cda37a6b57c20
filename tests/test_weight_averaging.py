"""Weight averaging over the last epochs (`recipe.average_last_epochs`), checked against weights
captured at every epoch end: on a tiny model, and through `finetune.train` on a real network."""

from __future__ import annotations

import importlib
import json

import keras
import numpy as np
import pytest

import finetune
from finetune.recipes import PhaseLogger
from finetune.recipes.averaging import WeightAveraging, recompute_batchnorm_statistics
from tests.helpers import FASHION, image_subset


class Capture(keras.callbacks.Callback):
    """Copies of the fitted model's trainable weights at every epoch end, keyed by path."""

    def __init__(self, phase: str = "", store: list | None = None):
        super().__init__()
        self.phase = phase
        self.epochs: list = [] if store is None else store

    def on_epoch_end(self, epoch, logs=None):
        weights = {v.path: np.array(v.numpy()) for v in self.model.trainable_weights}
        self.epochs.append((self.phase, epoch + 1, weights))


def tiny_model(batchnorm: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="dense")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn")(x)
        frozen = keras.layers.BatchNormalization(name="frozen_bn")
        x = frozen(x)
        frozen.trainable = False
    x = keras.layers.Dropout(0.5)(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model


def tiny_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)


@pytest.mark.parametrize(("epochs", "last", "window"), [(5, 3, [3, 4, 5]), (2, 4, [1, 2])])
def test_model_ends_with_the_mean_of_the_last_epochs(epochs, last, window):
    model = tiny_model()
    x, y = tiny_data()
    records: list = []
    capture = Capture()
    averaging = WeightAveraging(last, records)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        verbose=0,
        callbacks=[PhaseLogger("p", records), averaging, capture],
    )
    assert averaging.averaged_epochs == window
    assert [r["epoch"] for r in records if r.get("averaged")] == window
    captured = [w for _, epoch, w in capture.epochs if epoch in window]
    for v in model.trainable_weights:
        expected = np.mean([w[v.path] for w in captured], axis=0)
        np.testing.assert_allclose(v.numpy(), expected, rtol=0, atol=1e-6)
    # The last epoch's weights are not the mean (the test would prove nothing otherwise).
    last_weights = capture.epochs[-1][2]
    assert any(not np.allclose(v.numpy(), last_weights[v.path]) for v in model.trainable_weights)


def test_last_epochs_must_be_positive():
    with pytest.raises(ValueError, match="1 or more"):
        WeightAveraging(0)


def test_trained_batchnorm_gets_statistics_of_the_averaged_weights():
    model = tiny_model(batchnorm=True)
    x, y = tiny_data()
    frozen = model.get_layer("frozen_bn")
    frozen_before = [w.copy() for w in frozen.get_weights()]
    batches = [x[i : i + 16] for i in range(0, len(x), 16)]
    averaging = WeightAveraging(2, batchnorm_batches=lambda: batches)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[averaging])
    assert averaging.batchnorm_recomputed == 1
    # What the BatchNorm layer sees, with the averaged weights, batch by batch.
    features = keras.Model(model.inputs, model.get_layer("dense").output)
    seen = [features.predict(b, verbose=0) for b in batches]
    bn = model.get_layer("bn")
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), np.mean([s.mean(axis=0) for s in seen], axis=0), atol=1e-5
    )
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), np.mean([s.var(axis=0) for s in seen], axis=0), atol=1e-5
    )
    assert bn.momentum == 0.99  # restored
    for before, after in zip(frozen_before, frozen.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_recompute_does_nothing_without_trainable_batchnorm():
    model = tiny_model()
    assert recompute_batchnorm_statistics(model, [np.zeros((2, 6), "float32")]) == 0


def test_config_refuses_a_negative_window():
    from finetune.train import resolve_config

    with pytest.raises(finetune.ConfigError, match="average_last_epochs"):
        resolve_config(average_last_epochs=-1)


@pytest.mark.slow
def test_train_ends_the_final_phase_with_the_averaged_weights(tmp_path, monkeypatch):
    train_module = importlib.import_module("finetune.train")
    captured: list = []
    real_fit_phases = train_module.fit_phases

    def fit_phases_capturing(*args, **kwargs):
        kwargs["extra_callbacks"] = lambda phase: [Capture(phase.name, captured)]
        return real_fit_phases(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit_phases", fit_phases_capturing)
    data = image_subset(FASHION, tmp_path / "data", classes=3, per_class=30)
    out = tmp_path / "run"
    run = finetune.train(
        data,
        out=out,
        image_size=32,
        head_epochs=1,
        finetune_epochs=3,
        early_stopping_patience=1,  # left out of the averaged phase: all 3 epochs must run
        average_last_epochs=2,
        check_data=False,
        progress=False,
    )
    assert [(phase, epoch) for phase, epoch, _ in captured] == [
        ("head", 1),
        ("finetune", 2),
        ("finetune", 3),
        ("finetune", 4),
    ]
    window = [w for phase, epoch, w in captured if epoch in (3, 4)]
    variables = {v.path: v for v in run.model.weights}
    assert set(window[0]) <= set(variables)
    for path in window[0]:
        expected = np.mean([w[path] for w in window], axis=0)
        np.testing.assert_allclose(variables[path].numpy(), expected, rtol=0, atol=1e-6)
    assert [r["epoch"] for r in run.history if r.get("averaged")] == [3, 4]
    record = json.loads((out / "run.json").read_text())["weight_averaging"]
    assert record["last_epochs"] == 2 and record["averaged_epochs"] == [3, 4]
    assert record["phase"] == "finetune" and "no BatchNorm layer trained" in record["batchnorm"]
    # The saved model is the averaged one, and the run's metrics were measured on it.
    loaded = finetune.Run.load(out)
    for a, b in zip(run.model.get_weights(), loaded.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert finetune.evaluate(loaded, progress=False)["accuracy"] == run.metrics["accuracy"]
