"""Runs the fine-tuning recipe on an image folder and writes the run directory.

`train` is the whole job: data (scan, decode, split), the classifier, the recipe's phases
(`finetune.recipes`), test metrics and the run directory. `train_with_scratch_baseline` adds the
same network trained from random weights on the same split, the comparison that shows what the
pretrained weights bring.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from finetune.atomic import write_json, write_text_atomic
from finetune.backbones.registry import get_backbone
from finetune.config import (
    Config,
    RecipeConfig,
    augment_preset,
    dump_config,
    load_config,
    with_overrides,
)
from finetune.data.augment import build_augmentation, build_mixing
from finetune.data.pipeline import PreparedData, prepare_image_data
from finetune.data.split import write_split
from finetune.errors import ConfigError, DataError, FinetuneError
from finetune.evaluate import Predictions, calibration_record, classification_metrics
from finetune.model import build_classifier, is_batchnorm, sublayers
from finetune.recipes import Phase, PhaseData, fit_phases, two_phase_plan
from finetune.run import MODEL_FILE, Run, keras_verbosity, save_model_atomic, softmax

if TYPE_CHECKING:
    from finetune.data.inspect import DatasetReport

# Python keyword -> dotted config name, shared by the API and the CLI.
OPTION_NAMES = {
    "backbone": "model.backbone",
    "weights": "model.weights",
    "dropout": "model.dropout",
    "hidden_units": "model.hidden_units",
    "pooling": "model.pooling",
    "image_size": "data.image_size",
    "batch_size": "data.batch_size",
    "val_fraction": "data.val_fraction",
    "check_data": "data.check",
    "test_fraction": "data.test_fraction",
    "augment": "augment.enabled",
    "head_epochs": "recipe.head_epochs",
    "head_lr": "recipe.head_lr",
    "finetune_epochs": "recipe.finetune_epochs",
    "finetune_lr": "recipe.finetune_lr",
    "unfreeze_groups": "recipe.unfreeze_groups",
    "unfreeze": "recipe.unfreeze",
    "gradual_epochs": "recipe.gradual_epochs",
    "discriminative_lr": "recipe.discriminative_lr",
    "schedule": "recipe.schedule",
    "warmup_epochs": "recipe.warmup_epochs",
    "optimizer": "recipe.optimizer",
    "label_smoothing": "recipe.label_smoothing",
    "class_weight": "recipe.class_weight",
    "early_stopping_patience": "recipe.early_stopping_patience",
    "train_batchnorm": "recipe.train_batchnorm",
    "head_augment": "recipe.head_augment",
    "calibrate": "recipe.calibrate",
    "average_last_epochs": "recipe.average_last_epochs",
    "mixup": "augment.mixup",
    "cutmix": "augment.cutmix",
    "seed": "seed",
    "deterministic": "deterministic",
}


def resolve_config(config: Config | str | Path | None = None, **options: Any) -> Config:
    """Merges a config (object or TOML path) with keyword options (see `OPTION_NAMES`).

    Raises:
        ConfigError: unknown option names or bad values.
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise FinetuneError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTION_NAMES))}."
        )
    if config is None:
        base = Config()
    elif isinstance(config, Config):
        base = config
    else:
        base = load_config(config)
    if isinstance(options.get("augment"), str):  # a preset name replaces the whole section
        base = dataclasses.replace(base, augment=augment_preset(options.pop("augment")))
    return with_overrides(base, **{OPTION_NAMES[k]: v for k, v in options.items()}).validate()


def scratch_config(config: Config) -> Config:
    """The same network and budget trained from random weights: the baseline fine-tuning beats.

    One phase, every layer (BatchNorm included) trainable, at the head learning rate, for as many
    epochs as both phases of `config` together.
    """
    recipe = dataclasses.replace(
        config.recipe,
        head_epochs=0,
        finetune_epochs=config.recipe.head_epochs + config.recipe.finetune_epochs,
        finetune_lr=config.recipe.head_lr,
        unfreeze_groups=-1,
        unfreeze="at_once",
        discriminative_lr=1.0,
        train_batchnorm=True,
    )
    model = dataclasses.replace(config.model, weights="none")
    return dataclasses.replace(config, recipe=recipe, model=model)


def _prepare_run_dir(out: str | Path | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} exists and is not a folder; choose another path.")
    if (out / MODEL_FILE).exists() and not overwrite:
        raise FinetuneError(
            f"{out} already holds a finished run ({MODEL_FILE}); choose another --out "
            "or pass --overwrite to replace it."
        )
    if overwrite:
        _remove_run_records(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# What a run writes; --overwrite removes these (and nothing else) before the new run starts,
# so no record of the old run can be mistaken for one of the new. The model goes first: a kill
# during the clean-up leaves a folder that is no longer taken for a finished run.
RUN_FILES = (
    MODEL_FILE,
    "run.json",
    "metrics.json",
    "predictions.csv",
    "history.json",
    "split.json",
    "bad_files.json",
    "config.toml",
    "inspect.json",
    "recipe_auto.json",
    "report.html",
    "lr_find.png",
    "lr_find.json",
    "manifest.json",
)
RUN_FOLDERS = ("checkpoints", "tensorboard", "scratch_baseline")


def _remove_run_records(out: Path) -> None:
    import shutil

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def train(
    data_dir: str | Path,
    *,
    out: str | Path | None = None,
    config: Config | str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    lr: str | None = None,
    recipe: str = "default",
    tensorboard: bool = False,
    command: list[str] | None = None,
    resume: bool | None = None,
    **options: Any,
) -> Run:
    """Fine-tunes a pretrained backbone on an image folder.

    Args:
        data_dir: class folders, or `train/` (+ optional `val/`, `test/`) of class folders.
        out: run directory to write; None keeps everything in memory. Defaults to None.
        config: a `Config` or the path of a TOML config. Defaults to the built-in defaults.
        overwrite: replace a finished run in `out`. Defaults to False.
        progress: show progress bars. Defaults to True.
        lr: "auto" runs the learning-rate range test first and uses its suggestion as
            `head_lr` and `finetune_lr` (a tenth of it with `discriminative_lr = 1`), leaving
            rates given as options; the curve goes to `lr_find.png`.
            Defaults to None (the config's rates).
        recipe: "default" uses the config's recipe; "auto" chooses the phases, epochs,
            learning rates and unfreezing depth from the training split and the backbone
            (`finetune.recipes.auto`), keeping the options given here, and writes the choices
            and reasons to `recipe_auto.json`. Defaults to "default".
        tensorboard: write TensorBoard logs of every phase to `out/tensorboard/<phase>`.
            Defaults to False.
        command: the command line that started the run (the CLI passes `sys.argv`), for
            `manifest.json`. Defaults to None (this call's arguments are recorded instead).
        resume: go on with the unfinished run in `out` from its last complete checkpoint
            (`checkpoints/resume.npz`: phase, epoch, weights, optimizer, random and callback
            states), and end as the run would have without the interruption. True requires
            one; False starts again (the old checkpoints are replaced as the new run goes);
            None resumes when there is one. Defaults to None.
        **options: single options on top of `config`, e.g. `backbone="resnet50"`,
            `head_epochs=3`, `seed=1`, `calibrate=True` (the names of `OPTION_NAMES`).

    Returns:
        The `Run`, holding the fine-tuned `keras.Model`, its history and test metrics.

    Raises:
        FinetuneError: bad data folder, options or weights, each with a message naming it;
            `ResumeError` when the run to resume had another config or data (what changed is
            named).

    Example:
        >>> run = finetune.train("photos/", backbone="efficientnet_lite0", out="runs/photos")
        >>> run.metrics["accuracy"]
    """
    invocation = invocation_record(
        "finetune.train",
        command,
        data_dir=data_dir, out=out, config=config, overwrite=overwrite, lr=lr, recipe=recipe,
        tensorboard=tensorboard, **options,
    )  # fmt: skip
    config = resolve_config(config, **options)
    _check_recipe_mode(recipe)
    from finetune.inference import requested_runtime

    requested_runtime(None)  # a bad FINETUNE_RUNTIME fails now, not at the feature-cache fill
    if resume and (out is None or overwrite):
        raise FinetuneError(
            "--resume goes on with the unfinished run in --out: give --out, and not --overwrite "
            "(which starts the run again)."
        )
    run_dir = _prepare_run_dir(out, overwrite)
    data = prepare_data(data_dir, config, progress=progress, spill_dir=run_dir)
    check_data(data, config, run_dir, progress)
    given = frozenset(OPTION_NAMES[k] for k in options)
    if recipe == "auto":
        config = _auto_recipe(data, config, given, run_dir, progress, lr_auto=lr == "auto")
    if lr == "auto":
        config = _auto_learning_rate(data, config, run_dir, progress, given)
    elif lr is not None:
        raise FinetuneError(f"lr={lr!r}: only 'auto' is accepted (or give head_lr/finetune_lr).")
    fingerprint = run_fingerprint(config, data, recipe)
    state = None
    if run_dir is not None and resume is not False:
        state = _resume_state(run_dir, bool(resume), fingerprint, progress)
    return fit_run(
        data, config, run_dir, progress=progress, tensorboard=tensorboard, recipe=recipe,
        command=invocation, resume=state, fingerprint=fingerprint,
    )  # fmt: skip


# Config keys that do not change what training computes; a resume may change them.
_RESUME_MAY_CHANGE = frozenset({"data.check", "data.max_memory_gb"})


def run_fingerprint(config: Config, data: PreparedData, recipe: str) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: config, data, recipe mode."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                out |= flat(item, f"{prefix}{key}.")
            return out
        return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}

    values = flat(dataclasses.asdict(config), "")
    values = {k: v for k, v in values.items() if k not in _RESUME_MAY_CHANGE}
    if not config.prune.sparsity > 0:  # the [prune] section plays no part
        values = {k: v for k, v in values.items() if not k.startswith("prune.")}
    from finetune.inference import ENV_VAR, requested_runtime

    return values | {
        "recipe_mode": recipe,
        "image_size": data.image_size,
        "class_names": list(data.class_names),
        "data_fingerprint": data_fingerprint(data),
        # What computes the features a head trains on (bfloat16 or float32): part of the run.
        f"{ENV_VAR} (environment)": requested_runtime(None),
    }


def _resume_state(run_dir: Path, required: bool, fingerprint: dict[str, Any], progress: bool):
    from finetune.recipes.resume import ResumeError, fingerprint_changes, load_state

    state = load_state(run_dir)
    if state is None:
        if required:
            raise FinetuneError(
                f"--resume: {run_dir} holds no complete checkpoint to resume from "
                "(checkpoints/resume.npz); train without --resume to start the run."
            )
        return None
    changes = fingerprint_changes(state.meta.get("fingerprint", {}), fingerprint)
    if changes:
        raise ResumeError(
            f"{run_dir} holds an unfinished run (stopped in {state.describe()}) that was "
            f"started with other settings or data; changed: {'; '.join(changes)}. Give the "
            "same data and options to resume it, or pass --overwrite to start again, or "
            "choose another --out."
        )
    if progress:
        print(f"Resuming {run_dir}: {state.describe()} ({state.path}).", flush=True)
    return state


def invocation_record(function: str, argv: list[str] | None, **arguments: Any) -> dict[str, Any]:
    """How a run was started, for `manifest.json`: the command line, or the Python call."""
    if argv is not None:
        return {"argv": [str(a) for a in argv]}

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, Config):
            return "a Config object (resolved in config.toml)"
        return str(value)

    return {"python": function, "arguments": {k: plain(v) for k, v in arguments.items()}}


def prune(
    run_dir: str | Path,
    *,
    out: str | Path,
    sparsity: float = 0.5,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Run:
    """Prunes a finished run: magnitude pruning during a short fine-tuning phase.

    The run's data folder is read again and must be the one it was trained on (same files,
    same split: checked with the run's data fingerprint). The pruned model is evaluated on the
    same test split and written as a run directory of its own, so `evaluate`, `report`,
    `export` and `predict` work on it; `run.json` gets a "pruning" record: per-layer sparsity,
    the layers left dense, accuracy and gzip size of the weights before and after.

    Args:
        run_dir: the run to prune (left unchanged).
        out: the new run directory.
        sparsity: share of zeros in each pruned layer. Defaults to 0.5.
        overwrite: replace a finished run in `out`. Defaults to False.
        progress: show progress. Defaults to True.
        **options: other `[prune]` settings (`epochs`, `learning_rate`, `exclude`,
            `min_weights`, `ramp_fraction`, `frequency`, `power`), e.g. `epochs=3`.

    Raises:
        FinetuneError: not a run directory, its data changed, bad options, or `out` is the
            source run or holds another finished run.

    Example:
        >>> finetune.prune("runs/photos", out="runs/photos_pruned", sparsity=0.5)
    """
    source = Run.load(run_dir)
    if "ensemble" in source.info:
        raise FinetuneError(
            f"{run_dir} is an ensemble: prune its members (finetune prune MEMBER --out ...), "
            "then combine the pruned runs with finetune ensemble."
        )
    if Path(out).resolve() == Path(run_dir).resolve():
        raise FinetuneError(
            f"--out {out} is the run being pruned; give a new folder (the run stays unchanged)."
        )
    overrides = {f"prune.{k}": v for k, v in options.items()}
    config = with_overrides(
        source.config,
        **overrides,
        **{"prune.sparsity": sparsity, "data.image_size": source.image_size},
    )
    if not config.prune.sparsity > 0:
        raise ConfigError(f"sparsity = {sparsity}: give a share of zeros above 0, e.g. 0.5.")
    out_dir = _prepare_run_dir(out, overwrite)
    data = prepare_data(source.info["data_dir"], config, progress=progress, spill_dir=out_dir)
    recorded = source.info.get("data_fingerprint")
    if recorded is not None and data_fingerprint(data) != recorded:
        raise DataError(
            f"{source.info['data_dir']} is not what {run_dir} was trained on (its files or split "
            "changed since): pruning fine-tunes on the run's training split and scores on its "
            "test split. Restore the data, or train a new run with [prune] in its config."
        )
    seed_everything(config.seed, deterministic=config.deterministic)
    records, record = _prune(source.model, data, config, progress, len(source.history))
    record["source_run"] = str(Path(run_dir).resolve())
    record["accuracy_before"] = source.metrics.get("accuracy")
    run = Run(
        model=source.model,
        config=config,
        class_names=source.class_names,
        image_size=source.image_size,
        path=out_dir,
        history=source.history + records,
    )
    command = invocation_record(
        "finetune.prune", None, run_dir=run_dir, out=out, sparsity=sparsity, **options
    )
    return finish_run(
        run, data, source.info.get("recipe", "default"), progress, {"pruning": record}, command
    )


def _check_recipe_mode(recipe: str) -> None:
    if recipe not in ("default", "auto"):
        raise FinetuneError(f"recipe={recipe!r} is not one of: default, auto.")


def _auto_recipe(
    data: PreparedData,
    config: Config,
    given: frozenset[str],
    run_dir: Path | None,
    progress: bool,
    lr_auto: bool = False,
) -> Config:
    from finetune.recipes.auto import Decision, auto_recipe

    # With --lr auto the range test sets the learning rates; the automatic recipe leaves them.
    lr_options = frozenset({"recipe.head_lr", "recipe.finetune_lr"}) if lr_auto else frozenset()
    config, decisions = auto_recipe(
        config,
        data.labels["train"],
        data.num_classes,
        get_backbone(config.model.backbone),
        keep=given | lr_options,
    )
    if lr_auto:
        decisions.append(
            Decision("recipe.head_lr", "from --lr auto", "the learning-rate range test (lr_find)")
        )
    if run_dir is not None:
        write_json(run_dir / "recipe_auto.json", [dataclasses.asdict(d) for d in decisions])
    if progress:
        print("Automatic recipe:", flush=True)
        for d in decisions:
            print(f"  {d.option} = {d.value}: {d.reason}", flush=True)
    return config


def _auto_learning_rate(
    data: PreparedData,
    config: Config,
    run_dir: Path | None,
    progress: bool,
    given: frozenset[str] = frozenset(),
) -> Config:
    from finetune.lr_find import config_with_found_lr, range_test, save_range_test

    if progress:
        print("Finding a learning rate (range test)...", flush=True)
    result = range_test(data, config)
    if run_dir is not None:
        save_range_test(result, run_dir)
    config = config_with_found_lr(config, result, keep=given)
    if progress:
        print(
            f"Learning rates: head {config.recipe.head_lr:.2g}, "
            f"fine-tuning {config.recipe.finetune_lr:.2g}",
            flush=True,
        )
    return config


def prepare_data(
    data_dir: str | Path,
    config: Config,
    progress: bool = True,
    spill_dir: str | Path | None = None,
) -> PreparedData:
    """Scans, decodes and splits `data_dir` at the input size `config` asks for.

    Decoded images above `config.data.max_memory_gb` go to a memory-mapped file in `spill_dir`
    (the run folder, when there is one: a system's temporary folder may be in memory itself).
    """
    spec = get_backbone(config.model.backbone)
    return prepare_image_data(
        data_dir,
        image_size=config.data.image_size or spec.input_size,
        interpolation=spec.preprocessing.interpolation,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
        progress=progress,
        max_memory_gb=config.data.max_memory_gb,
        spill_dir=spill_dir,
    )


def check_data(
    data: PreparedData, config: Config, run_dir: Path | None, progress: bool = True
) -> DatasetReport | None:
    """Runs the dataset check on the split training will use (`config.data.check`).

    The findings go to `run_dir/inspect.json` and the verdict is printed; problems (duplicates
    across classes, leakage across splits) are reported, not fatal.
    """
    from finetune.data.inspect import inspect_folder

    if not config.data.check:
        return None
    report = inspect_folder(data.root, data.splits, progress=progress)
    if run_dir is not None:
        write_json(run_dir / "inspect.json", report.to_dict())
    if progress:
        print(f"Dataset check: {report.verdict}", flush=True)
        for line in report.problems:
            print(f"  problem: {line}", flush=True)
    return report


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seeds Python, NumPy and TensorFlow, and optionally makes TensorFlow's kernels deterministic.

    Without op determinism, oneDNN's threaded kernels sum in varying orders and two runs with
    the same seed drift apart; with it they are identical (process-wide, and cannot be undone).
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def class_weights(labels: np.ndarray, recipe: RecipeConfig) -> dict[int, float] | None:
    """The per-class loss weights `recipe.class_weight` asks for, from the training labels."""
    if recipe.class_weight == "none":
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights, strict=True)}


# BatchNorm momentum of a network trained from random weights (`weights = "none"`, the
# --compare-scratch baseline): PyTorch's default, statistics averaged over about 10 steps. Its
# statistics change fast, and Keras' 0.99 (about 100 steps) lags behind them: the demo's scratch
# baseline (with the fused BatchNorm kernels) validated near chance (10-24%) while its training
# accuracy rose to 57%, and early stopping kept the first epoch; with 0.9 it validated at 74%
# and tested at 71.2% (README, demo). `build_classifier(weights=None)` itself keeps 0.99.
SCRATCH_BATCHNORM_MOMENTUM = 0.9


def build_run_model(data: PreparedData, config: Config) -> keras.Model:
    """The classifier `config` describes, for the classes and image size of `data`.

    Built without pretrained weights, its BatchNorm layers average their statistics with
    momentum `SCRATCH_BATCHNORM_MOMENTUM`.
    """
    weights = None if config.model.weights == "none" else config.model.weights
    model = build_classifier(
        get_backbone(config.model.backbone),
        data.num_classes,
        image_size=data.image_size,
        head=config.model,
        weights=weights,
    )
    if weights is None:
        for layer in sublayers(model):
            if is_batchnorm(layer):
                layer.momentum = SCRATCH_BATCHNORM_MOMENTUM
    return model


def phase_data(data: PreparedData, config: Config) -> PhaseData:
    """The training and validation images of `data`, batched and augmented as `config` asks."""
    return PhaseData(
        train_images=data.images["train"],
        train_labels=data.labels["train"],
        num_classes=data.num_classes,
        batch_size=config.data.batch_size,
        val_images=data.images["val"],
        val_labels=data.labels["val"],
        augmentation=build_augmentation(config.augment, seed=config.seed),
        mixing=build_mixing(config.augment, seed=config.seed),
        seed=config.seed,
        feature_cache=config.recipe.feature_cache,
        feature_cache_max_memory_gb=config.data.feature_cache_max_memory_gb,
        train_paths=[str(s.path) for s in data.splits["train"]],
    )


def fit_run(
    data: PreparedData,
    config: Config,
    run_dir: Path | None,
    progress: bool = True,
    tensorboard: bool = False,
    recipe: str = "default",
    command: dict[str, Any] | None = None,
    resume: Any = None,
    fingerprint: dict[str, Any] | None = None,
) -> Run:
    """Builds the classifier, runs the recipe's phases on prepared data and records the run.

    `recipe` names how `config`'s recipe was chosen ("default", "auto", "scratch"), for
    `run.json` and `finetune runs`; `command` is how the run was started (`invocation_record`),
    for `manifest.json`. `resume` (a `finetune.recipes.resume.ResumeState`) goes on from a
    saved state; `fingerprint` (`run_fingerprint`) is stored with the saved states.

    With `config.recipe.calibrate`, fits a temperature on the validation split afterwards; with
    `tensorboard` (and a run directory), writes TensorBoard logs per phase to
    `run_dir/tensorboard/<phase>`.
    """
    if config.recipe.calibrate and not len(data.labels["val"]):
        raise FinetuneError(
            "--calibrate fits a temperature on the validation split, and this run has none: "
            "set --val-fraction above 0 (or add a val/ folder), or drop --calibrate."
        )
    seed_everything(config.seed, deterministic=config.deterministic)
    spec = get_backbone(config.model.backbone)
    model = build_run_model(data, config)
    extra = None
    if tensorboard and run_dir is not None:

        def extra(phase: Phase) -> list[keras.callbacks.Callback]:
            log_dir = run_dir / "tensorboard" / phase.name
            return [keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False)]

    records = fit_phases(
        model,
        spec,
        config.recipe,
        two_phase_plan(config.recipe, num_groups=len(spec.layer_groups)),
        phase_data(data, config),
        run_dir=run_dir,
        class_weight=class_weights(data.labels["train"], config.recipe),
        verbose=keras_verbosity(progress),
        extra_callbacks=extra,
        resume=resume,
        fingerprint=fingerprint,
    )

    run_info: dict[str, Any] = {}
    if config.recipe.average_last_epochs:
        from finetune.recipes.averaging import averaging_record

        run_info["weight_averaging"] = averaging_record(records, config.recipe.average_last_epochs)
    if config.prune.sparsity > 0:
        prune_records, run_info["pruning"] = _prune(model, data, config, progress, len(records))
        records += prune_records
    run = Run(
        model=model,
        config=config,
        class_names=data.class_names,
        image_size=data.image_size,
        path=run_dir,
        history=records,
    )
    return finish_run(run, data, recipe, progress, run_info, command=command)


def _prune(
    model: keras.Model, data: PreparedData, config: Config, progress: bool, first_epoch: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The `[prune]` phase on `model`, with the gzip size of its weights before and after."""
    from finetune.compress.prune import gzipped_weights_size, prune_phase

    before = gzipped_weights_size(model)
    records, record = prune_phase(
        model,
        get_backbone(config.model.backbone),
        config.recipe,
        config.prune,
        phase_data(data, config),
        first_epoch=first_epoch,
        class_weight=class_weights(data.labels["train"], config.recipe),
        verbose=keras_verbosity(progress),
    )
    record["gzip_bytes_before"] = before
    record["gzip_bytes_after"] = gzipped_weights_size(model)
    return records, record


def finish_run(
    run: Run,
    data: PreparedData,
    recipe: str = "default",
    progress: bool = True,
    extra_info: dict[str, Any] | None = None,
    command: dict[str, Any] | None = None,
) -> Run:
    """Calibrates (if the config asks), evaluates and records a trained run; writes its folder.

    Test metrics come from the test split (else the val split) of `data`; `extra_info` is
    added to `run.json`; `command` (how the run was started) goes to `manifest.json`.
    """
    config = run.config
    calibration = _calibrate(run, data, progress) if config.recipe.calibrate else None
    eval_split = "test" if len(data.labels["test"]) else "val"
    predictions = None
    if len(data.labels[eval_split]):
        if progress:
            print(f"Evaluating on the {eval_split} split...", flush=True)
        y = data.labels[eval_split]
        logits = run.predict_logits(data.images[eval_split], progress=progress)
        probabilities = softmax(logits / run.temperature)
        run.metrics = classification_metrics(y, probabilities, data.class_names)
        run.metrics["data"] = f"{eval_split} split"
        run.metrics["runtime"] = run.last_runtime
        if calibration is not None:
            measured_on = f"{eval_split} split"
            if eval_split == "val":
                measured_on += " (the images the temperature was fitted on: no test split)"
            calibration = calibration_record(
                y,
                softmax(logits),
                probabilities,
                run.temperature,
                calibration["fitted_on"],
                measured_on,
            ) | {k: v for k, v in calibration.items() if k == "note"}
            run.metrics["calibration"] = calibration
            if progress and calibration["ece_after"] > calibration["ece_before"]:
                print(
                    f"Warning: calibration raised the {measured_on}'s ECE from "
                    f"{calibration['ece_before']:.3f} to {calibration['ece_after']:.3f}; the "
                    "val split may be too small to fit a temperature.",
                    flush=True,
                )
        paths = [str(s.path.resolve()) for s in data.splits[eval_split]]
        predictions = Predictions(paths, y, probabilities, list(data.class_names))
    files = data_files(data)
    run.info = _run_info(data, config, recipe, files) | (extra_info or {})
    if calibration is not None:
        run.info["calibration"] = calibration
    if run.path is not None:
        _write_run_dir(run, data, predictions, manifest(run, files, command))
    return run


def _calibrate(run: Run, data: PreparedData, progress: bool) -> dict[str, Any]:
    """Fits the run's temperature on the validation split; returns what to record."""
    from finetune.calibration import choose_temperature
    from finetune.inference import resolve_runtime

    if progress:
        print("Calibrating the probabilities on the val split (temperature scaling)...")
    # The temperature is fitted on logits computed in float32 under "auto".
    runtime = resolve_runtime(None, len(data.images["val"]), float32=True)
    logits = run.predict_logits(data.images["val"], progress=progress, runtime=runtime)
    labels = data.labels["val"]
    record: dict[str, Any] = {"fitted_on": f"val split ({len(labels)} images)"}
    run.temperature, note = choose_temperature(logits, labels)
    if note:
        record["note"] = note
    if progress:
        print(note or f"Temperature {run.temperature:.3f}", flush=True)
    return record | {"temperature": run.temperature}


def _run_info(
    data: PreparedData,
    config: Config,
    recipe: str = "default",
    files: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    import finetune

    return {
        "class_names": data.class_names,
        "image_size": data.image_size,
        "backbone": config.model.backbone,
        "recipe": recipe,
        "data_dir": str(data.root),
        "counts": data.counts(),
        "data_fingerprint": data_fingerprint(data, files),
        "images_on_disk": data.on_disk,
        "seed": config.seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "finetune_version": finetune.__version__,
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "environment": environment(),
    }


def data_files(data: PreparedData) -> list[dict[str, Any]]:
    """Every file a run used: split, path relative to the data folder, label, BLAKE2b-128.

    Ordered by split, then path; the content hash (`PreparedData.file_digest`, each file read
    once) is "unreadable" for a file gone since it was decoded.
    """
    files = []
    for split in sorted(data.splits):
        for sample in sorted(data.splits[split], key=lambda s: str(s.path)):
            try:
                rel = sample.path.relative_to(data.root).as_posix()
            except ValueError:
                rel = sample.path.as_posix()
            content = data.file_digest(sample.path)
            files.append(
                {
                    "path": rel,
                    "split": split,
                    "label": data.class_names[sample.label],
                    "label_index": sample.label,
                    "blake2b_128": content,
                }
            )
    return files


def data_fingerprint(data: PreparedData, files: list[dict[str, Any]] | None = None) -> str:
    """A short hash of the data a run saw: every split's files (relative path, label, content).

    Two runs with the same fingerprint trained and were tested on the same bytes, split the same
    way; renaming the data folder does not change it. `files` (from `data_files`) saves reading
    the files again.
    """
    digest = hashlib.sha256()
    for f in files if files is not None else data_files(data):
        line = f"{f['split']}\t{f['path']}\t{f['label_index']}\t{f['blake2b_128']}\n"
        digest.update(line.encode())
    return digest.hexdigest()[:16]


def manifest(
    run: Run, files: list[dict[str, Any]], command: dict[str, Any] | None
) -> dict[str, Any]:
    """What `manifest.json` holds: how to make the run again and what it was made from.

    The command (argv, or the Python call and its arguments), seed and op determinism, Keras
    backend and package versions, the data folder, its fingerprint and every file with its
    split, label and BLAKE2b-128 hash. Only the TensorFlow backend trains.
    """
    info = run.info
    return {
        "command": command,
        "seed": run.config.seed,
        "deterministic": run.config.deterministic,
        "keras_backend": info.get("keras_backend"),
        "finetune_version": info.get("finetune_version"),
        "packages": info.get("environment"),
        "created": info.get("created"),
        "data_dir": info.get("data_dir"),
        "data_fingerprint": info.get("data_fingerprint"),
        "hash": "blake2b, 16-byte digest, of each file's bytes",
        "files": files,
    }


def environment() -> dict[str, str]:
    """Versions of Python and of the packages that shape a run's numbers."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("keras", "tensorflow-cpu", "tensorflow", "numpy", "scikit-learn", "pillow"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            continue
    return env


def _write_run_dir(
    run: Run,
    data: PreparedData,
    predictions: Predictions | None = None,
    manifest_record: dict[str, Any] | None = None,
) -> None:
    from finetune.report import write_report_or_warn

    path = run.path
    assert path is not None
    write_text_atomic(path / "config.toml", dump_config(run.config))
    write_split(
        path / "split.json", data.splits, data.root, data.class_names, data.seed, data.fractions
    )
    write_json(path / "history.json", run.history)
    write_json(path / "metrics.json", run.metrics)
    write_json(
        path / "bad_files.json",
        {
            "bad_files": [{"path": str(b.path), "reason": b.reason} for b in data.bad_files],
            "ignored": [{"path": str(i.path), "reason": i.reason} for i in data.ignored],
        },
    )
    write_json(path / "run.json", run.info)
    if manifest_record is not None:
        write_json(path / "manifest.json", manifest_record)
    if predictions is not None:
        predictions.write_csv(path / "predictions.csv")
    written = save_model_atomic(run.model, path / MODEL_FILE)
    from finetune.kept import link_run_conversion

    link_run_conversion(run, written)  # `finetune predict` then needs no Keras
    from finetune.recipes.resume import remove_state

    remove_state(path)  # the run is finished: nothing to resume
    write_report_or_warn(run)


def train_with_scratch_baseline(
    data_dir: str | Path,
    *,
    out: str | Path | None = None,
    config: Config | str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    recipe: str = "default",
    tensorboard: bool = False,
    command: list[str] | None = None,
    **options: Any,
) -> tuple[Run, Run]:
    """Fine-tunes as `train` does, then trains the same network from scratch on the same split.

    The images are decoded once and both runs see the same train/val/test split and epoch budget,
    so the difference in test accuracy is what the pretrained weights bring. The baseline run is
    written to `out/scratch_baseline`.

    Returns:
        (fine-tuned run, from-scratch run).
    """
    invocation = invocation_record(
        "finetune.train_with_scratch_baseline",
        command,
        data_dir=data_dir, out=out, config=config, overwrite=overwrite, recipe=recipe,
        tensorboard=tensorboard, **options,
    )  # fmt: skip
    config = resolve_config(config, **options)
    _check_recipe_mode(recipe)
    run_dir = _prepare_run_dir(out, overwrite)
    scratch_dir = _prepare_run_dir(run_dir / "scratch_baseline", overwrite) if run_dir else None
    data = prepare_data(data_dir, config, progress=progress, spill_dir=run_dir)
    check_data(data, config, run_dir, progress)
    if recipe == "auto":
        given = frozenset(OPTION_NAMES[k] for k in options)
        config = _auto_recipe(data, config, given, run_dir, progress)
    tuned = fit_run(
        data, config, run_dir, progress=progress, tensorboard=tensorboard, recipe=recipe,
        command=invocation,
    )  # fmt: skip
    if progress:
        print("Training the same network from random weights for comparison...", flush=True)
    scratch = fit_run(
        data,
        scratch_config(config),
        scratch_dir,
        progress=progress,
        tensorboard=tensorboard,
        recipe="scratch",
        command=invocation,
    )
    return tuned, scratch
