"""Temperature scaling: calibrated probabilities from a trained classifier.

A fine-tuned network's softmax is usually over-confident. Temperature scaling (Guo et al. 2017)
divides the logits by one number T > 0 fitted on held-out data (the validation split) to
minimise the negative log-likelihood. It changes no prediction (the arg-max stays), only how sure
the probabilities say the model is. `train(..., calibrate=True)` (`--calibrate`) fits T after
training and stores it in the run (`run.json`, `calibration`), so `Run.predict_proba`, `predict`
and `evaluate` return calibrated probabilities.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from finetune.errors import FinetuneError

#: The temperatures searched: wide enough for any sane network, bounded so T stays positive.
TEMPERATURE_RANGE = (0.05, 20.0)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean cross-entropy of `softmax(logits / temperature)` against int `labels`."""
    z = np.asarray(logits, np.float64) / temperature
    return float(-log_softmax(z, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of `labels`.

    Args:
        logits: (N, num_classes) raw outputs of the model on held-out images.
        labels: (N,) int true classes.

    Returns:
        T in `TEMPERATURE_RANGE`; above 1 softens an over-confident model.

    Raises:
        FinetuneError: no images, or shapes that do not match.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise FinetuneError(
            f"temperature scaling needs (N, classes) logits and N labels with N > 0, got "
            f"logits {logits.shape} and {labels.shape[0]} labels."
        )
    low, high = np.log(TEMPERATURE_RANGE)
    # The NLL is smooth and unimodal in log T; a bounded scalar search is exact enough.
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str | None]:
    """`fit_temperature`, unless the held-out images cannot support a fit.

    When every image is classified right, the likelihood keeps rising as T falls towards 0, so
    a fit would make the model more over-confident, not less: T stays 1.

    Returns:
        (temperature, None) or (1.0, the reason the temperature was not fitted).
    """
    logits = np.asarray(logits)
    if len(labels) and (logits.argmax(axis=1) == np.asarray(labels)).all():
        return 1.0, (
            "temperature not fitted: every val image is classified right, so the val split "
            "cannot show how over-confident the model is; probabilities left as they are"
        )
    return fit_temperature(logits, labels), None
