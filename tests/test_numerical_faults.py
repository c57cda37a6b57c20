"""Numerical faults: a NaN or infinite loss stops training at that batch and names its files.

The last complete checkpoint from before stays loadable and finite, the run is not recorded as
finished, and the CLI exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from rich.console import Console

import finetune
from finetune.checkpoint import checkpoint_problem
from finetune.data.pipeline import epoch_permutation, image_dataset
from finetune.errors import NonFiniteLossError
from finetune.recipes.two_phase import PhaseData, StopOnNonFinite
from tests.helpers import DIGITS, image_subset

SIZE = 32


def test_an_epoch_visits_the_samples_in_the_order_epoch_permutation_gives():
    n, batch = 23, 5
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(n) % 3

    def order(first_epoch: int, epochs: int) -> list[np.ndarray]:
        ds = image_dataset(
            images, labels, 3, batch_size=batch, training=True, seed=4, first_epoch=first_epoch
        )
        seen = np.concatenate([x[:, 0, 0, 0].numpy().astype(int) for x, _ in ds.take(5 * epochs)])
        return np.split(seen, epochs)

    run = order(0, 4)  # a stream of epochs 0, 1, 2, 3: 5 batches each, the last one of 3
    for e, seen in enumerate(run):
        np.testing.assert_array_equal(seen, epoch_permutation(n, 4, e))
    # The order depends on the epoch number only, not on where the stream started.
    np.testing.assert_array_equal(order(3, 1)[0], run[3])
    np.testing.assert_array_equal(order(1, 2)[1], run[2])
    assert not np.array_equal(run[0], run[3])
    assert sorted(run[3]) == list(range(n))


class PoisonOnWhite(keras.layers.Layer):
    """Logits from the mean pixel, but NaN for an all-white image: a planted non-finite loss."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(3, 2), initializer="ones")

    def call(self, x):
        white = tf.reduce_all(tf.equal(x, 255.0), axis=[1, 2, 3])
        logits = tf.reduce_mean(x, axis=[1, 2]) / 255.0 @ self.w
        return tf.where(white[:, None], tf.fill(tf.shape(logits), np.nan), logits)


@pytest.mark.parametrize("first_epoch", [0, 2])
def test_the_error_names_the_files_of_the_batch_with_the_planted_image(first_epoch):
    rng = np.random.default_rng(0)
    n, batch, poisoned = 30, 4, 17
    images = rng.integers(0, 200, (n, 4, 4, 3), dtype=np.uint8)
    images[poisoned] = 255
    data = PhaseData(
        images, np.arange(n) % 2, 2, batch, seed=5, train_paths=[f"img{i}.png" for i in range(n)]
    )
    model = keras.Sequential([keras.Input((4, 4, 3)), PoisonOnWhite()])
    model.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(NonFiniteLossError) as caught:
        model.fit(
            data.train_dataset(first_epoch=first_epoch),
            steps_per_epoch=data.steps_per_epoch,
            initial_epoch=first_epoch,
            epochs=first_epoch + 2,
            callbacks=[StopOnNonFinite("head", data, None)],
            shuffle=False,
            verbose=0,
        )
    order = epoch_permutation(n, 5, first_epoch)
    step = int(np.flatnonzero(order == poisoned)[0]) // batch
    expected = [f"img{i}.png" for i in order[step * batch : (step + 1) * batch]]
    assert caught.value.files == expected and f"img{poisoned}.png" in expected
    message = str(caught.value)
    assert f"epoch {first_epoch + 1}, batch {step + 1} of 8" in message
    assert all(name in message for name in expected) and "nan" in message


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=3, per_class=20)


@pytest.mark.slow
def test_an_absurd_learning_rate_stops_the_run_and_keeps_the_last_good_checkpoint(
    digits, tmp_path, monkeypatch, capsys
):
    from finetune import cli

    out = tmp_path / "run"
    argv = [
        "finetune", "train", str(digits), "--out", str(out), "--image-size", str(SIZE),
        "--head-epochs", "1", "--finetune-epochs", "2", "--optimizer", "sgd",
        "--head-lr", "0.01", "--finetune-lr", "1e38", "--batch-size", "8", "--no-check-data",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=100_000))
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "training stopped" in error and "phase 'finetune', epoch 2, batch" in error
    # The named files are images of the training split, one batch of them.
    named = [p for p in error.replace(",", " ").split() if p.endswith(".png")]
    train_files = {str(p) for p in Path(digits).rglob("*.png")}
    assert 1 <= len(named) <= 8 and set(named) <= train_files
    assert "head.weights.h5" in error
    # Not recorded as finished; the head's checkpoint from before is complete and finite.
    assert not (out / "model.keras").exists() and not (out / "run.json").exists()
    head = out / "checkpoints" / "head.weights.h5"
    assert checkpoint_problem(head) is None
    model = finetune.build_classifier(
        finetune.get_backbone("efficientnet_lite0"), 3, image_size=SIZE, weights=None
    )
    model.load_weights(head)
    assert all(np.isfinite(np.asarray(w)).all() for w in model.get_weights())
    finetune_checkpoint = out / "checkpoints" / "finetune.weights.h5"
    if finetune_checkpoint.exists():  # saved only from finite weights
        model.load_weights(finetune_checkpoint)
        assert all(np.isfinite(np.asarray(w)).all() for w in model.get_weights())


def test_the_weight_check_reads_the_weights_as_they_are_now():
    from finetune.recipes.two_phase import _finite_check

    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    check = _finite_check(layer.trainable_variables)
    assert bool(check())
    bad = np.ones((4, 3), np.float32)
    bad[1, 2] = np.inf
    layer.kernel.assign(bad)  # after the graph was made: it must see the new value
    assert not bool(check())
    layer.kernel.assign(np.zeros((4, 3), np.float32))
    assert bool(check())
