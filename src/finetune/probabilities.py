"""Probabilities from logits, in NumPy alone (no Keras: `finetune predict` from a kept conversion
uses them without loading TensorFlow)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def probabilities_from_views(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The mean over views of `softmax(logits / temperature)`; (views, N, C) -> (N, C)."""
    return np.mean([softmax(v / temperature) for v in view_logits], axis=0)
