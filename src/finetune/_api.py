"""Every public name of `finetune`, imported: what `import finetune` loads (TensorFlow with it).

`finetune/__init__.py` takes its names from here, at once, or on first use when the `finetune`
command started the process (see `_finetune_cli`).
"""

# ruff: noqa: F401, E402

from finetune._startup import import_tensorflow_quietly

import_tensorflow_quietly()

from finetune.atomic import DiskFullError
from finetune.backbones.registry import (
    BackboneSpec,
    Preprocessing,
    get_backbone,
    list_backbones,
    load_backbone,
    register_backbone,
)
from finetune.calibration import fit_temperature
from finetune.config import (
    AugmentConfig,
    Config,
    DataConfig,
    ModelConfig,
    PruneConfig,
    RecipeConfig,
    load_config,
)
from finetune.data.inspect import DatasetReport, inspect_folder
from finetune.ensemble import ensemble  # also registers CombineMembers
from finetune.errors import (
    ConfigError,
    DataError,
    FinetuneError,
    ImageDecodeError,
    NonFiniteLossError,
    WeightsError,
)
from finetune.evaluate import (
    Predictions,
    classification_metrics,
    evaluate,
    evaluate_with_predictions,
    expected_calibration_error,
)
from finetune.export import (
    ExportedModel,
    ExportReport,
    ParityReport,
    export_run,
    load_exported,
)
from finetune.fold import fold_batchnorm
from finetune.gradcam import grad_cam
from finetune.lr_find import lr_find
from finetune.model import (
    BatchNormCheck,
    BatchNormWarning,
    Normalize,
    build_classifier,
    check_batchnorm,
    freeze_backbone,
    unfreeze_top_groups,
)
from finetune.predict import Prediction, predict
from finetune.recipes.resume import ResumeError
from finetune.report import write_report
from finetune.run import Run
from finetune.runs import RunSummary, list_runs
from finetune.train import prune, train, train_with_scratch_baseline
