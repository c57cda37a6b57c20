"""`finetune lr-find`: the learning-rate range test on an image folder, and `--lr auto`.

The test runs on the classifier as phase 1 trains it (pretrained backbone frozen, new head),
with the same data pipeline, optimizer and loss, so its suggestion is a head learning rate.
`--lr auto` uses it as `head_lr` and a tenth of it as `finetune_lr`, keeping the recipe's
10x step down for the unfrozen backbone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras

from finetune.atomic import write_json
from finetune.config import Config
from finetune.data.pipeline import PreparedData
from finetune.errors import FinetuneError
from finetune.model import freeze_backbone
from finetune.recipes.lr_finder import LRFinderResult, find_learning_rate
from finetune.recipes.optimizers import make_optimizer


def range_test(data: PreparedData, config: Config, num_steps: int = 100) -> LRFinderResult:
    """Runs the range test for phase 1 of `config` on prepared data."""
    from finetune.train import build_run_model, phase_data, seed_everything

    seed_everything(config.seed, deterministic=config.deterministic)
    model = build_run_model(data, config)
    freeze_backbone(model)
    # The batches phase 1 trains on: augmented only if `head_augment`.
    train_ds = phase_data(data, config).train_dataset(augment=config.recipe.head_augment)
    loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=config.recipe.label_smoothing
    )
    return find_learning_rate(
        model, train_ds, optimizer=make_optimizer(config.recipe, 1e-7), loss=loss,
        num_steps=num_steps,
    )  # fmt: skip


def save_range_test(result: LRFinderResult, folder: Path) -> Path:
    """Writes `lr_find.png` and `lr_find.json` into `folder`; returns the PNG's path."""
    write_json(folder / "lr_find.json", dataclasses.asdict(result))
    return result.plot(folder / "lr_find.png")


def config_with_found_lr(
    config: Config, result: LRFinderResult, keep: frozenset[str] = frozenset()
) -> Config:
    """`config` with head_lr = the suggestion and finetune_lr derived from it.

    finetune_lr is the suggestion itself when phase 2 uses discriminative rates
    (`discriminative_lr` < 1: the top group at the head's rate, lower groups geometrically
    less, as the default recipe does) and a tenth of it with one rate for every layer.

    Args:
        config: the config.
        result: the range test.
        keep: dotted option names the user gave ("recipe.head_lr", "recipe.finetune_lr"),
            left as they are. Defaults to none.

    Raises:
        FinetuneError: the test found no usable learning rate (the loss was never finite).
    """
    if not result.suggestion > 0:
        raise FinetuneError(
            "the learning-rate range test found no learning rate where the loss was finite; "
            "check the data, or give --head-lr and --finetune-lr yourself."
        )
    recipe = config.recipe
    factor = 1.0 if recipe.discriminative_lr < 1.0 else 0.1
    if "recipe.head_lr" not in keep:
        recipe = dataclasses.replace(recipe, head_lr=result.suggestion)
    if "recipe.finetune_lr" not in keep:
        recipe = dataclasses.replace(recipe, finetune_lr=result.suggestion * factor)
    return dataclasses.replace(config, recipe=recipe)


def lr_find(
    data_dir: str | Path,
    *,
    out: str | Path | None = None,
    config: Config | str | Path | None = None,
    num_steps: int = 100,
    progress: bool = True,
    **options: Any,
) -> LRFinderResult:
    """Runs the learning-rate range test for phase 1 on an image folder.

    Args:
        data_dir: the image folder, as for `finetune.train`.
        out: folder for `lr_find.png` and `lr_find.json`; None writes nothing. Defaults to None.
        config: a `Config` or the path of a TOML config. Defaults to the built-in defaults.
        num_steps: training batches of the ramp (the data repeats as needed). Defaults to 100.
        progress: show progress while decoding. Defaults to True.
        **options: single options, as for `finetune.train`.

    Returns:
        The curve and the suggested learning rate.

    Example:
        >>> finetune.lr_find("photos/", out="runs/lr").suggestion
    """
    from finetune.train import prepare_data, resolve_config

    config = resolve_config(config, **options)
    data = prepare_data(data_dir, config, progress=progress, spill_dir=out)
    result = range_test(data, config, num_steps=num_steps)
    if out is not None:
        save_range_test(result, Path(out))
    return result
