"""`--recipe auto`: the recipe chosen from the dataset size, the number of classes and the backbone.

The rules are few and each has a reason a user can read; `auto_recipe` returns them next to the
config as `Decision`s, and `train` writes them to `recipe_auto.json` in the run directory. They
were calibrated with `benchmarks/accuracy.py` on Fashion-MNIST at 64 px with EfficientNet-Lite0
(see benchmarks/RESULTS.md): treat them as a good starting point, not as a law.

Options the user gave explicitly (CLI flags, keyword arguments) are never overridden; recipe
values from a config file are (the automatic recipe replaces the file's recipe).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from finetune.backbones.registry import BackboneSpec
from finetune.config import Config

# Images per class below which the data is "few-shot", and above which it is "large".
FEW_SHOT = 30
LARGE = 300
# Steps of training that give a small dataset enough updates without overfitting it: the
# epoch budget, when the user gives none, is chosen to reach about this many steps.
TARGET_STEPS = 400


@dataclass(frozen=True)
class Decision:
    """One choice of the automatic recipe: the option, its value and why."""

    option: str
    value: object
    reason: str


def _regime(per_class: float) -> str:
    if per_class < FEW_SHOT:
        return "few-shot"
    if per_class <= LARGE:
        return "small"
    return "large"


def auto_recipe(
    config: Config,
    train_labels: np.ndarray,
    num_classes: int,
    spec: BackboneSpec,
    *,
    keep: frozenset[str] = frozenset(),
    epochs: int | None = None,
) -> tuple[Config, list[Decision]]:
    """Chooses the recipe for a training split.

    Args:
        config: the config to start from; its data and model sections are kept.
        train_labels: class index of every training image.
        num_classes: number of classes.
        spec: the backbone's registry entry (its layer groups).
        keep: dotted option names the user set explicitly; they are left as they are.
        epochs: total epoch budget to split between the phases; None chooses it from the
            dataset size (about `TARGET_STEPS` steps, 6 to 40 epochs).

    Returns:
        (the config with the chosen recipe, the decisions with their reasons).
    """
    counts = np.bincount(train_labels, minlength=num_classes)
    per_class = float(np.median(counts)) if len(counts) else 0.0
    regime = _regime(per_class)
    n = int(len(train_labels))
    batch = config.data.batch_size
    steps_per_epoch = max(1, math.ceil(n / batch))
    groups = len(spec.layer_groups)
    why_size = f"{per_class:g} training images per class (median) is {regime}"

    decisions: list[Decision] = []
    recipe = config.recipe

    def choose(option: str, value: object, reason: str) -> None:
        nonlocal recipe
        if f"recipe.{option}" in keep:
            return
        recipe = dataclasses.replace(recipe, **{option: value})
        decisions.append(Decision(f"recipe.{option}", value, reason))

    if epochs is None:
        total = int(min(40, max(6, round(TARGET_STEPS / steps_per_epoch))))
        budget_reason = (
            f"about {TARGET_STEPS} steps of {batch} images ({steps_per_epoch} steps per epoch), "
            "kept between 6 and 40 epochs"
        )
    else:
        total = epochs
        budget_reason = f"the given budget of {epochs} epochs"

    # Phase 1 runs on cached features, so it is nearly free; its share of the budget grows as
    # the data shrinks, because a well-trained head is what small data can learn safely.
    head_share = {"few-shot": 0.5, "small": 0.4, "large": 0.2}[regime]
    choose(
        "head_epochs",
        max(1, round(total * head_share)),
        f"{why_size}: {head_share:.0%} of {budget_reason} trains the head on the frozen backbone",
    )
    # The rest of the budget, after the head epochs (chosen here or given by the user).
    choose(
        "finetune_epochs",
        max(1, total - recipe.head_epochs),
        f"the rest of {budget_reason} after {recipe.head_epochs} head epochs",
    )

    # How much of the backbone to adapt. Measured: all groups beat the top third and the top
    # two thirds at 10 and at 100 images per class; below 10 per class nothing was measured
    # and the bottom third stays frozen as a guard against over-fitting.
    if per_class < 10:
        unfreeze = max(1, round(groups * 2 / 3))
        depth_reason = f"{why_size} (under 10): unfreeze the top {unfreeze} of {groups} groups"
    else:
        unfreeze = -1
        depth_reason = f"{why_size}: unfreeze all {groups} layer groups of {spec.name}"
    choose("unfreeze_groups", unfreeze, depth_reason)
    choose(
        "discriminative_lr",
        0.1,
        "lower groups hold more general features: their learning rate falls geometrically to "
        "0.1x at the lowest unfrozen group",
    )
    finetune_lr = 2e-3 if regime == "few-shot" else 1e-3
    choose(
        "finetune_lr",
        finetune_lr,
        f"{why_size}: peak fine-tuning rate {finetune_lr:g} (the top group; 0.1x at the lowest)",
    )
    choose(
        "schedule",
        "cosine",
        "cosine decay lets each phase end at a small learning rate, which settles the weights",
    )
    choose("warmup_epochs", 1.0, "one epoch of warm-up keeps the first updates of the newly "
           "unfrozen layers small while the optimizer's statistics build up")  # fmt: skip
    if regime == "large":
        choose("label_smoothing", 0.1, f"{why_size}: label smoothing 0.1 against over-confidence")
    if num_classes > 1 and counts.min() > 0 and counts.max() / counts.min() >= 3:
        choose(
            "class_weight",
            "balanced",
            f"the largest class has {counts.max() / counts.min():.1f}x the images of the "
            "smallest: weight the loss by inverse class frequency",
        )
    return dataclasses.replace(config, recipe=recipe).validate(), decisions
