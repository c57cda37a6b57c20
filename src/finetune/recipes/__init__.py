"""Fine-tuning recipes: the phases of `fit` calls that adapt a pretrained network."""

from finetune.recipes.optimizers import make_optimizer
from finetune.recipes.two_phase import (
    Phase,
    PhaseData,
    PhaseLogger,
    fit_phases,
    two_phase_plan,
)

__all__ = ["Phase", "PhaseData", "PhaseLogger", "fit_phases", "make_optimizer", "two_phase_plan"]
