"""The two-phase recipe: train the head on a frozen backbone, then unfreeze the top and go on.

As in the Keras transfer-learning guide and fastai's `fine_tune`, the recipe is a short list of
`Phase`s, each one `compile` + `fit` on the same `keras.Model`: what is trainable changes between
phases, the optimizer and learning rate are new in each, and the epoch counter runs on so the
history reads as one training. Each phase stops early on the validation loss and restores its
best weights, and checkpoints its best weights in the run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from finetune.backbones.registry import BackboneSpec
from finetune.config import RecipeConfig
from finetune.model import freeze_backbone, unfreeze_top_groups
from finetune.recipes.discriminative import group_lr_multipliers
from finetune.recipes.optimizers import make_optimizer
from finetune.recipes.schedules import phase_learning_rate, schedule_callbacks


@dataclass(frozen=True)
class Phase:
    """One `fit` call of a recipe.

    Args:
        name: "head" or "finetune" (recorded in the history).
        epochs: how many epochs at most.
        learning_rate: the phase's learning rate.
        unfreeze_groups: None freezes the whole backbone; otherwise how many layer groups from
            the top are trainable (-1: all).
        train_batchnorm: whether unfrozen BatchNorm layers train.
        lowest_group_lr: learning-rate factor of the lowest unfrozen group, rising geometrically
            to 1.0 for the head (see `finetune.recipes.discriminative`); 1.0 means one rate.
    """

    name: str
    epochs: int
    learning_rate: float
    unfreeze_groups: int | None = None
    train_batchnorm: bool = False
    lowest_group_lr: float = 1.0


def two_phase_plan(recipe: RecipeConfig, num_groups: int | None = None) -> list[Phase]:
    """The phases of `recipe`, leaving out those with zero epochs.

    Args:
        recipe: the recipe.
        num_groups: how many layer groups the backbone has (to resolve `unfreeze_groups = -1`
            for gradual unfreezing). Defaults to None (then -1 unfreezes at once).

    Returns:
        "head" (frozen backbone), then "finetune" (top groups unfrozen) or, with
        `unfreeze = "gradual"`, "finetune_1", "finetune_2", ... unfreezing one more group each.
    """
    phases = [Phase("head", recipe.head_epochs, recipe.head_lr)]
    finetune = Phase(
        "finetune",
        recipe.finetune_epochs,
        recipe.finetune_lr,
        unfreeze_groups=recipe.unfreeze_groups,
        train_batchnorm=recipe.train_batchnorm,
        lowest_group_lr=recipe.discriminative_lr,
    )
    target = recipe.unfreeze_groups
    if target == -1 and num_groups is not None:
        target = num_groups
    if recipe.unfreeze == "gradual" and target > 1:
        remaining = recipe.finetune_epochs
        for count in range(1, target + 1):
            epochs = remaining if count == target else min(recipe.gradual_epochs, remaining)
            remaining -= epochs
            phases.append(
                dataclasses.replace(
                    finetune, name=f"finetune_{count}", epochs=epochs, unfreeze_groups=count
                )
            )
    else:
        phases.append(finetune)
    return [p for p in phases if p.epochs > 0]


class PhaseLogger(keras.callbacks.Callback):
    """Collects one history record per epoch, tagged with its phase and learning rate."""

    def __init__(self, phase: str, records: list[dict[str, Any]]):
        super().__init__()
        self.phase = phase
        self.records = records

    def on_epoch_end(self, epoch, logs=None):
        record: dict[str, Any] = {"phase": self.phase, "epoch": epoch + 1}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        lr = self.model.optimizer.learning_rate
        record["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        self.records.append(record)


def _callbacks(
    phase: Phase, recipe: RecipeConfig, records: list, has_val: bool, run_dir: Path | None
) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = [PhaseLogger(phase.name, records)]
    if has_val and recipe.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=recipe.early_stopping_patience,
                restore_best_weights=True,
            )
        )
    if run_dir is not None:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                run_dir / "checkpoints" / f"{phase.name}.weights.h5",
                monitor="val_loss" if has_val else "loss",
                save_best_only=True,
                save_weights_only=True,
            )
        )
    return callbacks


def fit_phases(
    model: keras.Model,
    spec: BackboneSpec,
    recipe: RecipeConfig,
    phases: list[Phase],
    train_data: tf.data.Dataset,
    val_data: tf.data.Dataset | None,
    *,
    run_dir: Path | None = None,
    class_weight: dict[int, float] | None = None,
    verbose: int | str = "auto",
) -> list[dict[str, Any]]:
    """Runs `phases` on `model` in order and returns the per-epoch history records.

    Args:
        model: a classifier made by `finetune.model.build_classifier`.
        spec: its backbone's registry entry (layer groups).
        recipe: optimizer, loss and early-stopping settings.
        phases: what to run (see `two_phase_plan`).
        train_data: batches of (pixels, one-hot labels), shuffled and augmented.
        val_data: validation batches, or None (then no early stopping).
        run_dir: where to checkpoint each phase's best weights. Defaults to None.
        class_weight: loss weight per class index, or None. Defaults to None.
        verbose: Keras' `fit` verbosity. Defaults to "auto".

    Returns:
        One dict per epoch: phase, epoch, loss, accuracy, val_loss, val_accuracy, learning_rate.
    """
    records: list[dict[str, Any]] = []
    epoch = 0
    for phase in phases:
        factors = None
        if phase.unfreeze_groups is None:
            freeze_backbone(model)
        else:
            groups = unfreeze_top_groups(
                model, spec, phase.unfreeze_groups, train_batchnorm=phase.train_batchnorm
            )
            if phase.lowest_group_lr != 1.0 and groups:
                factors = group_lr_multipliers(model, spec, groups, phase.lowest_group_lr)
        steps = int(train_data.cardinality())
        learning_rate = phase_learning_rate(
            recipe, phase.learning_rate, max(steps, 1), phase.epochs
        )
        optimizer = make_optimizer(recipe, learning_rate, lr_multipliers=factors)
        # Trainability changed: compile again so the train step sees it.
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=recipe.label_smoothing
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        if verbose:
            print(
                f"Phase '{phase.name}': up to {phase.epochs} epoch(s) at learning rate "
                f"{phase.learning_rate:g}",
                flush=True,
            )
        history = model.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=epoch,
            epochs=epoch + phase.epochs,
            callbacks=_callbacks(phase, recipe, records, val_data is not None, run_dir)
            + schedule_callbacks(recipe, val_data is not None),
            class_weight=class_weight,
            shuffle=False,  # the dataset shuffles itself, seeded
            verbose=verbose,
        )
        epoch += len(history.epoch)
    return records
