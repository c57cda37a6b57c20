"""Unfreezing on a plateau: the next group is unfrozen when the loss stops improving."""

from __future__ import annotations

import pytest

from finetune.backbones.registry import get_backbone
from finetune.config import RecipeConfig
from finetune.data.pipeline import prepare_image_data
from finetune.model import backbone_of, build_classifier
from finetune.recipes import PhaseData, fit_phases, two_phase_plan
from finetune.train import seed_everything
from tests.helpers import DIGITS, image_subset

SPEC = get_backbone("efficientnet_lite0")


def test_plan_shares_the_budget_and_the_last_step_runs_to_the_end():
    recipe = RecipeConfig(
        head_epochs=1, finetune_epochs=6, unfreeze_groups=3, unfreeze="plateau", plateau_patience=2
    )
    plan = two_phase_plan(recipe)
    assert [(p.name, p.unfreeze_groups, p.until_plateau, p.budget) for p in plan[1:]] == [
        ("finetune_1", 1, 2, "finetune"),
        ("finetune_2", 2, 2, "finetune"),
        ("finetune_3", 3, 0, "finetune"),
    ]


@pytest.mark.slow
def test_a_stalled_loss_unfreezes_the_next_group(tmp_path):
    folder = image_subset(DIGITS, tmp_path / "digits", classes=3, per_class=20)
    data = prepare_image_data(folder, image_size=32, val_fraction=0.3, test_fraction=0.0)
    seed_everything(0)
    model = build_classifier(SPEC, data.num_classes, image_size=32)
    # A learning rate so small the validation loss cannot improve by 1e-4: every step stalls.
    recipe = RecipeConfig(
        head_epochs=0,
        finetune_epochs=7,
        finetune_lr=1e-12,
        unfreeze_groups=3,
        unfreeze="plateau",
        plateau_patience=1,
        early_stopping_patience=0,
    )
    records = fit_phases(
        model,
        SPEC,
        recipe,
        two_phase_plan(recipe, num_groups=len(SPEC.layer_groups)),
        PhaseData(
            data.images["train"], data.labels["train"], data.num_classes, batch_size=16,
            val_images=data.images["val"], val_labels=data.labels["val"],
        ),
        verbose=0,
    )  # fmt: skip
    phases = [r["phase"] for r in records]
    # 1 epoch to set the best loss + 1 without improvement, then the next group; the last
    # step runs what is left of the 7 epochs.
    assert phases == ["finetune_1"] * 2 + ["finetune_2"] * 2 + ["finetune_3"] * 3
    assert [r["epoch"] for r in records] == list(range(1, 8))
    top = set(SPEC.group_names[-3:])
    layers = backbone_of(model).layers
    trainable = {SPEC.group_of(x.name) for x in layers if x.trainable_weights}
    assert trainable == top
