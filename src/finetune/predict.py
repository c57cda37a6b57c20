"""Top-k predictions for image files and folders, from a run, an export or an ImageNet head.

`predict` takes a `Run`, a run directory, a model written by `finetune export` (a `.tflite`,
`.onnx` or `.keras` file or a SavedModel folder, run by its own runtime, with the class names and
temperature of the labels file that travels with it), or a registered backbone name (whose
ImageNet head then names one of the 1,000 ImageNet classes). Inputs may be files or folders
(every image below a folder, in sorted order). A file that cannot be decoded gets a prediction
with its `error` set, and the others go on.

A run directory whose model was converted for the runtime chosen and linked to its
`model.keras` (see `finetune.kept`) predicts from that conversion without loading Keras or
TensorFlow; this module imports neither until another path needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.decode import IMAGE_EXTENSIONS, decode_within, shown_path
from finetune.errors import ConfigError, FinetuneError
from finetune.probabilities import probabilities_from_views, softmax


@dataclass
class Prediction:
    """The top-k classes of one image.

    Args:
        path: the image file.
        top: (class name, probability) pairs, most likely first; empty when `error` is set.
        error: why the file could not be read, or None.
    """

    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "path": str(shown_path(self.path)),  # printable, also for non-UTF-8 names
            "predictions": [{"label": n, "probability": p} for n, p in self.top],
            "error": self.error,
        }


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and every image file below each folder (sorted).

    Raises:
        FinetuneError: an input does not exist, or a folder holds no images.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise FinetuneError(f"folder {p} holds no image files to predict.")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FinetuneError(f"{p} does not exist: give image files or folders.")
    return paths


class _ImageNetClassifier:
    """A backbone with its ImageNet head, taking [0, 255] RGB images like a run's model."""

    def __init__(self, name: str):
        import keras

        from finetune.backbones.imagenet import imagenet_class_names
        from finetune.backbones.registry import get_backbone, load_backbone
        from finetune.model import Normalize

        spec = get_backbone(name)
        self.image_size = spec.input_size
        self.class_names = imagenet_class_names()
        net = load_backbone(name, include_top=True)
        inputs = keras.Input((spec.input_size, spec.input_size, 3))
        x = Normalize.from_preprocessing(spec.preprocessing)(inputs)
        self.model = keras.Model(inputs, net(x))
        self.logits = spec.top_is_logits

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        from finetune.inference import predict_batches

        out = predict_batches(self.model.predict_on_batch, images, 32)  # float32 by batch
        return softmax(out) if self.logits else out


def load_predictor(model):
    """A `Run`, a run directory, an exported model or a backbone name -> something with
    `predict_proba`, `class_names` and `image_size`."""
    from finetune.backbones.registry import has_backbone
    from finetune.export.runtime import ExportedModel, is_exported_model, load_exported
    from finetune.run import Run

    if isinstance(model, Run | ExportedModel):
        return model
    if is_exported_model(model):
        return load_exported(model)
    if Path(model).is_dir():
        return Run.load(model)
    if has_backbone(str(model)):
        return _ImageNetClassifier(str(model))
    raise FinetuneError(
        f"{model!r} is neither a run directory, an exported model nor a backbone name. Give the "
        "--out folder of `finetune train`, a file written by `finetune export` (.tflite, .onnx, "
        ".keras, or a SavedModel folder), or a name from `finetune backbones`."
    )


# Decoded images above this go to a memory-mapped file in TMPDIR (`decode_within`).
_PREDICT_LIMIT = {
    "max_memory_gb": 8.0,
    "source": "the images to predict",
    "limit_name": "finetune predict's limit",
}


def predict(
    model,
    inputs: Sequence[str | Path],
    top_k: int = 5,
    tta: int = 1,
    runtime: str | None = None,
) -> list[Prediction]:
    """Predicts the top-k classes of image files and folders.

    Args:
        model: a `Run`, a run directory, an exported model (a `.tflite`, `.onnx` or `.keras`
            file or a SavedModel folder, with its labels file), or a backbone name (its
            ImageNet head).
        inputs: image files and/or folders.
        top_k: how many classes per image. Defaults to 5.
        tta: test-time augmentation copies per image, for a run (see `Run.predict_proba`).
            Defaults to 1.
        runtime: what runs a run's model: "auto", "keras", "openvino", "openvino-bf16" or
            "onnxruntime" (see `Run.predict_proba`). Defaults to None (`FINETUNE_RUNTIME`,
            or "auto").

    Returns:
        One `Prediction` per image file, in input order.

    Every image is decoded before the first prediction; above 8 GiB of decoded pixels they go
    to a memory-mapped temporary file in `TMPDIR` (see `finetune.data.decode.decode_within`).

    Raises:
        FinetuneError: unknown model, inputs that do not exist, or `top_k` below 1; a
            `DataError` when the decoded images need that file and `TMPDIR` has no room.

    Example:
        >>> predict("efficientnet_lite0", ["cat.jpg"])[0].top[0]
        ('tabby', 0.41...)
    """
    import finetune
    from finetune.inference import requested_runtime

    requested_runtime(runtime)  # an unknown name fails before any work
    if top_k < 1:
        raise ConfigError(f"top_k (--top-k) is {top_k}; give 1 or more classes per image.")
    run_dir = _RunDirectory.of(model)
    paths = decoded = None
    if run_dir is not None and tta == 1:
        paths = expand_inputs(inputs)
        decoded, probabilities = _predict_from_kept_conversion(run_dir, paths, runtime)
        if probabilities is not None:
            return _top_k(paths, decoded, probabilities, run_dir.class_names, top_k)
    finetune._load_api()  # TensorFlow, quietly, and every layer registered for Keras
    from finetune.run import Run

    predictor = load_predictor(model)
    if runtime is not None and not isinstance(predictor, Run):
        raise FinetuneError(
            "--runtime applies to a run directory; an exported model runs in its own runtime "
            "and an ImageNet head in Keras."
        )
    if paths is None:
        paths = expand_inputs(inputs)
    if decoded is None:
        decoded = decode_within(
            paths, predictor.image_size, progress=len(paths) > 50, **_PREDICT_LIMIT
        )
    images, ok, _ = decoded
    probabilities = None
    if len(ok):
        if isinstance(predictor, Run):
            probabilities = predictor.predict_proba(images, tta=tta, runtime=runtime)
            if run_dir is not None:  # loaded here: next time, without Keras
                run_dir.link(predictor)
        elif tta == 1:
            probabilities = predictor.predict_proba(images)
        else:
            raise FinetuneError(
                "--tta applies to a run directory, not to an ImageNet head or an exported model."
            )
    return _top_k(paths, decoded, probabilities, predictor.class_names, top_k)


def _top_k(
    paths: list[Path],
    decoded: tuple[np.ndarray, list[int], list[Any]],
    probabilities: np.ndarray | None,
    class_names: Sequence[str],
    top_k: int,
) -> list[Prediction]:
    """One `Prediction` per path: its error, or its `top_k` classes."""
    _, ok, bad = decoded
    results = [Prediction(p) for p in paths]
    # `bad` lists the failed files in input order: the indices missing from `ok`, in order.
    failed = sorted(set(range(len(paths))) - set(ok))
    for i, b in zip(failed, bad, strict=True):
        results[i].error = b.reason
    if probabilities is not None:
        k = min(top_k, probabilities.shape[1])
        for row, i in enumerate(ok):
            order = np.argsort(-probabilities[row])[:k]
            results[i].top = [(class_names[j], float(probabilities[row, j])) for j in order]
    return results


@dataclass
class _RunDirectory:
    """A run directory given by its path, read without Keras: its `run.json` and the sha256
    and state of its `model.keras` before anything loads it."""

    path: Path
    class_names: list[str]
    image_size: int
    temperature: float
    digest: str
    state: tuple[int, int, int] | None

    @classmethod
    def of(cls, model: Any) -> _RunDirectory | None:
        """`model` read as a run directory; None for anything else (a `Run`, an export, a
        backbone name) and for a run directory whose `run.json` `Run.load` would refuse
        (it then says why)."""
        from finetune.kept import MODEL_FILE, file_sha256, file_state
        from finetune.runs import model_facts
        from finetune.untrusted import read_json

        if not isinstance(model, str | Path):
            return None
        folder = Path(model)
        if not (folder / MODEL_FILE).is_file() or (folder / "saved_model.pb").exists():
            return None
        try:
            facts = model_facts(read_json(folder / "run.json"))
            state = file_state(folder / MODEL_FILE)
            return cls(folder, *facts, file_sha256(folder / MODEL_FILE), state)
        except (FinetuneError, OSError, KeyError, TypeError, ValueError, AttributeError):
            return None

    def link(self, run: Any) -> None:
        """Links the conversion `run` (loaded from this directory) predicted with to its
        model file, unless the file was rewritten since it was hashed."""
        from finetune.kept import MODEL_FILE, file_state, link_run_conversion

        if self.state is not None and file_state(self.path / MODEL_FILE) == self.state:
            link_run_conversion(run, self.digest)


def _predict_from_kept_conversion(
    run_dir: _RunDirectory, paths: list[Path], runtime: str | None
) -> tuple[Any, np.ndarray | None]:
    """The run's probabilities from the conversion linked to its `model.keras`
    (`finetune.kept`), without Keras: `(decoded, probabilities)`, `decoded` being
    `decode_within`'s `(images, ok, bad)`. Probabilities are None when no conversion is linked
    for the runtime chosen, or it fails on a batch (its link is then deleted): then the path
    through the run's Keras model predicts, from the images decoded here (`decoded`, None when
    nothing was: images are decoded only once a linked conversion has loaded)."""
    from finetune.inference import (
        predict_batches,
        requested_runtime,
        resolve_runtime,
        warn_kept_in_float32,
    )
    from finetune.kept import kept_forward

    chosen = resolve_runtime(runtime, len(paths))
    found = kept_forward(run_dir.digest, chosen)
    if found is None:
        return None, None
    forward, link = found
    decoded = decode_within(paths, run_dir.image_size, progress=len(paths) > 50, **_PREDICT_LIMIT)
    images, ok, _ = decoded
    if resolve_runtime(runtime, len(ok)) != chosen:  # as `Run.prediction_forward` chooses
        return decoded, None
    if not len(ok):  # every file failed: their errors, and nothing to compute
        return decoded, np.zeros((0, len(run_dir.class_names)))
    if forward.runtime != chosen and requested_runtime(runtime) != "auto":
        warn_kept_in_float32(str(run_dir.path))
    try:
        logits = predict_batches(forward, images, 64)
    except Exception:  # the Keras path runs it, and falls back to Keras with a warning
        link.unlink(missing_ok=True)
        return decoded, None
    return decoded, probabilities_from_views(logits[None], run_dir.temperature)
