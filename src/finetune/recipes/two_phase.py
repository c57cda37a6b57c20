"""The two-phase recipe: train the head on a frozen backbone, then unfreeze the top and go on.

As in the Keras transfer-learning guide and fastai's `fine_tune`, the recipe is a short list of
`Phase`s, each one `compile` + `fit` on the same `keras.Model`: what is trainable changes between
phases, the optimizer and learning rate are new in each, and the epoch counter runs on so the
history reads as one training. Each phase stops early on the validation loss and restores its
best weights, and checkpoints its best weights in the run directory (atomically, with a
completion marker: `finetune.checkpoint`).

A phase without augmentation takes the fast path of `finetune.recipes.feature_cache`: what is
frozen (the backbone, or its groups below the trained ones) runs once, and what trains is fitted
on its stored output. An augmented one may have what is frozen run in a converted model batch by
batch as what trains is fitted on its output (`PhaseData.stream_images`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from finetune.backbones.registry import BackboneSpec
from finetune.checkpoint import (
    all_finite,
    finite_number,
    latest_checkpoint,
    save_checkpoint,
    weights_writer,
)
from finetune.config import RecipeConfig
from finetune.data.augment import Mixing
from finetune.data.pipeline import (
    epoch_permutation,
    image_dataset,
    steps_per_epoch,
    with_class_weights,
)
from finetune.errors import NonFiniteLossError
from finetune.fold import (
    bfloat16_parts,
    computes_in_bfloat16,
    describe_bfloat16,
    fold_batchnorm,
)
from finetune.inference import frozen_in_bfloat16, guarded_forward, resolve_runtime
from finetune.model import freeze_backbone, unfreeze_top_groups
from finetune.recipes.averaging import WeightAveraging
from finetune.recipes.discriminative import group_lr_multipliers
from finetune.recipes.feature_cache import (
    POOL_LAYER,
    FeatureStore,
    cut_layer,
    feature_dataset,
    has_random_layers,
    split_at_cut,
    split_at_pool,
    streamed_features,
)
from finetune.recipes.optimizers import build_optimizer, make_optimizer
from finetune.recipes.resume import (
    STATE_FILE,
    RestoreCallbackStates,
    ResumeState,
    assign_all,
    callback_states,
    save_state,
)
from finetune.recipes.schedules import phase_learning_rate, schedule_callbacks

# The images the frozen groups below a cut compute, counted at this size for choosing where
# they run while an augmented phase trains the top groups (`PhaseData.stream_images`).
STREAM_CUT_PIXELS = 224 * 224


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
        augment: whether the phase sees augmented training images. Defaults to True.
        until_plateau: if positive, the phase also ends (best weights restored) once the
            validation loss (the training loss without validation) has not improved by 1e-4
            for this many epochs; 0 runs all `epochs`. Defaults to 0.
        budget: phases with the same budget name share one epoch budget: each runs at most
            what the ones before it left. Defaults to None (the phase has its own `epochs`).
    """

    name: str
    epochs: int
    learning_rate: float
    unfreeze_groups: int | None = None
    train_batchnorm: bool = False
    lowest_group_lr: float = 1.0
    augment: bool = True
    until_plateau: int = 0
    budget: str | None = None


@dataclass
class PhaseData:
    """What the phases train on: decoded training (and validation) images and their batching.

    Args:
        train_images: uint8 pixels (N, H, W, 3).
        train_labels: class indices (N,).
        num_classes: number of classes.
        batch_size: images per step.
        val_images: validation pixels, or None. Defaults to None.
        val_labels: validation class indices, or None. Defaults to None.
        augmentation: layers applied to training batches of phases that augment, or None.
            Defaults to None.
        mixing: MixUp/CutMix step of phases that augment, or None. Defaults to None.
        seed: shuffle seed. Defaults to 0.
        feature_cache: let phases without augmentation train what trains on cached
            activations of what does not: the head on the frozen backbone's features, the top
            groups of a partly unfrozen backbone on the output of the frozen ones below.
            Defaults to True.
        feature_cache_max_memory_gb: cached features above this size go to a temporary file.
            Defaults to 2.
        train_paths: the file of each training image, to name the images of a batch whose
            loss is not finite. Defaults to None.
        runtime: what computes the cached (or streamed) features: "auto", "keras",
            "openvino", "openvino-bf16" or "onnxruntime" (see `finetune.inference`). Defaults
            to None (`FINETUNE_RUNTIME`, or "auto").
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    num_classes: int
    batch_size: int
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    augmentation: keras.Sequential | None = None
    mixing: Mixing | None = None
    seed: int = 0
    feature_cache: bool = True
    feature_cache_max_memory_gb: float = 2.0
    train_paths: list[str] | None = None
    runtime: str | None = None
    _datasets: dict[Any, tf.data.Dataset] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def has_val(self) -> bool:
        return self.val_labels is not None and len(self.val_labels) > 0

    @property
    def image_bytes(self) -> int:
        """Bytes per training image as held (height x width x channels, uint8)."""
        return int(np.prod(self.train_images.shape[1:])) * self.train_images.itemsize

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch: what `fit` on `train_dataset` needs as `steps_per_epoch`."""
        return steps_per_epoch(len(self.train_labels), self.batch_size)

    def train_dataset(self, augment: bool = True, first_epoch: int = 0) -> tf.data.Dataset:
        """Shuffled training batches of the epochs from `first_epoch` on, without end,
        augmented if `augment` and there is an augmentation (see `image_dataset`).

        `fit` it with `steps_per_epoch=self.steps_per_epoch` and `initial_epoch=first_epoch`.
        """
        augment = augment and self._has_augmentation
        return image_dataset(  # read batch by batch from the array: no copy of it in the graph
            self.train_images,
            self.train_labels,
            self.num_classes,
            batch_size=self.batch_size,
            training=True,
            augmentation=self.augmentation if augment else None,
            mixing=self.mixing if augment else None,
            seed=self.seed,
            first_epoch=first_epoch,
        )

    def one_epoch(self, augment: bool = False, epoch: int = 0) -> tf.data.Dataset:
        """The training batches of epoch `epoch` alone (e.g. to recompute BatchNorm)."""
        return self.train_dataset(augment, epoch).take(self.steps_per_epoch)

    def batch_files(self, epoch: int, step: int) -> list[str]:
        """The training files of batch `step` (0-based) of epoch `epoch` (0-based)."""
        order = epoch_permutation(len(self.train_labels), self.seed, epoch)
        rows = order[step * self.batch_size : (step + 1) * self.batch_size]
        if self.train_paths is None:
            return [f"training image #{i}" for i in rows]
        return [self.train_paths[i] for i in rows]

    def val_dataset(self) -> tf.data.Dataset | None:
        """Validation batches in order, or None without a validation split."""
        if not self.has_val:
            return None
        if "val" not in self._datasets:
            self._datasets["val"] = image_dataset(
                self.val_images, self.val_labels, self.num_classes, batch_size=self.batch_size
            )
        return self._datasets["val"]

    @property
    def _has_augmentation(self) -> bool:
        return self.augmentation is not None or self.mixing is not None

    def augments(self, phase: Phase) -> bool:
        """Whether `phase`'s training batches are augmented (or mixed)."""
        return phase.augment and self._has_augmentation

    def uses_feature_cache(self, phase: Phase) -> bool:
        """Whether `phase` may take the fast path: no augmentation, so the frozen part of the
        network (the backbone, or its groups below the trained ones) sees the same images every
        epoch and its output can be computed once (where the backbone can be cut: `fit_phases`)."""
        return self.feature_cache and not self.augments(phase)

    def stream_images(self, phase: Phase, cut: str | None = POOL_LAYER) -> int:
        """How many forward passes of the frozen part a converted model would compute while
        what is above `cut` trains in `phase` (augmented: nothing can be cached), counted as
        the runtime is chosen for them (`finetune.inference.resolve_runtime`); 0 when the phase
        cannot stream or Keras is chosen (training through the frozen part is then as fast).

        The head (`cut` is `POOL_LAYER`): the training images times the epochs, from any
        converted runtime. The top groups (`cut` a backbone layer, see `cut_layer`): counted in
        images of 224 x 224 pixels (`STREAM_CUT_PIXELS`), from bfloat16 OpenVINO only
        (`streams_from`). Their own step is most of the time there, so what streaming saves
        grows with the pixels the frozen groups compute while the conversion costs the same:
        1.07-1.20 / 1.23-1.26 / 1.23-1.33x a step at 64 / 128 / 224 px (two runs); whole
        phases of 2,250 images 0.90-0.92x at 64 and 128 px, 1.05-1.12x at 224 px, and
        1.12-1.13x at 128 px over 6,750 image-epochs (benchmarks/RESULTS.md, twelfth slice);
        ONNX Runtime saved too little (1.04-1.08x a step, fifth slice). Under "auto" on a CPU
        with bfloat16, with BatchNorm frozen, they do not stream: there the phase trains
        through the network in bfloat16 (`frozen_in_bfloat16`), 1.11-1.40x as fast a step as
        streamed with the top groups in float32 (two runs; twentieth slice). (Should the
        first batch's check refuse bfloat16 there, the phase trains through the network in
        float32, slower than streamed would have been.) With BatchNorm training
        (`train_batchnorm`) too, since its pairs train in bfloat16 as well (`MixedTrainingPair`):
        0.93-1.06 / 1.18-1.19 / 1.28-1.41x as fast a step at 64 / 128 / 224 px as streamed
        with the top groups in float32 (three rounds; twenty-second slice)."""
        from finetune.inference import resolve_runtime

        if cut is None or not (self.feature_cache and self.augments(phase)):
            return 0
        if cut != POOL_LAYER and frozen_in_bfloat16(self.runtime):
            return 0
        images = len(self.train_images) * phase.epochs
        if cut != POOL_LAYER:
            height, width = self.train_images.shape[1:3]
            images = images * height * width // STREAM_CUT_PIXELS
        chosen = resolve_runtime(self.runtime, images, features=True)
        return images if streams_from(chosen, cut) else 0


# How many training images the first-batch check of a view computing its frozen part in
# bfloat16 runs, eagerly, in both precisions (0.2-0.65 s for Lite0 at 64-224 px, measured
# with another job running; once per phase).
BF16_CHECK_IMAGES = 8


def bfloat16_stays_close(reference: keras.Model, view: keras.Model, images: np.ndarray) -> bool:
    """Whether `view` (`fold_batchnorm(..., bfloat16=True)`) computes the first
    `BF16_CHECK_IMAGES` of `images` within `BF16_FEATURE_TOLERANCE` of `reference` (the same
    view in float32), in inference mode, measured as bfloat16 features from a converted model
    are checked (`finetune.inference.bfloat16_difference`). Where it does not, the caller
    computes in float32 (as `auto` falls back from bfloat16 OpenVINO, silently)."""
    from finetune.inference import BF16_FEATURE_TOLERANCE, bfloat16_difference

    x = tf.convert_to_tensor(np.asarray(images[:BF16_CHECK_IMAGES], np.float32))
    out = keras.ops.convert_to_numpy(view(x, training=False))
    expected = keras.ops.convert_to_numpy(reference(x, training=False))
    return bfloat16_difference(out, expected, features=True) <= BF16_FEATURE_TOLERANCE


def frozen_view(
    model: keras.Model,
    images: np.ndarray,
    *,
    bfloat16: bool,
    frozen_only: bool = True,
    train: bool = False,
) -> tuple[keras.Model, bool]:
    """`fold_batchnorm(model, frozen_only=frozen_only, snapshot=True)`, or with `bfloat16` its
    bfloat16 view (with `train`, the pairs that train in bfloat16 too: `train_in_bfloat16`)
    where that computes anything in bfloat16 and passes `bfloat16_stays_close` on `images`;
    and whether the bfloat16 view is the one returned."""
    view = fold_batchnorm(model, frozen_only=frozen_only, snapshot=True)
    if not bfloat16:
        return view, False
    low = fold_batchnorm(
        model, frozen_only=frozen_only, snapshot=True, bfloat16=True, train_in_bfloat16=train
    )
    if computes_in_bfloat16(low) and bfloat16_stays_close(view, low, images):
        return low, True
    return view, False


def streams_from(runtime: str, cut: str) -> bool:
    """Whether an augmented phase streams the frozen part below `cut` from `runtime` (see
    `PhaseData.stream_images`): the backbone (`POOL_LAYER`) from any converted runtime, the
    groups below the top ones from bfloat16 OpenVINO on a CPU with it only."""
    from finetune.inference import cpu_has_bfloat16

    if runtime == "keras":
        return False
    return cut == POOL_LAYER or (runtime == "openvino-bf16" and cpu_has_bfloat16())


def two_phase_plan(recipe: RecipeConfig, num_groups: int | None = None) -> list[Phase]:
    """The phases of `recipe`, leaving out those with zero epochs.

    Args:
        recipe: the recipe.
        num_groups: how many layer groups the backbone has (to resolve `unfreeze_groups = -1`
            for gradual unfreezing). Defaults to None (then -1 unfreezes at once).

    Returns:
        "head" (frozen backbone), then "finetune" (top groups unfrozen) or, with
        `unfreeze = "gradual"`, "finetune_1", "finetune_2", ... unfreezing one more group each
        every `gradual_epochs`; with `unfreeze = "plateau"`, the same steps each ending when
        the loss stops improving for `plateau_patience` epochs, all sharing `finetune_epochs`.
    """
    phases = [Phase("head", recipe.head_epochs, recipe.head_lr, augment=recipe.head_augment)]
    finetune = Phase(
        "finetune",
        recipe.finetune_epochs,
        recipe.finetune_lr,
        unfreeze_groups=recipe.unfreeze_groups,
        train_batchnorm=recipe.train_batchnorm,
        lowest_group_lr=recipe.discriminative_lr,
    )
    target = recipe.unfreeze_groups
    if num_groups is not None and (target == -1 or target > num_groups):
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
    elif recipe.unfreeze == "plateau" and target > 1:
        for count in range(1, target + 1):
            phases.append(
                dataclasses.replace(
                    finetune,
                    name=f"finetune_{count}",
                    unfreeze_groups=count,
                    until_plateau=max(1, recipe.plateau_patience) if count < target else 0,
                    budget="finetune",
                )
            )
    else:
        phases.append(finetune)
    return [p for p in phases if p.epochs > 0]


class PhaseLogger(keras.callbacks.Callback):
    """Collects one history record per epoch, tagged with its phase and learning rate, and
    with `marks` (how the epoch trained: features cached or streamed, bfloat16), so that each
    record says what its own process did (a resumed phase may run otherwise)."""

    def __init__(
        self, phase: str, records: list[dict[str, Any]], marks: dict[str, Any] | None = None
    ):
        super().__init__()
        self.phase = phase
        self.records = records
        self.marks = dict(marks or {})

    def on_epoch_end(self, epoch, logs=None):
        record: dict[str, Any] = {"phase": self.phase, "epoch": epoch + 1, **self.marks}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        lr = self.model.optimizer.learning_rate
        record["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        self.records.append(record)


class BestWeightsCheckpoint(keras.callbacks.Callback):
    """Saves the classifier's weights (no optimizer state) whenever the monitored value improves.

    Unlike Keras' `ModelCheckpoint`, the file is written through a synced temporary file and a
    rename, with a completion marker (`finetune.checkpoint.save_checkpoint`), and the previous
    complete checkpoint is kept until the new one is complete. A non-finite monitored value or
    weights holding NaN or infinity are never saved. The classifier is saved even while `fit`
    trains only its head on cached features.

    Args:
        classifier: the model whose weights are saved.
        path: the `.weights.h5` file.
        monitor: the epoch log to minimise ("val_loss" or "loss").
        phase: the phase name, recorded in the marker.
    """

    def __init__(self, classifier: keras.Model, path: Path, monitor: str, phase: str):
        super().__init__()
        self.classifier = classifier
        self.path = Path(path)
        self.monitor = monitor
        self.phase = phase
        self.best = float("inf")

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if not finite_number(value) or not float(value) < self.best:
            return
        weights = [keras.ops.convert_to_numpy(v) for v in self.classifier.weights]
        if not all_finite(weights):
            return
        save_checkpoint(
            self.path,
            # The weights only, as the head's checkpoint always was: a third of the file with
            # Adam's moments, and quicker to write every epoch (resume.npz holds the moments).
            weights_writer(self.classifier, optimizer=False),
            phase=self.phase,
            epoch=epoch + 1,
            monitor=self.monitor,
            value=float(value),
        )
        self.best = float(value)


def _finite_check(variables) -> Callable[[], tf.Tensor]:
    """A graph that tells whether every one of `variables` is finite, reading them as they are.

    The variables are captured, not passed: passing ~150 of them to a `tf.function` on every
    call cost ~25 ms a step (EfficientNet-Lite0), the captured graph ~3.5 ms. One
    `own_function` per phase: no retracing warning in a process that trains many.
    """
    from finetune.inference import own_function

    return own_function(_all_finite, [v.value for v in variables])


def _all_finite(variables) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops training at the first batch whose loss, or whose updated weights, are not finite.

    Keras' `TerminateOnNaN` lets the batch end and the epoch be closed (validated, checkpointed,
    early-stopping weights restored); this raises `NonFiniteLossError` at once instead, naming
    the files of that batch (the pipeline's order depends only on seed and epoch, see
    `PhaseData.batch_files`) and the last complete checkpoint, which the non-finite weights
    never reach. The `fit` ends without its `on_train_end`, so nothing is restored or saved.

    Args:
        phase: the phase name, for the message.
        data: the phase's data (to name the batch's files).
        run_dir: the run directory (to name the last good checkpoint), or None.
    """

    def __init__(self, phase: str, data: PhaseData, run_dir: Path | None):
        super().__init__()
        self.phase, self.data, self.run_dir = phase, data, run_dir
        self.epoch = 0

    def on_train_begin(self, logs=None):
        self._weights_finite = _finite_check(self.model.trainable_variables)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not finite_number(loss):
            what = f"the training loss became {float(loss)}"
        elif not bool(self._weights_finite()):
            what = "the weights became NaN or infinite in its update (its loss was still finite)"
        else:
            return
        files = self.data.batch_files(self.epoch, batch)
        steps = self.params.get("steps") if self.params else None
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        checkpoint = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        if checkpoint is not None:
            path, marker = checkpoint
            kept = (
                f"The last good weights are in {path} (phase '{marker.get('phase')}', epoch "
                f"{marker.get('epoch')}); the run is not finished (no model.keras)."
            )
        else:
            kept = "No checkpoint was saved before it; the run is not finished."
        raise NonFiniteLossError(
            f"training stopped: {what} in phase '{self.phase}', epoch {self.epoch + 1}, batch "
            f"{batch + 1}{f' of {steps}' if steps else ''} (learning rate {lr:.3g}). "
            f"The batch held {len(files)} image(s): {shown}. {kept} Lower the learning rate "
            "(--head-lr, --finetune-lr, or --lr auto), check these images, and train again.",
            files,
            checkpoint[0] if checkpoint is not None else None,
        )


def _callbacks(
    phase: Phase,
    recipe: RecipeConfig,
    records: list,
    has_val: bool,
    run_dir: Path | None,
    classifier: keras.Model,
    average_last_epochs: int = 0,
    batchnorm_batches: Callable[[], Any] | None = None,
    marks: dict[str, Any] | None = None,
) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = [PhaseLogger(phase.name, records, marks)]
    if phase.until_plateau:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss" if has_val else "loss",
                min_delta=1e-4,
                patience=phase.until_plateau,
                restore_best_weights=True,
            )
        )
    if average_last_epochs:  # early stopping would restore one epoch over the average
        callbacks.append(WeightAveraging(average_last_epochs, records, batchnorm_batches))
    elif has_val and recipe.early_stopping_patience:
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
            BestWeightsCheckpoint(
                classifier,
                run_dir / "checkpoints" / f"{phase.name}.weights.h5",
                monitor="val_loss" if has_val else "loss",
                phase=phase.name,
            )
        )
    return callbacks + schedule_callbacks(recipe, has_val)


def compile_phase(model: keras.Model, recipe: RecipeConfig, optimizer) -> None:
    """Compiles for a phase: cross-entropy on logits with the recipe's label smoothing.

    The optimizer is built here, on the variables `fit` will train (`build_optimizer`), unless
    it already is (the classifier compiled with the optimizer of the model `fit` trains).
    """
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=recipe.label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    build_optimizer(model)


class _Features:
    """The output of the frozen part of the classifier (the backbone up to its pooling layer, or
    up to the cut below its trained groups) for the training and validation images, computed
    on first use."""

    def __init__(self, model: keras.Model, data: PhaseData, spill_dir: Path | None):
        self.model, self.data = model, data
        self.store = FeatureStore(int(data.feature_cache_max_memory_gb * 1024**3), spill_dir)
        # The training batches from a first epoch on, and the validation batches.
        self.datasets: tuple[Callable[[int], tf.data.Dataset], tf.data.Dataset | None] | None
        self.datasets = None
        self.layer: str | None = None  # whose output `datasets` holds
        self.runtime = ""  # what computed the features: "keras", "openvino", ...

    def forget(self) -> None:
        """Drops the features (the backbone is about to change, or they are no longer needed)."""
        self.datasets, self.layer = None, None
        self.store.close()

    def split(self, layer: str) -> tuple[keras.Model, keras.Model] | None:
        """(frozen part, trained part) of the classifier cut after `layer` (`POOL_LAYER`, or a
        backbone layer from `cut_layer`); None when the frozen part has a layer that is random
        while training (then computing its output once is not the same training)."""
        if layer == POOL_LAYER:
            # A backbone with dropout inside: cached anyway, the head then trains on clean
            # features (see finetune.recipes.feature_cache).
            return split_at_pool(self.model)
        lower, top = split_at_cut(self.model, layer)
        if has_random_layers(lower):
            return None
        # The top's frozen BatchNorm layers folded, as `fold_batchnorm(model)` trains it.
        return lower, fold_batchnorm(top, snapshot=True)

    def head_and_datasets(self, layer: str = POOL_LAYER):
        """(what trains, its training batches from a first epoch on, its validation batches)
        on cached outputs of `layer`, or None (see `split`)."""
        parts = self.split(layer)
        if parts is None:
            return None
        extractor, head = parts
        if self.layer != layer:
            self.forget()
        if self.datasets is None:
            d = self.data
            total = len(d.train_images) + (len(d.val_images) if d.has_val else 0)
            # bfloat16 for the head's features (as measured); the top groups' input in float32.
            float32 = layer != POOL_LAYER
            # Keras filling the head's cache computes in bfloat16 too, where "auto" would.
            bfloat16 = (
                not float32
                and frozen_in_bfloat16(d.runtime)
                and resolve_runtime(d.runtime, total, features=True) == "keras"
            )
            fast, bfloat16 = frozen_view(  # inference only
                extractor, d.train_images, bfloat16=bfloat16, frozen_only=False
            )
            forward = guarded_forward(
                extractor, fast, d.runtime, total, features=True, float32=float32
            )
            train = self.store.compute(fast, d.train_images, d.batch_size, "train", forward)

            def train_from(first_epoch: int, augment: bool = False, train=train):
                # `augment` as for streamed outputs (`streamed`); cached ones are unaugmented.
                return feature_dataset(
                    train, d.train_labels, d.num_classes, batch_size=d.batch_size,
                    training=True, seed=d.seed, first_epoch=first_epoch,
                )  # fmt: skip

            self.runtime = getattr(forward, "runtime", "keras-bf16" if bfloat16 else "keras")
            self.datasets = (train_from, self._val_features(fast, forward))
            self.layer = layer
        return head, *self.datasets

    def _val_features(self, fast: keras.Model, forward) -> tf.data.Dataset | None:
        d = self.data
        if not d.has_val:
            return None
        val = self.store.compute(fast, d.val_images, d.batch_size, "val", forward)
        return feature_dataset(val, d.val_labels, d.num_classes, batch_size=d.batch_size)

    def streamed(self, augment: bool, images: int, layer: str = POOL_LAYER):
        """What trains above `layer` (the head, or the top groups), its augmented training
        batches turned into `layer`'s output on the fly by the converted model chosen for
        `images` forward passes (`PhaseData.stream_images`), from a first epoch on (and with
        `augment=False`: the plain ones, for recomputing BatchNorm statistics), and the
        validation outputs (computed once); None when it cannot be done: the frozen part is
        random while training (dropout inside it), or the runtime fell back to Keras (then
        training through the frozen part is as fast and exact), or, at a cut below the top
        groups, to anything but bfloat16 OpenVINO (see `PhaseData.stream_images`)."""
        # Unlike a cache fill, streaming needs a frozen part without dropout at the pool too.
        parts = split_at_pool(self.model) if layer == POOL_LAYER else self.split(layer)
        if parts is None or has_random_layers(parts[0]):
            return None
        extractor, trained = parts
        self.forget()  # other features, if any, are not needed any more
        d = self.data
        fast = fold_batchnorm(extractor, frozen_only=False, snapshot=True)
        forward = guarded_forward(extractor, fast, d.runtime, images, features=True)
        forward(np.asarray(d.train_images[: d.batch_size], np.float32))  # the check, here
        runtime = getattr(forward, "runtime", "keras")
        if not streams_from(runtime, layer):  # the check refused bfloat16, or fell to Keras
            return None
        width = int(np.prod(extractor.output.shape[1:]))

        def train_from(first_epoch: int, augment: bool = augment) -> tf.data.Dataset:
            return streamed_features(d.train_dataset(augment, first_epoch), forward, width)

        self.runtime = runtime
        return trained, train_from, self._val_features(fast, forward)


def fit_phases(
    model: keras.Model,
    spec: BackboneSpec,
    recipe: RecipeConfig,
    phases: list[Phase],
    data: PhaseData,
    *,
    run_dir: Path | None = None,
    class_weight: dict[int, float] | None = None,
    verbose: int | str = "auto",
    extra_callbacks: Callable[[Phase], list[keras.callbacks.Callback]] | None = None,
    resume: ResumeState | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Runs `phases` on `model` in order and returns the per-epoch history records.

    Args:
        model: a classifier made by `finetune.model.build_classifier`.
        spec: its backbone's registry entry (layer groups).
        recipe: optimizer, loss and early-stopping settings.
        phases: what to run (see `two_phase_plan`).
        data: the training and validation images and their batching (see `PhaseData`).
        run_dir: where to checkpoint each phase's best weights, and the state to resume from
            after every epoch and phase (`checkpoints/resume.npz`, see
            `finetune.recipes.resume`). Defaults to None.
        class_weight: loss weight per class index, or None. Defaults to None. Each sample is
            weighted by `labels @ weights`, which for one-hot labels is Keras' `class_weight`
            and for MixUp/CutMix labels mixes the two classes' weights in the same proportion
            (Keras' own `class_weight` would take the dominant class only).
        verbose: Keras' `fit` verbosity. Defaults to "auto".
        extra_callbacks: returns more callbacks for a phase's `fit` (e.g. TensorBoard logs per
            phase). Defaults to None.
        resume: a saved state (`finetune.recipes.resume.load_state`) to go on from: the phases
            before it are skipped, and the one it stopped in goes on from its last complete
            epoch with everything as it was. Defaults to None (start at the beginning).
        fingerprint: what the saved states record about the config and data (for refusing a
            resume with them changed). Defaults to None.

    Returns:
        One dict per epoch: phase, epoch, loss, accuracy, val_loss, val_accuracy, learning_rate,
        and `features_cached` (True when the phase trained on cached features: the head on the
        backbone's, or the top groups on the frozen groups'; `features_layer` then names the
        layer whose output they are, and `features_runtime` says which runtime computed them:
        "keras", "keras-bf16" (Keras in bfloat16: `finetune.inference.frozen_in_bfloat16`),
        "openvino", "openvino-bf16" or "onnxruntime", as they do with `features_streamed`,
        True when an augmented phase took that output from a converted model batch by batch:
        the head's, or the top groups'); `frozen_bfloat16`, True when a phase trained through
        frozen layers that Keras computed in bfloat16; `trained_bfloat16`, True when its
        layers that train computed in bfloat16 (mixed precision: float32 weights); with
        `recipe.average_last_epochs`, `averaged` on the epochs whose mean the final phase ends
        with (`finetune.recipes.averaging`; that phase then has no early stopping).
    """
    records: list[dict[str, Any]] = []
    epoch = 0
    features = _Features(model, data, run_dir)
    budgets: dict[str, int] = {}
    for p in phases:
        if p.budget is not None:
            budgets[p.budget] = max(budgets.get(p.budget, 0), p.epochs)
    state_path = run_dir / "checkpoints" / STATE_FILE if run_dir is not None else None
    if resume is not None:
        records = [dict(r) for r in resume.meta["records"]]
        epoch = int(resume.meta["epoch"])
        budgets = {k: int(v) for k, v in resume.meta["budgets"].items()}
        assign_all(model.variables, resume.array_list("model"), "model", resume.path)

    def save(meta: dict[str, Any], fit_model: keras.Model, callbacks=None) -> None:
        if state_path is None:
            return
        lists = {
            "model": [keras.ops.convert_to_numpy(v) for v in model.variables],
        }
        states: list[dict[str, Any]] = []
        if callbacks is not None:
            lists["optimizer"] = [
                keras.ops.convert_to_numpy(v) for v in fit_model.optimizer.variables
            ]
            states, held = callback_states(callbacks)
            lists.update(held)
        base = {"records": records, "budgets": budgets, "fingerprint": fingerprint or {}}
        save_state(state_path, base | meta | {"callbacks": states}, lists)

    try:
        for index, phase in enumerate(phases):
            going_on = resume is not None and index == resume.meta["phase_index"]
            if resume is not None and (
                index < resume.meta["phase_index"] or (going_on and resume.meta["phase_done"])
            ):
                continue
            if phase.budget is not None:
                phase = dataclasses.replace(phase, epochs=min(phase.epochs, budgets[phase.budget]))
                if phase.epochs <= 0:
                    continue
            factors = None
            # Below `cut` nothing trains: its output may be computed once (no augmentation),
            # and only what is above it trained on that. Augmented, the frozen part may run in
            # a converted model as what is above it trains (`PhaseData.stream_images`).
            cut: str | None = POOL_LAYER
            if phase.unfreeze_groups is None:
                freeze_backbone(model)
            else:
                groups = unfreeze_top_groups(
                    model, spec, phase.unfreeze_groups, train_batchnorm=phase.train_batchnorm
                )
                if phase.lowest_group_lr != 1.0 and groups:
                    factors = group_lr_multipliers(model, spec, groups, phase.lowest_group_lr)
                # Stored as float32, no larger than the images themselves.
                cut = cut_layer(model, spec, groups, data.image_bytes)
            split = streamed = None
            frozen_bfloat16 = trained_bfloat16 = False
            if cut is not None and data.uses_feature_cache(phase):
                split = features.head_and_datasets(cut)
            elif stream_images := data.stream_images(phase, cut):
                assert cut is not None
                streamed = features.streamed(phase.augment, stream_images, cut)
            cached = split is not None
            if split is not None:
                fit_model, train_from, val_ds = split
            elif streamed is not None:
                # Augmented: the frozen part's forward pass in a converted model, what is above
                # it in Keras on its output (the same training up to rounding, faster).
                fit_model, train_from, val_ds = streamed
            else:
                # The same layers and weights, with each frozen BatchNorm folded into the
                # convolution before it: the same training, with a faster forward pass.
                # Under "auto" on a CPU with bfloat16, what is frozen below everything that
                # trains computes in bfloat16 (`frozen_in_bfloat16`), and so do the folded
                # pairs that train and each convolution with a BatchNorm that trains after it,
                # in mixed precision (float32 variables, statistics and gradients).
                fit_model, _ = frozen_view(
                    model,
                    data.train_images,
                    bfloat16=frozen_in_bfloat16(data.runtime),
                    train=True,
                )
                frozen_bfloat16, trained_bfloat16 = bfloat16_parts(fit_model)
                train_from = functools.partial(data.train_dataset, phase.augment)
                val_ds = data.val_dataset()
            steps = data.steps_per_epoch
            learning_rate = phase_learning_rate(
                recipe, phase.learning_rate, max(steps, 1), phase.epochs
            )
            # Trainability changed: compile again so the train step sees it.
            optimizer = make_optimizer(recipe, learning_rate, lr_multipliers=factors)
            compile_phase(fit_model, recipe, optimizer)
            on_features = cached or streamed is not None
            if fit_model is not model and not (on_features and cut == POOL_LAYER):
                # The classifier itself, as a user gets it back: compiled like the model that
                # trained it, with the same optimizer (whose state it saves).
                compile_phase(model, recipe, optimizer)
            phase_start, first_epoch, last_epoch = epoch, epoch, epoch + phase.epochs
            if going_on:
                assert resume is not None
                phase_start = int(resume.meta["phase_start"])
                first_epoch = int(resume.meta["epoch"])
                last_epoch = phase_start + phase.epochs
                if resume.meta["stop_training"]:
                    last_epoch = first_epoch  # early stopping had ended it: only finish it
                assign_all(
                    optimizer.variables, resume.array_list("optimizer"), "optimizer", resume.path
                )
            if verbose:
                how, what = "", "head" if cut == POOL_LAYER else f"top groups (above {cut})"
                if cached:
                    how = f" ({what} on cached features, computed by {features.runtime})"
                elif streamed is not None:
                    how = f" ({what} on features computed by {features.runtime} as it goes)"
                elif frozen_bfloat16 or trained_bfloat16:
                    how = f" ({describe_bfloat16(frozen_bfloat16, trained_bfloat16)})"
                again = f", going on after epoch {first_epoch}" if going_on else ""
                print(
                    f"Phase '{phase.name}': up to {phase.epochs} epoch(s) at learning rate "
                    f"{phase.learning_rate:g}{how}{again}",
                    flush=True,
                )
            # How each epoch of this phase trains, in its history record (`PhaseLogger`).
            marks: dict[str, Any] = {"features_cached": cached}
            if on_features:
                marks |= {"features_runtime": features.runtime, "features_layer": cut}
            if streamed is not None:
                marks["features_streamed"] = True
            if frozen_bfloat16:
                marks["frozen_bfloat16"] = True
            if trained_bfloat16:
                marks["trained_bfloat16"] = True
            train_ds = train_from(first_epoch)
            if class_weight:
                train_ds = with_class_weights(train_ds, class_weight, data.num_classes)
            callbacks = (
                [StopOnNonFinite(phase.name, data, run_dir)]
                + _callbacks(
                    phase,
                    recipe,
                    records,
                    val_ds is not None,
                    run_dir,
                    model,
                    recipe.average_last_epochs if index == len(phases) - 1 else 0,
                    # BatchNorm statistics are recomputed by running what `fit` trains on an
                    # epoch of what it trains on (cached or streamed features for the top
                    # groups; streamed without augmentation).
                    (lambda at=first_epoch, f=train_from, n=steps: f(at, False).take(n))
                    if on_features
                    else (lambda at=first_epoch: data.one_epoch(augment=False, epoch=at)),
                    marks,
                )
                + (extra_callbacks(phase) if extra_callbacks else [])
            )
            if going_on:
                assert resume is not None
                callbacks.append(RestoreCallbackStates(list(callbacks), resume))
            position = {"phase_index": index, "phase_name": phase.name, "phase_start": phase_start}

            def after_epoch(done: int, stop: bool, cbs=callbacks, fm=fit_model, at=position):
                save(at | {"epoch": done, "phase_done": False, "stop_training": stop}, fm, cbs)

            callbacks.append(_AfterEpoch(after_epoch))
            fit_model.fit(
                train_ds,
                steps_per_epoch=steps,
                validation_data=val_ds,
                initial_epoch=first_epoch,
                epochs=last_epoch,
                callbacks=callbacks,
                shuffle=False,  # the dataset shuffles itself, seeded
                verbose=verbose,
            )
            ran = 0
            for record in records:
                if record["phase"] == phase.name:
                    ran += 1
                    if "features_cached" not in record:  # saved by a version that marked later
                        record.update(marks)
            epoch = phase_start + ran
            if phase.budget is not None:
                budgets[phase.budget] -= ran
            if not cached:
                # Layers below the cut may have changed: cached features would be stale. (A
                # cached phase trained only above its cut: its features stay valid.)
                features.forget()
            # Nothing of this phase's datasets is held into the next one (whose features may be
            # computed at another cut).
            train_ds = val_ds = train_from = split = streamed = None
            save(position | {"epoch": epoch, "phase_done": True, "stop_training": False}, model)
    finally:
        features.forget()
    return records


class _AfterEpoch(keras.callbacks.Callback):
    """Calls `save(epochs_done, stop_training)` at the end of every epoch, after the others."""

    def __init__(self, save: Callable[[int, bool], None]):
        super().__init__()
        self.save = save

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1, bool(self.model.stop_training))
