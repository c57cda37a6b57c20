"""The reason to fine-tune: on the bundled data, pretrained weights beat random ones.

Same network (EfficientNet-Lite0), same split, same number of epochs; only the starting weights
differ. This is the demo's comparison on a smaller budget.
"""

from __future__ import annotations

import pytest

import finetune
from tests.helpers import FASHION, image_subset


@pytest.mark.slow
def test_fine_tuning_beats_training_from_scratch(tmp_path):
    data = image_subset(FASHION, tmp_path / "fashion", classes=10, per_class=60)
    tuned, scratch = finetune.train_with_scratch_baseline(
        data,
        out=tmp_path / "run",
        image_size=64,
        head_epochs=3,
        finetune_epochs=2,
        unfreeze_groups=3,
        seed=0,
        progress=False,
    )
    assert tuned.metrics["num_images"] == scratch.metrics["num_images"] == 60
    assert scratch.config.model.weights == "none"
    assert tuned.metrics["accuracy"] >= scratch.metrics["accuracy"] + 0.15, (
        tuned.metrics["accuracy"],
        scratch.metrics["accuracy"],
    )
    print("fine-tuned", tuned.metrics["accuracy"], "scratch", scratch.metrics["accuracy"])
    assert tuned.metrics["accuracy"] >= 0.5
    assert (tmp_path / "run" / "scratch_baseline" / "metrics.json").is_file()
