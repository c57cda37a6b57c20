"""Temperature scaling: the fitted temperature undoes over-confidence and lowers the ECE."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.calibration import choose_temperature, fit_temperature, negative_log_likelihood
from finetune.errors import FinetuneError
from finetune.evaluate import expected_calibration_error
from finetune.run import softmax


def calibrated_logits(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    p = softmax(logits)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_recovers_the_temperature_that_made_the_logits_over_or_under_confident(true_temperature):
    logits, labels = calibrated_logits(20000, 5, seed=0)
    # A model whose logits are the calibrated ones times 1/T: T > 1 is over-confident.
    fitted = fit_temperature(logits / true_temperature, labels)
    assert fitted == pytest.approx(1 / true_temperature, rel=0.05)


def test_calibration_lowers_the_ece_of_an_over_confident_model():
    logits, labels = calibrated_logits(6000, 4, seed=1)
    over = logits * 3.0
    fit, held_out = slice(0, 3000), slice(3000, None)  # fit on one half, measure on the other
    t = fit_temperature(over[fit], labels[fit])
    before = expected_calibration_error(labels[held_out], softmax(over[held_out]))
    after = expected_calibration_error(labels[held_out], softmax(over[held_out] / t))
    assert before > 0.1
    assert after < before / 3
    # The arg-max, hence accuracy, does not change.
    assert np.array_equal(softmax(over / t).argmax(1), over.argmax(1))


def test_fitted_temperature_never_raises_the_fitting_loss():
    logits, labels = calibrated_logits(500, 3, seed=2)
    t = fit_temperature(logits * 0.3, labels)
    assert negative_log_likelihood(logits * 0.3, labels, t) <= negative_log_likelihood(
        logits * 0.3, labels, 1.0
    )


def test_refuses_empty_or_mismatched_input():
    with pytest.raises(FinetuneError, match="logits"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(FinetuneError, match="3 labels"):
        fit_temperature(np.zeros((4, 3)), np.zeros(3, int))


def test_calibrate_without_a_validation_split_is_refused_before_training(tmp_path):
    import finetune
    from tests.helpers import FASHION, image_subset

    data = image_subset(FASHION, tmp_path / "data", classes=2, per_class=10)
    with pytest.raises(FinetuneError, match="--val-fraction"):
        finetune.train(
            data,
            image_size=32,
            val_fraction=0.0,
            calibrate=True,
            out=tmp_path / "run",
            progress=False,
        )
    assert not (tmp_path / "run" / "model.keras").exists()


def test_a_val_split_without_mistakes_leaves_the_temperature_at_1():
    # All right: the likelihood would push T to its lower bound, sharpening an already
    # over-confident model. choose_temperature refuses and says why.
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    labels = np.array([0, 1, 0])
    assert fit_temperature(logits, labels) < 0.1  # what a blind fit would do
    t, note = choose_temperature(logits, labels)
    assert t == 1.0 and "every val image is classified right" in note
    t, note = choose_temperature(logits, np.array([0, 1, 1]))
    assert note is None and t != 1.0
