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

from finetune.data.decode import IMAGE_EXTENSIONS, decode_images, shown_path
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
        out = self.model.predict(np.asarray(images, np.float32), batch_size=32, verbose=0)
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

    Raises:
        FinetuneError: unknown model, inputs that do not exist, or `top_k` below 1.

    Example:
        >>> predict("efficientnet_lite0", ["cat.jpg"])[0].top[0]
        ('tabby', 0.41...)
    """
    from finetune.inference import requested_runtime

    requested_runtime(runtime)  # an unknown name fails before any work
    if top_k < 1:
        raise ConfigError(f"top_k (--top-k) is {top_k}; give 1 or more classes per image.")
    run_dir = _run_directory(model)
    decoded = None
    if run_dir is not None and tta == 1:
        paths = expand_inputs(inputs)
        decoded, probabilities = _predict_from_kept_conversion(run_dir, paths, runtime)
        if probabilities is not None:
            return _top_k(paths, decoded, probabilities, _run_class_names(run_dir), top_k)
    _load_everything()
    from finetune.run import Run

    predictor = load_predictor(model)
    if runtime is not None and not isinstance(predictor, Run):
        raise FinetuneError(
            "--runtime applies to a run directory; an exported model runs in its own runtime "
            "and an ImageNet head in Keras."
        )
    if decoded is None:
        paths = expand_inputs(inputs)
        decoded = decode_images(paths, predictor.image_size, progress=len(paths) > 50)
    images, ok, _ = decoded
    probabilities = None
    if len(ok):
        if isinstance(predictor, Run):
            probabilities = predictor.predict_proba(images, tta=tta, runtime=runtime)
            if run_dir is not None:  # loaded here and unchanged: next time, without Keras
                from finetune.kept import link_run_conversion
                from finetune.run import MODEL_FILE

                link_run_conversion(predictor, run_dir / MODEL_FILE)
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


def _load_everything() -> None:
    """Imports finetune's public names (TensorFlow with them, quietly; every custom layer
    registered for Keras): at once unless the `finetune` command started the process."""
    import finetune

    finetune._load_api()


def _run_directory(model: Any) -> Path | None:
    """`model` as a run directory given by its path (not a `Run`, an export or a name)."""
    if not isinstance(model, str | Path):
        return None
    folder = Path(model)
    files = ("model.keras", "run.json")
    if not all((folder / name).is_file() for name in files) or (folder / "saved_model.pb").exists():
        return None
    return folder


def _run_record(run_dir: Path) -> dict[str, Any] | None:
    from finetune.untrusted import read_json

    try:
        info = read_json(run_dir / "run.json")
        _ = list(info["class_names"]), int(info["image_size"])
        float(info.get("calibration", {}).get("temperature", 1.0))
    except (FinetuneError, KeyError, TypeError, ValueError, AttributeError):
        return None  # Run.load names what is wrong
    return info


def _run_class_names(run_dir: Path) -> list[str]:
    return list(_run_record(run_dir)["class_names"])


def _predict_from_kept_conversion(
    run_dir: Path, paths: list[Path], runtime: str | None
) -> tuple[Any, np.ndarray | None]:
    """The run's probabilities from the conversion linked to its `model.keras`
    (`finetune.kept`), without Keras: `(decoded, probabilities)`, `decoded` being
    `decode_images`' `(images, ok, bad)`. Probabilities are None when no conversion is linked
    for the runtime chosen (or it fails): then the path through the run's Keras model
    predicts, from the images decoded so far (`decoded`; None when not decoded yet)."""
    from finetune.inference import predict_batches, requested_runtime, resolve_runtime
    from finetune.kept import LINKED_RUNTIMES, kept_forward

    info = _run_record(run_dir)
    if info is None or resolve_runtime(runtime, len(paths)) not in LINKED_RUNTIMES:
        return None, None
    decoded = decode_images(paths, int(info["image_size"]), progress=len(paths) > 50)
    images, ok, _ = decoded
    chosen = resolve_runtime(runtime, len(ok))  # as `Run.prediction_forward` chooses
    forward = kept_forward(run_dir / "model.keras", chosen) if len(ok) else None
    if forward is None:
        return decoded, None
    if forward.runtime != chosen and requested_runtime(runtime) != "auto":
        from finetune.inference import warn_kept_in_float32

        warn_kept_in_float32(run_dir.name)
    try:
        logits = predict_batches(forward, images, 64)
    except Exception:  # the Keras path runs it, and falls back to Keras with a warning
        return decoded, None
    temperature = float(info.get("calibration", {}).get("temperature", 1.0))
    return decoded, probabilities_from_views(logits[None], temperature)
