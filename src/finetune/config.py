"""Typed configuration of a fine-tuning run, and its TOML form.

A run is described by one `Config` made of small dataclasses (`ModelConfig`, `DataConfig`,
`AugmentConfig`, `RecipeConfig`). A TOML file only supplies values for the same fields, section by
section (`[model]`, `[data]`, `[augment]`, `[recipe]`, plus top-level `seed` and
`deterministic`); anything it does
not name keeps its default. Unknown sections, keys or wrongly typed values are refused with a
message naming them. The resolved config of every run is written back as `config.toml`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from finetune.errors import ConfigError

OPTIMIZERS = ("sgd", "rmsprop", "adagrad", "adam", "adamw")
POOLINGS = ("avg", "max", "flatten")
FILL_MODES = ("reflect", "wrap", "constant", "nearest")
CLASS_WEIGHTS = ("none", "balanced")
SCHEDULES = ("constant", "cosine", "one_cycle", "plateau")


@dataclass
class ModelConfig:
    """The network: a pretrained backbone and a new classification head.

    Args:
        backbone: registry name of the backbone. Defaults to "efficientnet_lite0".
        weights: "imagenet" for the pretrained weights, "none" for random initialisation (its
            BatchNorm layers then average their statistics with momentum 0.9, see
            `finetune.train.SCRATCH_BATCHNORM_MOMENTUM`), or the path of a local weights file.
            Defaults to "imagenet".
        pooling: how the last feature map becomes a vector: "avg", "max" or "flatten".
            Defaults to "avg".
        hidden_units: sizes of optional ReLU Dense layers before the output layer.
            Defaults to none.
        dropout: dropout rate before the output layer. Defaults to 0.2.
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    pooling: str = "avg"
    hidden_units: list[int] = field(default_factory=list)
    dropout: float = 0.2


@dataclass
class DataConfig:
    """How the image folder becomes training, validation and test batches.

    Args:
        image_size: side of the square input in pixels; 0 means the backbone's native size.
            Defaults to 0.
        val_fraction: share of the images used for validation when the folder has no `val/`.
            Defaults to 0.1.
        test_fraction: share used for testing when the folder has no `test/`. Defaults to 0.1.
        batch_size: images per training step. Defaults to 32.
        max_memory_gb: the most memory the decoded images may take (they are decoded once);
            above it they are decoded into a memory-mapped file in the run folder, which
            training reads from (a folder the disk has no room for is refused before
            decoding). Defaults to 8.
        feature_cache_max_memory_gb: cached backbone features (see `recipe.feature_cache`)
            larger than this are written to a temporary file instead of memory. Defaults to 2.
        check: run the dataset check (`finetune inspect`: broken files, duplicates across
            classes, leakage across splits, imbalance) before training and write its findings
            to `inspect.json`; problems are reported, training goes on. Defaults to True.
    """

    image_size: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    batch_size: int = 32
    max_memory_gb: float = 8.0
    feature_cache_max_memory_gb: float = 2.0
    check: bool = True


@dataclass
class AugmentConfig:
    """Random transformations of training images (never of validation or test images).

    Args:
        enabled: apply augmentation during training. Defaults to True.
        horizontal_flip: random left-right flips. Defaults to True.
        vertical_flip: random up-down flips. Defaults to False.
        rotation: maximum rotation in degrees, either way. Defaults to 10.
        zoom: maximum zoom in or out, as a fraction of the size. Defaults to 0.1.
        width_shift: maximum horizontal shift, as a fraction of the width. Defaults to 0.1.
        height_shift: maximum vertical shift, as a fraction of the height. Defaults to 0.1.
        shear: maximum shear along each axis, as a slope (0.2: a pixel 10 px from the centre
            moves up to 2 px across). Defaults to 0.
        fill_mode: how pixels outside the image are filled: "reflect", "wrap", "constant" or
            "nearest". Defaults to "reflect".
        randaugment: add Keras' `RandAugment` (2 random colour/geometry operations per image,
            magnitude 0.5). Defaults to False.
        mixup: MixUp's alpha (the mixing weight is drawn from Beta(alpha, alpha)); each
            training image is blended with another of its batch and so are their labels.
            0 turns it off; 0.2-0.4 is usual. Defaults to 0.
        cutmix: CutMix's alpha: a box of another image of the batch is pasted in, labels
            mixed by area. 0 turns it off; 1.0 is usual. With both on, each batch gets one of
            the two at random. Defaults to 0.
    """

    enabled: bool = True
    horizontal_flip: bool = True
    vertical_flip: bool = False
    rotation: float = 10.0
    zoom: float = 0.1
    width_shift: float = 0.1
    height_shift: float = 0.1
    shear: float = 0.0
    fill_mode: str = "reflect"
    randaugment: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    # The default: flips, small rotations, shifts and zooms.
    "light": AugmentConfig(),
    # Light geometry plus RandAugment's colour and geometry operations, for larger datasets.
    "strong": AugmentConfig(
        rotation=15.0, zoom=0.15, width_shift=0.15, height_shift=0.15, randaugment=True
    ),  # fmt: skip
    "none": AugmentConfig(enabled=False),
    # Seed document 000: RandomRotation(0.1) (36 degrees), both flips, RandomZoom(0.1).
    "seed000": AugmentConfig(
        vertical_flip=True, rotation=36.0, zoom=0.1, width_shift=0.0, height_shift=0.0
    ),  # fmt: skip
    # Seed document 001's ImageDataGenerator: rotation 40, shifts 0.2, shear 0.2, zoom 0.2,
    # horizontal flip, nearest fill.
    "seed001": AugmentConfig(
        rotation=40.0, width_shift=0.2, height_shift=0.2, shear=0.2, zoom=0.2, fill_mode="nearest"
    ),  # fmt: skip
}


def augment_preset(name: str) -> AugmentConfig:
    """The `AugmentConfig` of a named preset: light, strong, none, seed000 or seed001.

    Raises:
        ConfigError: an unknown preset name.
    """
    try:
        return AUGMENT_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"augmentation preset {name!r} is not one of: {', '.join(AUGMENT_PRESETS)}."
        ) from None


@dataclass
class RecipeConfig:
    """The two-phase fine-tuning recipe.

    Phase 1 trains the head with the backbone frozen (BatchNorm in inference mode), on cached
    backbone features. Phase 2 unfreezes the top `unfreeze_groups` layer groups of the
    backbone (all, by default) and continues at `finetune_lr` for the top and geometrically
    less for the groups below (`discriminative_lr`). Both phases follow a cosine schedule with
    one epoch of warm-up. These defaults won the accuracy benchmark (benchmarks/RESULTS.md).

    Args:
        head_epochs: epochs of phase 1; 0 skips it. Defaults to 5.
        head_lr: learning rate of phase 1. Defaults to 1e-3.
        finetune_epochs: epochs of phase 2; 0 skips it. Defaults to 5.
        finetune_lr: peak learning rate of phase 2, that of the head and the top layer group;
            the groups below get less (`discriminative_lr`). Defaults to 1e-3.
        unfreeze_groups: how many layer groups of the backbone phase 2 unfreezes, from the top;
            -1 unfreezes all of them. Defaults to -1.
        unfreeze: "at_once" unfreezes the `unfreeze_groups` top groups together for phase 2;
            "gradual" unfreezes them one more group at a time, from the top, every
            `gradual_epochs` epochs (ULMFiT's gradual unfreezing), each step a `fit` of its own;
            "plateau" unfreezes the next group when the validation loss (the training loss
            without a validation split) has not improved for `plateau_patience` epochs, within
            the `finetune_epochs` budget. Defaults to "at_once".
        gradual_epochs: epochs per step of gradual unfreezing; the last step (all
            `unfreeze_groups` groups) runs the rest of `finetune_epochs`. Defaults to 1.
        optimizer: "sgd" (with momentum), "rmsprop", "adagrad", "adam" or "adamw".
            Defaults to "adam".
        momentum: momentum of SGD and RMSprop. Defaults to 0.9.
        nesterov: Nesterov momentum for SGD. Defaults to False.
        weight_decay: decoupled weight decay of AdamW. Defaults to 1e-4.
        discriminative_lr: phase 2 learning-rate factor of the lowest unfrozen layer group;
            the groups above get factors rising geometrically to 1.0 for the head (fastai's
            `slice(finetune_lr * discriminative_lr, finetune_lr)`). 1.0 gives every layer the
            same rate. Defaults to 0.1.
        schedule: learning-rate schedule of each phase: "constant", "cosine" (cosine decay to
            0 after `warmup_epochs` of linear warm-up), "one_cycle" (fastai's 1cycle) or
            "plateau" (divide by 1 / `plateau_factor` when the validation loss stalls for
            `plateau_patience` epochs). Defaults to "cosine".
        warmup_epochs: linear warm-up of the "cosine" schedule, in epochs, at most 30% of the
            phase. Defaults to 1.
        plateau_factor: learning-rate factor of the "plateau" schedule. Defaults to 0.2.
        plateau_patience: epochs without improvement before the "plateau" schedule lowers the
            rate, and before `unfreeze = "plateau"` unfreezes the next group. Defaults to 1.
        label_smoothing: label smoothing of the cross-entropy loss. Defaults to 0.
        class_weight: "none", or "balanced" to weight each class's loss by
            `n_images / (n_classes * n_images_of_class)` computed on the training split.
            Defaults to "none".
        early_stopping_patience: epochs without a better validation loss before a phase stops
            (best weights restored); 0 disables early stopping. Defaults to 3.
        train_batchnorm: let unfrozen BatchNorm layers update their statistics in phase 2.
            Defaults to False (they stay in inference mode, the safer choice on small data).
        head_augment: augment the training images in phase 1 too. Defaults to False: phase 1
            then trains the head on backbone features computed once (`feature_cache`), which
            is many times faster; phase 2 always augments when augmentation is enabled.
        feature_cache: in a phase without augmentation, compute the output of what is
            frozen once and train the rest on it (the head on the backbone's features; the top
            groups of a partly unfrozen backbone on the output of the groups below); in an
            augmented phase, let a converted model (OpenVINO under "auto") compute that output
            batch by batch when it is chosen (`finetune.inference`; for the groups below the
            top ones, bfloat16 OpenVINO only: under "auto" from 2,000 images of 224 px). The
            weights end
            up as training through the whole network would leave them, up to float rounding
            (except behind a backbone with dropout inside, see
            `finetune.recipes.feature_cache`), or near them where "auto" chose bfloat16 (from
            2,000 images on a CPU with it: within the seeds' spread on the accuracy benchmark).
            Defaults to True.
        calibrate: after training, fit a temperature on the validation split so the
            probabilities say how sure the model really is (`finetune.calibration`); the run
            stores it and `predict` / `evaluate` apply it. Needs a validation split.
            Defaults to False.
        average_last_epochs: end the final phase with the mean of its trainable weights over
            its last N epochs (SWA-like; `finetune.recipes.averaging`); that phase then runs
            all its epochs, without early stopping. Trainable BatchNorm layers
            (`train_batchnorm`) get their statistics recomputed for the averaged weights.
            0 turns it off. Defaults to 0.
    """

    head_epochs: int = 5
    head_lr: float = 1e-3
    finetune_epochs: int = 5
    finetune_lr: float = 1e-3
    unfreeze_groups: int = -1
    unfreeze: str = "at_once"
    gradual_epochs: int = 1
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    discriminative_lr: float = 0.1
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    plateau_factor: float = 0.2
    plateau_patience: int = 1
    label_smoothing: float = 0.0
    class_weight: str = "none"
    early_stopping_patience: int = 3
    train_batchnorm: bool = False
    head_augment: bool = False
    feature_cache: bool = True
    calibrate: bool = False
    average_last_epochs: int = 0


@dataclass
class PruneConfig:
    """Magnitude pruning in a short fine-tuning phase at the end of training (`[prune]`).

    The smallest-magnitude weights of each pruned layer are set to zero and kept there, the
    share rising from 0 to `sparsity` on a polynomial schedule (Zhu & Gupta, 2017) over the
    first `ramp_fraction` of the phase's steps; the rest of the phase fine-tunes at the target.
    The saved model is a plain Keras model whose pruned weights are zeros (see
    `finetune.compress.prune`). `finetune prune RUN_DIR` runs the same phase on a finished run.

    Args:
        sparsity: share of the weights set to zero in each pruned layer; 0 turns pruning off.
            Defaults to 0.
        epochs: epochs of the pruning phase. Defaults to 2.
        learning_rate: peak learning rate of the phase (the whole network trains, BatchNorm
            as `recipe.train_batchnorm` says, on the recipe's optimizer and schedule).
            Defaults to 1e-4.
        ramp_fraction: share of the phase's steps over which sparsity rises to the target.
            Defaults to 0.5.
        frequency: steps between two mask updates during the ramp; 0 picks ten updates.
            Defaults to 0.
        power: exponent of the schedule, 3 rises fast and then slowly. Defaults to 3.
        min_weights: layers with fewer weights are left dense (the stem and the small
            depthwise kernels: little to gain, and the most sensitive). Defaults to 1024.
        exclude: names (or shell patterns, e.g. "block1*") of layers to leave dense.
            Defaults to none.
        depthwise: prune DepthwiseConv2D kernels too. Defaults to False: they hold few of
            the weights (one small filter per channel) and are the most sensitive; measured on
            EfficientNet-Lite0, leaving them dense keeps far more accuracy at the same target
            (benchmarks/RESULTS.md).
        train_batchnorm: let BatchNorm layers train during the phase, their statistics
            recomputed for the final weights at the end. Defaults to False: with the recipe's
            frozen BatchNorm the fine-tuned weights were trained against the frozen statistics,
            and measured, training them here lost accuracy (benchmarks/RESULTS.md).
    """

    sparsity: float = 0.0
    epochs: int = 2
    learning_rate: float = 1e-4
    ramp_fraction: float = 0.5
    frequency: int = 0
    power: float = 3.0
    min_weights: int = 1024
    exclude: list[str] = field(default_factory=list)
    depthwise: bool = False
    train_batchnorm: bool = False


@dataclass
class Config:
    """Everything that defines a run.

    Args:
        model: the network. Defaults to `ModelConfig()`.
        data: splits, image size and batching. Defaults to `DataConfig()`.
        augment: training augmentation. Defaults to `AugmentConfig()`.
        recipe: the training phases. Defaults to `RecipeConfig()`.
        prune: magnitude pruning after the recipe. Defaults to `PruneConfig()` (off).
        seed: seed of the split, the shuffling, augmentation and initialisation. Defaults to 0.
        deterministic: make TensorFlow's kernels deterministic, so the same seed gives the same
            weights bit for bit (measured at no cost on this CPU: benchmarks/RESULTS.md).
            Defaults to True.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    seed: int = 0
    deterministic: bool = True

    def validate(self) -> Config:
        """Checks value ranges and choices; returns self.

        Raises:
            ConfigError: naming the first bad option and its allowed values.
        """
        m, d, a, r = self.model, self.data, self.augment, self.recipe
        _choice("model.pooling", m.pooling, POOLINGS)
        _choice("recipe.optimizer", r.optimizer, OPTIMIZERS)
        _choice("augment.fill_mode", a.fill_mode, FILL_MODES)
        _choice("recipe.class_weight", r.class_weight, CLASS_WEIGHTS)
        _choice("recipe.schedule", r.schedule, SCHEDULES)
        _choice("recipe.unfreeze", r.unfreeze, ("at_once", "gradual", "plateau"))
        if r.gradual_epochs < 1:
            raise ConfigError(f"recipe.gradual_epochs must be 1 or more, got {r.gradual_epochs}.")
        _range("recipe.warmup_epochs", r.warmup_epochs, 0.0, 1e6)
        if not 0.0 < r.plateau_factor < 1.0:
            raise ConfigError(f"recipe.plateau_factor = {r.plateau_factor} must be in (0, 1).")
        if r.plateau_patience < 0:
            raise ConfigError("recipe.plateau_patience must be 0 or more.")
        _range("model.dropout", m.dropout, 0.0, 0.99)
        _range("augment.rotation", a.rotation, 0.0, 180.0)
        _range("augment.zoom", a.zoom, 0.0, 0.9)
        _range("augment.width_shift", a.width_shift, 0.0, 1.0)
        _range("augment.height_shift", a.height_shift, 0.0, 1.0)
        _range("augment.shear", a.shear, 0.0, 1.0)
        _range("augment.mixup", a.mixup, 0.0, 10.0)
        _range("augment.cutmix", a.cutmix, 0.0, 10.0)
        if (a.mixup or a.cutmix) and not a.enabled:
            raise ConfigError(
                "augment.mixup / augment.cutmix need augmentation on (augment.enabled = true); "
                "drop --no-augment / --augment none, or the mixing options."
            )
        _range("data.val_fraction", d.val_fraction, 0.0, 0.9)
        _range("data.test_fraction", d.test_fraction, 0.0, 0.9)
        if d.val_fraction + d.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction + data.test_fraction must stay below 1.")
        if d.image_size and d.image_size < 16:
            raise ConfigError(f"data.image_size {d.image_size} is too small; use 32 or more.")
        if d.feature_cache_max_memory_gb < 0:
            raise ConfigError("data.feature_cache_max_memory_gb must be 0 or more.")
        if not d.max_memory_gb > 0:
            raise ConfigError(f"data.max_memory_gb must be positive, got {d.max_memory_gb}.")
        if d.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {d.batch_size}.")
        for name in (
            "head_epochs",
            "finetune_epochs",
            "early_stopping_patience",
            "average_last_epochs",
        ):
            if getattr(r, name) < 0:
                raise ConfigError(f"recipe.{name} must be 0 or more, got {getattr(r, name)}.")
        for name in ("head_lr", "finetune_lr"):
            if not getattr(r, name) > 0:
                raise ConfigError(f"recipe.{name} must be positive, got {getattr(r, name)}.")
        if r.unfreeze_groups < -1:
            raise ConfigError("recipe.unfreeze_groups must be -1 (all) or a count of 0 or more.")
        _range("recipe.label_smoothing", r.label_smoothing, 0.0, 0.5)
        if not 0.0 < r.discriminative_lr <= 1.0:
            raise ConfigError(
                f"recipe.discriminative_lr = {r.discriminative_lr} must be in (0, 1]; "
                "e.g. 0.01 trains the lowest unfrozen group 100x slower than the head."
            )
        p = self.prune
        if not 0.0 <= p.sparsity < 1.0:
            raise ConfigError(f"prune.sparsity = {p.sparsity} must be in [0, 1), e.g. 0.5.")
        if p.epochs < 1:
            raise ConfigError(f"prune.epochs must be 1 or more, got {p.epochs}.")
        if not p.learning_rate > 0:
            raise ConfigError(f"prune.learning_rate must be positive, got {p.learning_rate}.")
        if not 0.0 < p.ramp_fraction <= 1.0:
            raise ConfigError(f"prune.ramp_fraction = {p.ramp_fraction} must be in (0, 1].")
        if p.frequency < 0 or p.min_weights < 0:
            raise ConfigError("prune.frequency and prune.min_weights must be 0 or more.")
        _range("prune.power", p.power, 1.0, 10.0)
        if any(u < 1 for u in m.hidden_units):
            raise ConfigError(f"model.hidden_units must be positive sizes, got {m.hidden_units}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as plain TOML-ready data."""
        return dataclasses.asdict(self)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of: {', '.join(allowed)}.")


def _range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} = {value} is outside [{low}, {high}].")


_SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "recipe": RecipeConfig,
    "prune": PruneConfig,
}


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Checks a TOML value against a dataclass field type (ints are accepted for floats)."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (list,):
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where} must be a whole number, got {value!r}.")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}.")
    return value


def _section_from_dict(section: str, data: dict[str, Any], base: Any, source: str) -> Any:
    cls = _SECTION_CLASSES[section]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {key!r} in [{section}]. "
                f"Known keys: {', '.join(sorted(known))}."
            )
        changes[key] = _coerce(f"{source}: {section}.{key}", value, hints[key])
    return dataclasses.replace(base, **changes)


def config_from_dict(
    data: dict[str, Any], base: Config | None = None, source: str = "config"
) -> Config:
    """Builds a `Config` from nested plain data (the TOML layout), on top of `base`.

    Raises:
        ConfigError: an unknown section or key, or a value of the wrong type.
    """
    config = base or Config()
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "seed":
            changes["seed"] = _coerce(f"{source}: seed", value, int)
        elif key == "deterministic":
            changes["deterministic"] = _coerce(f"{source}: deterministic", value, bool)
        elif key in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table of keys.")
            changes[key] = _section_from_dict(key, value, getattr(config, key), source)
        else:
            known = ", ".join(["seed", "deterministic", *_SECTION_CLASSES])
            raise ConfigError(f"{source}: unknown section or key {key!r}. Known: {known}.")
    return dataclasses.replace(config, **changes).validate()


def load_config(path: str | Path, base: Config | None = None) -> Config:
    """Reads a TOML config file; keys it does not name keep their defaults.

    Raises:
        ConfigError: the file is missing or not valid TOML, or holds unknown keys or bad values.

    Example:
        >>> config = load_config("examples/seed001_freeze_then_unfreeze.toml")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    from finetune.untrusted import read_text

    # UTF-8 only, as TOML requires (a byte order mark is dropped); other encodings are refused
    # naming the line.
    text = read_text(path, "TOML", ConfigError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return config_from_dict(data, base, source=str(path))


def dump_config(config: Config) -> str:
    """The config as TOML text (the form `load_config` reads back)."""
    return tomli_w.dumps(config.to_dict())


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Returns a copy with dotted-name overrides, e.g. `{"recipe.head_lr": 1e-3}`.

    None values are ignored, so CLI options left unset keep the config's value.

    Raises:
        ConfigError: an unknown name or a bad value.
    """
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        if "." in dotted:
            section, key = dotted.split(".", 1)
            nested.setdefault(section, {})[key] = value
        else:
            nested[dotted] = value
    return config_from_dict(nested, config, source="option")
