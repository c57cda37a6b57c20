"""A run: the fine-tuned model with everything needed to trust and reuse it.

A run directory holds `model.keras`, `config.toml` (the resolved config), `run.json` (class
names, image size, data folder, versions), `split.json`, `history.json`, `metrics.json` and
`bad_files.json`. `Run` is the same thing in memory; `Run.load` reads a directory back (the model
with Keras' safe mode).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.config import Config, load_config
from finetune.errors import FinetuneError
from finetune.kept import MODEL_FILE, file_sha256
from finetune.probabilities import probabilities_from_views, softmax  # noqa: F401 (re-exported)
from finetune.runs import model_facts, phase_spans  # noqa: F401 (phase_spans re-exported)

# From this many images (test-time augmentation views counted) on, `predict` in Keras (CPUs
# without bfloat16, `--runtime keras`) runs a view with the weights compiled in
# (`Run.inference_model`): checking that they have not changed cost about as much as what the
# view saves on 1.5-3.5 batches of 32 when the check was a 30 ms hash (Lite0); it is a CRC now
# (`Run.weights_checksum`: 5-12 ms), and the bound was not measured again.
SNAPSHOT_MIN_IMAGES = 256


def save_model_atomic(model: keras.Model, path: Path) -> str:
    """Saves a `.keras` file through a synced temporary file and a rename.

    Returns:
        The sha256 of the bytes written (read back before the rename).

    Raises:
        DiskFullError: the disk filled up; `path` is unchanged.
    """
    from finetune.atomic import write_file_atomic

    digests = []

    def write(tmp: Path) -> None:
        model.save(tmp)
        digests.append(file_sha256(tmp))

    write_file_atomic(path, write)
    return digests[0]


def keras_verbosity(progress: bool) -> int:
    """Keras' `verbose`: a live bar in a terminal, one line per epoch in logs, or nothing."""
    if not progress:
        return 0
    return 1 if sys.stdout.isatty() else 2


@dataclass
class Run:
    """A fine-tuned classifier and its record.

    Args:
        model: the `keras.Model` (pixels in [0, 255] -> logits).
        config: the resolved `Config` it was trained with.
        class_names: output classes, index order.
        image_size: the input side in pixels.
        path: the run directory, when saved.
        history: one record per epoch (phase, epoch, loss, accuracy, val_loss, ...).
        metrics: test metrics (see `finetune.evaluate.classification_metrics`).
        info: the content of `run.json`.
        temperature: divides the logits before the softmax (temperature scaling, fitted on the
            validation split by `--calibrate`; see `finetune.calibration`). Defaults to 1.
    """

    model: keras.Model
    config: Config
    class_names: list[str]
    image_size: int
    path: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    _fast: tuple[keras.Model, keras.Model] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _snapshot: tuple[keras.Model, int, keras.Model] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _converted: tuple[keras.Model, tuple[str, str], int, Any] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _watch: Any = field(default=None, init=False, repr=False, compare=False)
    last_runtime: str = field(default="", init=False, repr=False, compare=False)

    def inference_model(self, num_images: int = 0) -> keras.Model:
        """`model` with every BatchNorm folded into its convolution, for predicting
        `num_images` images now.

        The same function and the same weights, about 1.6x as fast; see `finetune.fold`. Not
        for training. For fewer than `SNAPSHOT_MIN_IMAGES` images it reads the weights on
        every call, so it follows any change to them. From there on its weights are compiled
        in (`fold_batchnorm(..., snapshot=True)`: 1.11-1.45x as fast again on Lite0): it is
        kept while `weights_checksum`, compared on each call of this method, stays the same,
        and made again when it changes; use it right away.
        """
        from finetune.fold import fold_batchnorm

        if self._fast is None or self._fast[0] is not self.model:
            self._fast = (self.model, fold_batchnorm(self.model, frozen_only=False))
        live = self._fast[1]
        if num_images < SNAPSHOT_MIN_IMAGES or live is self.model:  # small, or nothing folds
            return live
        checksum = self.weights_checksum()
        kept = self._snapshot
        if kept is None or kept[0] is not self.model or kept[1] != checksum:
            fast = fold_batchnorm(self.model, frozen_only=False, snapshot=True)
            self._snapshot = kept = (self.model, checksum, fast)
        return kept[2]

    def weights_checksum(self) -> int:
        """A CRC-32 of the model's weights now (`finetune.inference.WeightsWatch`: about 12 ms
        for Lite0 on the first call, 5 ms from the third): what the views and converted models
        this run keeps for its weights (`inference_model`, `prediction_forward`) are checked
        against."""
        from finetune.inference import WeightsWatch

        if self._watch is None or self._watch.model is not self.model:
            self._watch = WeightsWatch(self.model)
        return self._watch()

    @classmethod
    def load(cls, path: str | Path, compile: bool = True) -> Run:
        """Reads a run directory written by `finetune.train`.

        Args:
            path: the run directory.
            compile: restore the model's training configuration and optimizer state as saved;
                False loads it for inference only (faster, and a model built from it, such as
                an ensemble, does not carry the optimizer). Defaults to True.

        Raises:
            FinetuneError: the folder is not a complete run directory.
        """
        from finetune.untrusted import load_keras_model, read_json

        path = Path(path)
        model_file = path / MODEL_FILE
        if not model_file.is_file():
            raise FinetuneError(
                f"{path} is not a run directory: {MODEL_FILE} is missing. "
                "Give the --out folder of a finished `finetune train`."
            )

        def read(name: str, default: Any = None) -> Any:
            f = path / name
            if not f.is_file():
                if default is None:
                    raise FinetuneError(
                        f"{path} is not a complete run directory: {name} is missing."
                    )
                return default
            return read_json(f)

        info = read("run.json")
        class_names, image_size, temperature = model_facts(info)
        # Checked before Keras sees it (no Lambda, no code, no outside references), then safe mode.
        model = load_keras_model(model_file, compile=compile)
        return cls(
            model=model,
            config=load_config(path / "config.toml"),
            class_names=class_names,
            image_size=image_size,
            path=path,
            history=read("history.json", []),
            metrics=read("metrics.json", {}),
            info=info,
            temperature=temperature,
        )

    def predict_logits(
        self,
        images: np.ndarray,
        batch_size: int = 64,
        progress: bool = False,
        runtime: str | None = None,
    ) -> np.ndarray:
        """The model's raw outputs (before temperature and softmax) for RGB images in [0, 255]."""
        return self.predict_view_logits(images, batch_size, progress, runtime=runtime)[0]

    def predict_proba(
        self,
        images: np.ndarray,
        batch_size: int = 64,
        progress: bool = False,
        tta: int = 1,
        temperature: float | None = None,
        runtime: str | None = None,
    ) -> np.ndarray:
        """Class probabilities for uint8/float RGB images of the run's input size.

        The probabilities are calibrated when the run was trained with `--calibrate`: the
        logits are divided by `temperature` before the softmax.

        Args:
            images: (N, size, size, 3) RGB pixels in [0, 255].
            batch_size: images per forward pass. Defaults to 64.
            progress: show Keras' progress bar. Defaults to False.
            tta: test-time augmentation: average the probabilities of the images and of
                `tta - 1` copies transformed by the run's own training augmentation (seeded,
                so repeatable). Defaults to 1 (no augmentation).
            temperature: divide the logits by this instead of the run's `temperature` (1.0
                gives the uncalibrated probabilities). Defaults to None (the run's).
            runtime: "keras"; "openvino", "openvino-bf16" or "onnxruntime" (the model
                converted, checked against Keras on the first batch, and kept in the user
                cache and with this run, see `prediction_forward`); or "auto" (OpenVINO in
                bfloat16 on a CPU with it, whatever the number of images; elsewhere Keras,
                and OpenVINO in float32 from `finetune.inference.AUTO_MIN_IMAGES` images);
                see `finetune.inference`.
                Defaults to None (the environment variable `FINETUNE_RUNTIME`, or "auto").
                `last_runtime` says which one computed the last call.

        Raises:
            FinetuneError: `tta` below 1, or above 1 for a run trained without augmentation.
            ConfigError: an unknown `runtime`.
        """
        views = self.predict_view_logits(images, batch_size, progress, tta, runtime)
        return probabilities_from_views(
            views, self.temperature if temperature is None else temperature
        )

    def predict_view_logits(
        self,
        images: np.ndarray,
        batch_size: int = 64,
        progress: bool = False,
        tta: int = 1,
        runtime: str | None = None,
    ) -> np.ndarray:
        """The logits of each test-time augmentation view: (tta, N, num_classes).

        View 0 is the images as given; views 1.. are transformed by the run's training
        augmentation seeded with `seed + view`. See `predict_proba` for the arguments.
        """
        import tensorflow as tf

        from finetune.data.augment import augment, build_augmentation
        from finetune.data.pipeline import index_batches, rows_reader
        from finetune.inference import predict_batches, progress_bar

        if tta < 1:
            raise FinetuneError(f"tta must be 1 or more, got {tta}.")
        if len(images) == 0:
            raise FinetuneError("no images to predict.")
        augmentations = []
        for copy in range(1, tta):
            augmentation = build_augmentation(self.config.augment, seed=self.config.seed + copy)
            if augmentation is None:
                raise FinetuneError(
                    "test-time augmentation uses the run's training augmentation, and this run "
                    "was trained without any: use tta=1 (--tta 1)."
                )
            augmentations.append(augmentation)
        # Batch by batch, converted to float32 one batch at a time: faster than `predict` on the
        # whole array (which copies it into a dataset first) and no float copy of every image.
        # ONNX Runtime's threads may spin between batches: nothing trains meanwhile (tf.data
        # makes the augmented views of test-time augmentation alongside; measured, still a gain).
        count = len(images) * tta
        forward = self.prediction_forward(count, runtime)
        bar = progress_bar(len(images) * tta) if progress else None
        views = [predict_batches(forward, images, batch_size, bar=bar)]
        pixels = rows_reader(images) if augmentations else None
        for view, augmentation in enumerate(augmentations, start=1):
            # Keyed by (seed + view, batch): repeatable, and a map tf.data runs in parallel.
            stream = tf.constant(self.config.seed + view, tf.int64)
            batches = (
                index_batches(len(images), batch_size)
                .map(pixels)  # read from the array batch by batch, not copied into the graph
                .enumerate()
                .map(
                    lambda index, b, a=augmentation, s=stream: augment(
                        a, tf.cast(b, tf.float32), tf.stack([s, index])
                    ),
                    num_parallel_calls=tf.data.AUTOTUNE,
                )
                .prefetch(tf.data.AUTOTUNE)
            )
            views.append(predict_batches(forward, batches, batch_size, bar=bar))
        self.last_runtime = getattr(forward, "runtime", "keras")
        return np.stack(views)

    def prediction_forward(self, count: int, runtime: str | None = None) -> Any:
        """The forward pass for predicting `count` images in the runtime chosen for them
        (`finetune.inference.guarded_forward`); its `runtime` attribute says which computes.

        A converted model is kept with this run while its weights stay the same (checked on
        each call by `weights_checksum`), so repeated calls neither load it from
        the user cache again (about 0.1 s with hashing the model for its name) nor convert it
        again; weights that changed are converted (or loaded) anew. A conversion that fell
        back to Keras (a failure, a disagreement) is not tried again until they change.
        """
        from finetune.inference import (
            guarded_forward,
            keras_forward,
            requested_runtime,
            resolve_runtime,
        )

        def folded() -> keras.Model:
            # Made only if it computes or checks: a kept conversion needs neither (folding
            # twice and hashing the weights: about 0.15 s for Lite0).
            return self.inference_model(count)

        chosen = resolve_runtime(runtime, count)
        if chosen == "keras":
            return guarded_forward(self.model, folded, runtime, count, spin=True)
        key = (requested_runtime(runtime), chosen)
        checksum = self.weights_checksum()
        kept = self._converted
        if kept is not None and kept[0] is self.model and kept[1:3] == (key, checksum):
            if kept[3].runtime == "keras":  # fell back before: Keras for this count, no retry
                return keras_forward(folded())
            return kept[3]
        forward = guarded_forward(self.model, folded, runtime, count, spin=True)
        self._converted = (self.model, key, checksum, forward)
        return forward

    def split_samples(self, split: str) -> list[tuple[Path, int]]:
        """The (path, label) pairs of one split of the run's data, from `split.json`."""
        from finetune.data.split import read_split

        if self.path is None or not (self.path / "split.json").is_file():
            return []
        recorded = read_split(self.path / "split.json")
        return [(s.path, s.label) for s in recorded.splits.get(split, [])]
