"""The learning-rate range test (Smith; fastai's `lr_find`): pick a learning rate by looking.

`LRRangeTest` is a callback that raises the learning rate exponentially from `start` to `end`
over `num_steps` training batches, records each batch's loss and its exponentially smoothed,
bias-corrected value, and stops once the smoothed loss exceeds `stop_factor` times its best.
`find_learning_rate` runs it on a copy of the weights (they are restored afterwards) and
suggests a rate: a tenth of the rate at the lowest smoothed loss, the usual rule of thumb, which
keeps well clear of where the loss starts to climb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from finetune.recipes.optimizers import build_optimizer


class LRRangeTest(keras.callbacks.Callback):
    """Exponential learning-rate ramp with per-batch loss recording.

    Args:
        start: first learning rate. Defaults to 1e-7.
        end: last learning rate. Defaults to 10.
        num_steps: batches of the ramp. Defaults to 100.
        beta: smoothing of the loss (exponential moving average). Defaults to 0.98.
        stop_factor: stop when the smoothed loss exceeds this times its minimum. Defaults to 4.
    """

    def __init__(self, start=1e-7, end=10.0, num_steps=100, beta=0.98, stop_factor=4.0):
        super().__init__()
        self.start, self.end, self.num_steps = start, end, num_steps
        self.beta, self.stop_factor = beta, stop_factor
        self.learning_rates: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self._average = 0.0

    def learning_rate_at(self, step: int) -> float:
        return self.start * (self.end / self.start) ** (step / max(1, self.num_steps - 1))

    def on_train_batch_begin(self, batch, logs=None):
        # Keras reports a running mean over the epoch: reset it so logs hold this batch's loss.
        self.model.reset_metrics()
        self.model.optimizer.learning_rate = self.learning_rate_at(len(self.losses))

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", math.nan))
        self.learning_rates.append(self.learning_rate_at(len(self.losses)))
        self.losses.append(loss)
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** len(self.losses))
        self.smoothed.append(smoothed)
        if not math.isfinite(loss) or smoothed > self.stop_factor * min(self.smoothed):
            self.model.stop_training = True


@dataclass
class LRFinderResult:
    """The range test's curve and its suggestion.

    Args:
        learning_rates: the rate of each recorded batch.
        losses: each batch's training loss.
        smoothed: the smoothed, bias-corrected loss.
        suggestion: the suggested learning rate.
    """

    learning_rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = math.nan

    def plot(self, path: str | Path) -> Path:
        """Saves the smoothed loss against the learning rate (log scale) as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from finetune.atomic import atomic_write

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(self.learning_rates, self.smoothed, label="smoothed loss")
        ax.axvline(self.suggestion, color="tab:red", linestyle="--",
                   label=f"suggested {self.suggestion:.2g}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("Learning-rate range test")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png")
        plt.close(fig)
        return path


def suggest_learning_rate(learning_rates: list[float], smoothed: list[float]) -> float:
    """A tenth of the learning rate at the lowest smoothed loss."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if not finite:
        return math.nan
    best = min(finite, key=lambda i: smoothed[i])
    return learning_rates[best] / 10.0


def find_learning_rate(
    model: keras.Model,
    train_data: tf.data.Dataset,
    *,
    optimizer: keras.optimizers.Optimizer,
    loss: keras.losses.Loss,
    num_steps: int = 100,
    start: float = 1e-7,
    end: float = 10.0,
) -> LRFinderResult:
    """Runs the range test on `model` as it is (frozen layers stay frozen), then restores it.

    Args:
        model: the model to probe; its weights are the same afterwards.
        train_data: training batches; repeated as needed.
        optimizer: a fresh optimizer of the kind training will use.
        loss: the training loss.
        num_steps: batches of the ramp. Defaults to 100.
        start: first learning rate. Defaults to 1e-7.
        end: last learning rate. Defaults to 10.

    Returns:
        The curve and the suggested learning rate.
    """
    saved = [np.array(w) for w in model.get_weights()]
    ramp = LRRangeTest(start=start, end=end, num_steps=num_steps)
    model.compile(optimizer=optimizer, loss=loss)
    build_optimizer(model)  # outside the traced step: traced once, not twice
    try:
        model.fit(train_data.repeat(), steps_per_epoch=num_steps, epochs=1, callbacks=[ramp],
                  shuffle=False, verbose=0)  # fmt: skip
    finally:
        model.set_weights(saved)
    return LRFinderResult(
        learning_rates=ramp.learning_rates,
        losses=ramp.losses,
        smoothed=ramp.smoothed,
        suggestion=suggest_learning_rate(ramp.learning_rates, ramp.smoothed),
    )
