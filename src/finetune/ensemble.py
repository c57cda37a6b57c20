"""Ensembles: fine-tuned runs combined into one `keras.Model`, written as one run directory.

`ensemble(run_dirs, method=..., out=...)` takes two or more runs (other backbones, seeds or
recipes) that name the same classes in the same order, and builds ONE model with one input (RGB
pixels in [0, 255], like every run's model) that calls each member and combines their outputs in
a `CombineMembers` layer. The result is an ordinary run directory (`model.keras`, `run.json`,
`config.toml`, `split.json`, `history.json`, `metrics.json`, `predictions.csv`, `report.html`),
so `Run.load`, `finetune evaluate`, `report`, `predict` and `export` work on it unchanged, and
its `model.keras` holds only registered Keras layers (no `Lambda`): it loads in safe mode.

What the combined model outputs. A run's model outputs logits z, and its probabilities are
softmax(z / T) with the run's temperature T (1 unless calibrated). The ensemble keeps that
contract with T = 1: its output is log q, the log of the combined probabilities q. Because q sums
to 1, softmax(log q) = q exactly, so everything that reads logits (argmax, softmax,
`Run.predict_proba`, the exports and their parity check) gets the combined probabilities. The
members' temperatures are applied inside the model. With p_i = softmax(z_i / T_i) for member i of
M:

- `mean`: q = (1/M) sum_i p_i, the mean of the members' probabilities.
- `weighted`: q = sum_i w_i p_i, with weights on the simplex (w_i >= 0, sum 1) that minimise the
  negative log-likelihood of q on the members' shared validation split (`fit_weights`).
- `vote`: q = (1 - a) v + a m with a = `VOTE_MIX` (1e-3), where v_k is the share of members whose
  top-1 class is k (a member whose top logits tie exactly splits its vote between them) and m
  the mean of the members' probabilities. The top-1 class of q is the
  majority vote, a tie going to the class with the larger mean probability (a is small enough
  that it never overturns a vote), q stays within 0.001 of the vote shares, and no class gets
  probability 0. q says how the members voted; it is not a calibrated probability.

Members may take different image sizes: the ensemble takes the largest, and a `Resizing` layer
(bilinear) inside the model brings the image to each smaller member's size. Such a member then
sees a resized image instead of one decoded at its own size, so its output differs slightly from
running it on its own.

The ensemble is evaluated on the images that are in the test split of every member (its own
`split.json` keeps, per split, the images every member has in that split): when the members
share their split (one data folder with train/ val/ test/ folders, or the same seed), that is
the shared test split; when they do not, only the images none of them trained on are left, and
a warning says how many.

`CombineMembers` is registered with Keras when `finetune` is imported (its `__init__` imports this
module), which every loader of a finetune model does first.
"""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from finetune.errors import ConfigError, DataError, FinetuneError

if TYPE_CHECKING:
    from finetune.run import Run

METHODS = ("mean", "weighted", "vote")
#: Share of the mean probability mixed into the vote shares (see the module docstring).
VOTE_MIX = 1e-3
# The vote output is clamped here before its log, so a probability that underflows in float32
# gives a finite output (softmax of the output then differs from q by less than 1e-29).
_VOTE_FLOOR = 1e-30


@keras.saving.register_keras_serializable(package="finetune")
class CombineMembers(keras.layers.Layer):
    """Combines the logits of an ensemble's members into the log of its probabilities.

    Takes a list of M (batch, classes) logit tensors and returns log q (see the module
    docstring), so `softmax(output)` is the ensemble's probabilities q and the model that ends
    with this layer is used exactly like a run's logits model (with temperature 1).

    Args:
        method: "mean", "weighted" or "vote".
        weights: one weight per member, >= 0 and summing to 1 ("mean" and "vote": 1/M each).
            A member with weight 0 adds nothing. Defaults to equal weights.
        temperatures: each member's temperature (its logits are divided by it before the
            softmax). Defaults to 1 for each.
        vote_mix: with "vote", the share of the mean probability mixed into the vote shares.
            Defaults to `VOTE_MIX`.

    Example:
        >>> CombineMembers("mean")([logits_a, logits_b])   # log((softmax(a) + softmax(b)) / 2)
    """

    def __init__(
        self,
        method: str = "mean",
        weights: list[float] | None = None,
        temperatures: list[float] | None = None,
        vote_mix: float = VOTE_MIX,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ConfigError(f"ensemble method {method!r} is not one of: {', '.join(METHODS)}.")
        self.method = method
        self.weights_ = None if weights is None else [float(w) for w in weights]
        self.temperatures = None if temperatures is None else [float(t) for t in temperatures]
        self.vote_mix = float(vote_mix)

    def _member_settings(self, count: int) -> tuple[list[float], list[float]]:
        weights = self.weights_ or [1.0 / count] * count
        temperatures = self.temperatures or [1.0] * count
        if len(weights) != count or len(temperatures) != count:
            raise ValueError(
                f"CombineMembers has {len(weights)} weights and {len(temperatures)} temperatures "
                f"for {count} members."
            )
        return weights, temperatures

    def call(self, inputs):
        inputs = list(inputs)
        weights, temperatures = self._member_settings(len(inputs))
        log_p = [
            ops.log_softmax(ops.cast(z, "float32") / t, axis=-1)
            for z, t in zip(inputs, temperatures, strict=True)
        ]
        if self.method == "vote":
            # Each member's vote: 1 for its top class (split evenly if its top logits tie).
            # Written without argmax, whose TensorFlow lowering needs an op LiteRT lacks.
            tops = []
            for z in inputs:
                z = ops.cast(z, "float32")
                top = ops.cast(ops.greater_equal(z, ops.max(z, axis=-1, keepdims=True)), "float32")
                tops.append(top / ops.sum(top, axis=-1, keepdims=True))
            votes = ops.mean(ops.stack(tops), axis=0)
            mean_p = ops.mean(ops.stack([ops.exp(lp) for lp in log_p]), axis=0)
            q = (1.0 - self.vote_mix) * votes + self.vote_mix * mean_p
            return ops.log(ops.maximum(q, _VOTE_FLOOR))
        # log sum_i w_i p_i, computed in log space: finite even where a probability underflows.
        terms = [lp + float(np.log(w)) for lp, w in zip(log_p, weights, strict=True) if w > 0]
        return ops.logsumexp(ops.stack(terms), axis=0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {
            **super().get_config(),
            "method": self.method,
            "weights": self.weights_,
            "temperatures": self.temperatures,
            "vote_mix": self.vote_mix,
        }


def combined_probabilities(
    member_probabilities: np.ndarray, method: str, weights: np.ndarray | None = None
) -> np.ndarray:
    """What `CombineMembers` computes, in NumPy: q from (M, N, C) member probabilities.

    For "vote" a member votes for its most probable class (split evenly between tied ones).
    """
    p = np.asarray(member_probabilities, np.float64)
    count = p.shape[0]
    if method == "vote":
        top = (p >= p.max(axis=2, keepdims=True)).astype(np.float64)
        votes = (top / top.sum(axis=2, keepdims=True)).mean(axis=0)
        return (1 - VOTE_MIX) * votes + VOTE_MIX * p.mean(axis=0)
    w = np.full(count, 1.0 / count) if weights is None else np.asarray(weights, np.float64)
    return np.tensordot(w, p, axes=1)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (natural log)."""
    p = np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(p, 1e-300))))


def fit_weights(
    member_probabilities: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Member weights on the simplex that minimise the NLL of `sum_i w_i p_i` on labelled images.

    The objective, -mean_n log(sum_i w_i p_i[n, y_n]), is convex in w; it is minimised with
    SciPy's SLSQP (analytic gradient, bounds 0 <= w_i <= 1, sum w_i = 1) from equal weights. The
    result is then compared with equal weights and with each member alone, and the best of them
    is kept, so the fitted NLL is never above the mean's or the best single member's even if the
    optimizer stops early.

    Args:
        member_probabilities: (M, N, C) probabilities of each member (temperatures applied).
        labels: (N,) true classes.

    Returns:
        (weights (M,), record): the record holds the objective's value for the weights
        (`nll`), for equal weights (`nll_mean`) and for each member alone (`nll_members`),
        which candidate won (`chosen`) and whether SLSQP reported convergence.
    """
    from scipy.optimize import minimize

    labels = np.asarray(labels, np.int64)
    p = np.asarray(member_probabilities, np.float64)[:, np.arange(len(labels)), labels]
    count = len(p)

    def objective(w):
        return -float(np.mean(np.log(np.maximum(w @ p, 1e-300))))

    def gradient(w):
        return -np.mean(p / np.maximum(w @ p, 1e-300), axis=1)

    equal = np.full(count, 1.0 / count)
    result = minimize(
        objective,
        equal,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * count,
        constraints=[
            {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(count)}
        ],
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    # SLSQP leaves dust like 1e-17 on the weights it drives to the bound: make those 0.
    fitted = np.where(result.x > 1e-9, result.x, 0.0)
    fitted = fitted / fitted.sum() if fitted.sum() > 0 else equal
    candidates = [("SLSQP", fitted), ("equal weights", equal)]
    candidates += [(f"member {i} alone", np.eye(count)[i]) for i in range(count)]
    chosen, weights = min(candidates, key=lambda c: objective(c[1]))  # first of equals wins
    return weights, {
        "objective": "mean negative log-likelihood of the true class (natural log)",
        "nll": objective(weights),
        "nll_mean": objective(equal),
        "nll_members": [objective(np.eye(count)[i]) for i in range(count)],
        "chosen": chosen,
        "optimizer": "scipy.optimize.minimize(method='SLSQP')",
        "converged": bool(result.success),
    }


def _read_run_record(path: Path) -> dict[str, Any]:
    from finetune.untrusted import read_json

    if not (path / "run.json").is_file():
        raise FinetuneError(
            f"{path} is not a run directory: run.json is missing. Give the --out folders of "
            "finished `finetune train` runs."
        )
    info = read_json(path / "run.json")
    if not isinstance(info, dict) or not isinstance(info.get("class_names"), list):
        raise FinetuneError(f"{path / 'run.json'} has no class_names list; is it a run?")
    return info


def _class_difference(a: list[str], b: list[str]) -> str:
    if set(a) == set(b):
        return f"the same names in another order ({', '.join(a)} / {', '.join(b)})"
    parts = []
    if only := [n for n in a if n not in b]:
        parts.append(f"only the first has {', '.join(only)}")
    if only := [n for n in b if n not in a]:
        parts.append(f"only the second has {', '.join(only)}")
    return "; ".join(parts)


def check_same_classes(paths: list[Path], infos: list[dict[str, Any]]) -> None:
    """Refuses runs whose class names differ in name or order, naming both runs.

    Raises:
        FinetuneError: one line naming the first run that differs from the first run, and how.
    """
    first = list(infos[0]["class_names"])
    for path, info in zip(paths[1:], infos[1:], strict=True):
        names = list(info["class_names"])
        if names != first:
            raise FinetuneError(
                f"runs {paths[0]} and {path} have different classes: "
                f"{_class_difference(first, names)}. An ensemble needs the same class names in "
                "the same order; train the runs on the same data folder."
            )


def _split_keys(split_file) -> dict[str, set[tuple[str, int]]]:
    return {
        name: {(str(s.path.resolve()), s.label) for s in samples}
        for name, samples in split_file.splits.items()
    }


def _split_difference(a_keys, b_keys, a_root: Path, b_root: Path) -> str:
    parts = []
    if a_root.resolve() != b_root.resolve():
        parts.append(f"data folders {a_root} and {b_root}")
    for name in ("train", "val", "test"):
        a, b = a_keys.get(name, set()), b_keys.get(name, set())
        if a != b:
            parts.append(f"{name}: {len(a)} and {len(b)} images, {len(a ^ b)} not in both")
    return "; ".join(parts)


def _ensemble_splits(paths: list[Path], method: str, progress: bool):
    """The members' split files, the ensemble's split (images in the same split for every
    member), and whether every member has exactly the same split."""
    from finetune.data.split import read_split

    files = [read_split(p / "split.json") for p in paths]
    keys = [_split_keys(f) for f in files]
    shared = all(k == keys[0] for k in keys[1:])
    if not shared and method == "weighted":
        i = next(i for i, k in enumerate(keys) if k != keys[0])
        raise DataError(
            f"runs {paths[0]} and {paths[i]} were not trained on the same split "
            f"({_split_difference(keys[0], keys[i], files[0].root, files[i].root)}); "
            "--method weighted fits its weights on the members' shared val split. Train the "
            "members on one data folder with the same split (train/ val/ test/ folders, or the "
            "same seed), or use --method mean or vote."
        )
    splits = {
        name: [
            s
            for s in samples
            if all((str(s.path.resolve()), s.label) in k.get(name, set()) for k in keys[1:])
        ]
        for name, samples in files[0].splits.items()
    }
    if not shared and progress:
        counts = ", ".join(f"{len(v)} {k}" for k, v in splits.items())
        print(
            "Warning: the members were not trained on the same split; the ensemble keeps the "
            f"images that are in the same split for every member ({counts}), so its test "
            "images are ones none of them trained on.",
            flush=True,
        )
    return files, splits, shared


def _prepare_out(out: Path, members: list[Path], overwrite: bool) -> Path:
    from finetune.train import _prepare_run_dir

    resolved = out.resolve()
    for member in members:
        if resolved == member.resolve():
            raise FinetuneError(f"--out {out} is one of the members; give a new folder.")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FinetuneError(
            f"--out {out} already exists and is not empty; choose another folder or pass "
            "--overwrite to replace the run records in it."
        )
    prepared = _prepare_run_dir(out, overwrite)
    assert prepared is not None
    return prepared


def _member_logits(models: list[keras.Model], image_size: int):
    """The ensemble's input and each member's logits on it (resized for smaller members)."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    resized: dict[int, Any] = {image_size: inputs}
    logits = []
    for i, model in enumerate(models):
        size = int(model.inputs[0].shape[1])
        if size not in resized:
            resized[size] = keras.layers.Resizing(
                size, size, interpolation="bilinear", name=f"resize_to_{size}"
            )(inputs)
        model.name = f"member_{i}"
        model.trainable = False
        logits.append(model(resized[size]))
    return inputs, logits


def _member_probabilities(members_model, images, temperatures) -> np.ndarray:
    from finetune.fold import fold_batchnorm
    from finetune.inference import predict_batches
    from finetune.run import softmax

    fast = fold_batchnorm(members_model, frozen_only=False, snapshot=True)  # inference only

    def forward(x: np.ndarray) -> np.ndarray:  # (batch, members, classes)
        out = fast.predict_on_batch(x)
        return np.stack(
            [np.asarray(z) for z in (out if isinstance(out, list | tuple) else [out])], 1
        )

    outputs = predict_batches(forward, images, 64)  # float32 by batch, not all the images
    return np.stack([softmax(outputs[:, m] / t) for m, t in enumerate(temperatures)])


def _decode(
    samples, image_size: int, what: str, *, limit: float, config: Path, spill_dir, progress: bool
) -> tuple[np.ndarray, list[int], list[Any]]:
    """`decode_within` for a split of the members: above `limit` GiB (the first member's
    `data.max_memory_gb`, in `config`) the images go to a memory-mapped file in `spill_dir`
    (the ensemble's folder; TMPDIR without one)."""
    from finetune.data.decode import decode_within

    images, ok, bad = decode_within(
        [s.path for s in samples],
        image_size,
        progress=progress,
        max_memory_gb=limit,
        spill_dir=spill_dir,
        source=f"the members' {what}",
        limit_name=f"data.max_memory_gb in {config}",
        advice=f"or raise max_memory_gb in {config} if this machine has the memory.",
    )
    if not ok:
        raise DataError(
            f"none of the {len(samples)} images of the {what} can be read (the first: "
            f"{bad[0].path}: {bad[0].reason})."
        )
    return images, ok, bad


def _backbone_label(infos: list[dict[str, Any]]) -> str:
    counts = Counter(str(info.get("backbone", "?")) for info in infos)
    names = ", ".join(f"{b} x{n}" if n > 1 else b for b, n in counts.items())
    return f"ensemble: {names}"


def ensemble(
    run_dirs: list[str | Path],
    method: str = "mean",
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Run:
    """Combines fine-tuned runs into one model and, with `out`, one run directory.

    Args:
        run_dirs: two or more run directories with the same class names in the same order.
        method: "mean" (mean of the members' probabilities), "weighted" (weights fitted on the
            members' shared val split) or "vote" (majority vote of the top-1 classes). See the
            module docstring for what the model outputs with each. Defaults to "mean".
        out: the run directory to write (refused when it exists and is not empty, unless
            `overwrite`). None builds the model (and fits weights) in memory only, without
            evaluating it: evaluation reads the run directory's `split.json`. Defaults to None.
        overwrite: replace the run records in a non-empty `out`. Defaults to False.
        progress: print what is being done. Defaults to True.

    Returns:
        The ensemble as a `Run` (temperature 1: the members' temperatures are inside the model),
        with its test metrics when `out` is given, and `run.info["ensemble"]`: the method, the
        members (path, backbone, image size, temperature, weight, and their own accuracy and
        loss on the ensemble's test images) and, for "weighted", how the weights were fitted.

    Raises:
        FinetuneError: fewer than two runs, a run given twice, an unknown method, a folder that
            is not a run, runs with other class names or order, a non-empty `out`; for
            "weighted", members trained on different splits or without a val split.

    Example:
        >>> run = finetune.ensemble(["runs/a", "runs/b"], method="weighted", out="runs/ab")
        >>> run.info["ensemble"]["weights"]
    """
    from finetune.config import dump_config
    from finetune.data.split import write_split
    from finetune.run import Run
    from finetune.train import environment

    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of: {', '.join(METHODS)}.")
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise FinetuneError(f"an ensemble needs two runs or more; got {len(paths)}.")
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise FinetuneError(f"run {p} is given twice (as {seen[p.resolve()]} too).")
        seen[p.resolve()] = p
    infos = [_read_run_record(p) for p in paths]
    check_same_classes(paths, infos)
    split_files, splits, shared = _ensemble_splits(paths, method, progress)
    if method == "weighted" and not splits.get("val"):
        raise DataError(
            f"--method weighted fits its weights on the members' val split, and {paths[0]} has "
            "none: train the members with a validation split, or use --method mean or vote."
        )
    run_dir = _prepare_out(Path(out), paths, overwrite) if out is not None else None

    if progress:
        print(f"Loading {len(paths)} runs...", flush=True)
    # For inference only: compiled members would bring their optimizers into the ensemble's file.
    members = [Run.load(p, compile=False) for p in paths]
    image_size = max(m.image_size for m in members)
    if progress and len({m.image_size for m in members}) > 1:
        sizes = ", ".join(f"{p}: {m.image_size} px" for p, m in zip(paths, members, strict=True))
        print(f"The members take different sizes ({sizes}): the ensemble takes {image_size} px "
              "and resizes the image for the smaller ones.", flush=True)  # fmt: skip
    temperatures = [float(m.temperature) for m in members]

    decoded: dict[str, tuple[np.ndarray, list[int], list[Any]]] = {}

    def decode(split: str) -> tuple[np.ndarray, list[int], list[Any]]:
        """A split's images, decoded once (the val split fits the weights and may be the one
        evaluated too)."""
        if split not in decoded:
            decoded[split] = _decode(
                splits[split],
                image_size,
                f"{split} split",
                limit=members[0].config.data.max_memory_gb,  # the ensemble's config: the first's
                config=paths[0] / "config.toml",
                spill_dir=run_dir,
                progress=progress,
            )
        return decoded[split]

    inputs, logits = _member_logits([m.model for m in members], image_size)
    members_model = keras.Model(inputs, logits, name="ensemble_members")

    weights = np.full(len(members), 1.0 / len(members))
    fit_record = None
    if method == "weighted":
        if progress:
            print("Fitting the members' weights on the val split...", flush=True)
        images, ok, _ = decode("val")
        labels = np.asarray([splits["val"][i].label for i in ok], np.int64)
        probabilities = _member_probabilities(members_model, images, temperatures)
        del images
        weights, fit_record = fit_weights(probabilities, labels)
        fit_record["fitted_on"] = f"val split ({len(labels)} images)"
        if progress:
            shown = ", ".join(f"{w:.3f}" for w in weights)
            print(
                f"Weights {shown}: val NLL {fit_record['nll']:.4f} (equal weights "
                f"{fit_record['nll_mean']:.4f}, best member "
                f"{min(fit_record['nll_members']):.4f})",
                flush=True,
            )
    combine = CombineMembers(
        method, weights=[float(w) for w in weights], temperatures=temperatures, name="combine"
    )
    model = keras.Model(inputs, combine(logits), name=f"ensemble_{method}")

    record: dict[str, Any] = {
        "method": method,
        "output": (
            "log of the combined probabilities q: softmax(output) = q. "
            + {
                "mean": "q = mean of the members' probabilities",
                "weighted": "q = sum of weight * member probability",
                "vote": (
                    f"q = (1 - {VOTE_MIX}) * vote shares + {VOTE_MIX} * mean probability: "
                    "top-1 = majority vote, ties to the larger mean probability"
                ),
            }[method]
            + " (each member's probabilities with its own temperature)"
        ),
        "weights": [float(w) for w in weights],
        "members": [
            {
                "path": str(p.resolve()),
                "backbone": info.get("backbone"),
                "recipe": info.get("recipe"),
                "seed": info.get("seed"),
                "image_size": m.image_size,
                "temperature": t,
                "weight": float(w),
                "data_fingerprint": info.get("data_fingerprint"),
            }
            for p, info, m, t, w in zip(paths, infos, members, temperatures, weights, strict=True)
        ],
        "same_split": shared,
    }
    if fit_record is not None:
        record["weight_fit"] = fit_record
    fingerprints = {info.get("data_fingerprint") for info in infos}
    run = Run(
        model=model,
        config=members[0].config,
        class_names=list(members[0].class_names),
        image_size=image_size,
        path=run_dir,
        info={
            "class_names": list(members[0].class_names),
            "image_size": image_size,
            "backbone": _backbone_label(infos),
            "recipe": f"ensemble ({method})",
            "data_dir": str(split_files[0].root),
            "counts": {k: len(v) for k, v in splits.items()},
            "data_fingerprint": fingerprints.pop() if len(fingerprints) == 1 else "mixed",
            "seed": members[0].config.seed,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "finetune_version": _version(),
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "environment": environment(),
            "ensemble": record,
        },
    )
    if run_dir is None:
        return run

    write_split(
        run_dir / "split.json",
        splits,
        split_files[0].root,
        run.class_names,
        split_files[0].seed,
        split_files[0].fractions,
    )
    _write_records(run, paths, shared, dump_config)
    eval_split = "test" if splits.get("test") else "val" if splits.get("val") else None
    predictions = None
    if eval_split is not None:
        from finetune.evaluate import evaluate_with_predictions

        if progress:
            print(f"Evaluating on the {eval_split} split...", flush=True)
        if eval_split != "val":
            decoded.pop("val", None)  # not held while the test split is
        images, ok, bad = decode(eval_split)  # once, for the ensemble and for each member
        given = [s.path for s in splits[eval_split]]
        run.metrics, predictions = evaluate_with_predictions(
            run, progress=False, decoded=(given, images, ok, bad)
        )
        labels = np.asarray([splits[eval_split][i].label for i in ok], np.int64)
        probabilities = _member_probabilities(members_model, images, temperatures)
        for member, p in zip(record["members"], probabilities, strict=True):
            member[eval_split] = {
                "accuracy": float(np.mean(p.argmax(axis=1) == labels)),
                "loss": nll(p, labels),
            }
    _finish(run, predictions)
    return run


def _version() -> str:
    import finetune

    return finetune.__version__


def _write_records(run, paths: list[Path], shared: bool, dump_config) -> None:
    """config.toml (the first member's), an empty history, and the first member's data records
    when every member saw the same data."""
    from finetune.atomic import write_json, write_text_atomic

    assert run.path is not None
    header = (
        f'# An ensemble of {len(paths)} runs (run.json: "ensemble"); it was not trained. This is\n'
        f"# the config of its first member, {paths[0].resolve()}, whose augmentation\n"
        "# `--tta` uses.\n"
    )
    write_text_atomic(run.path / "config.toml", header + dump_config(run.config))
    write_json(run.path / "history.json", [])
    if shared:
        for name in ("bad_files.json", "inspect.json"):
            if (paths[0] / name).is_file():
                shutil.copyfile(paths[0] / name, run.path / name)


def _finish(run, predictions) -> None:
    """run.json, metrics.json, predictions.csv, model.keras (last: it marks a finished run),
    then report.html, through the writers every run uses."""

    from finetune.atomic import write_json
    from finetune.kept import link_run_conversion
    from finetune.report import write_report_or_warn
    from finetune.run import MODEL_FILE, save_model_atomic

    path = run.path
    write_json(path / "run.json", run.info)
    write_json(path / "metrics.json", run.metrics)
    if predictions is not None:
        predictions.write_csv(path / "predictions.csv")
    written = save_model_atomic(run.model, path / MODEL_FILE)
    link_run_conversion(run, written)  # its evaluation's conversion: `predict` without Keras
    write_report_or_warn(run, "ensemble")
