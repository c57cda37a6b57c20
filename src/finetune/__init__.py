"""finetune: fine-tune pretrained Keras 3 networks on your own image folders, offline.

Everything the `finetune` command does is one call here:

    import finetune
    run = finetune.train("photos/", backbone="efficientnet_lite0", out="runs/photos")
    run.model            # a plain keras.Model: RGB pixels in [0, 255] -> logits
    run.metrics["accuracy"]
    finetune.predict(run, ["some/photo.jpg"])
    finetune.evaluate("runs/photos")
    finetune.write_report("runs/photos")   # runs/photos/report.html
    finetune.export_run("runs/photos", "litert", quantize="int8")   # + parity check
    finetune.ensemble(["runs/a", "runs/b"], method="mean", out="runs/ab")  # one model
"""

__version__ = "0.1.0"

import sys  # noqa: E402

if "tensorflow" not in sys.modules:  # loaded here: without its native INFO lines
    from finetune._startup import quiet_native_startup

    with quiet_native_startup():
        import tensorflow  # noqa: F401

from finetune.atomic import DiskFullError  # noqa: E402
from finetune.backbones.registry import (  # noqa: E402
    BackboneSpec,
    Preprocessing,
    get_backbone,
    list_backbones,
    load_backbone,
    register_backbone,
)
from finetune.calibration import fit_temperature  # noqa: E402
from finetune.config import (  # noqa: E402
    AugmentConfig,
    Config,
    DataConfig,
    ModelConfig,
    PruneConfig,
    RecipeConfig,
    load_config,
)
from finetune.data.inspect import DatasetReport, inspect_folder  # noqa: E402
from finetune.ensemble import ensemble  # noqa: E402  (also registers CombineMembers)
from finetune.errors import (  # noqa: E402
    ConfigError,
    DataError,
    FinetuneError,
    ImageDecodeError,
    NonFiniteLossError,
    WeightsError,
)
from finetune.evaluate import (  # noqa: E402
    Predictions,
    classification_metrics,
    evaluate,
    evaluate_with_predictions,
    expected_calibration_error,
)
from finetune.export import (  # noqa: E402
    ExportedModel,
    ExportReport,
    ParityReport,
    export_run,
    load_exported,
)
from finetune.fold import fold_batchnorm  # noqa: E402
from finetune.gradcam import grad_cam  # noqa: E402
from finetune.lr_find import lr_find  # noqa: E402
from finetune.model import (  # noqa: E402
    BatchNormCheck,
    BatchNormWarning,
    Normalize,
    build_classifier,
    check_batchnorm,
    freeze_backbone,
    unfreeze_top_groups,
)
from finetune.predict import Prediction, predict  # noqa: E402
from finetune.recipes.resume import ResumeError  # noqa: E402
from finetune.report import write_report  # noqa: E402
from finetune.run import Run  # noqa: E402
from finetune.runs import RunSummary, list_runs  # noqa: E402
from finetune.train import prune, train, train_with_scratch_baseline  # noqa: E402

__all__ = [
    "AugmentConfig",
    "BackboneSpec",
    "BatchNormCheck",
    "BatchNormWarning",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DatasetReport",
    "DiskFullError",
    "ExportReport",
    "ExportedModel",
    "FinetuneError",
    "ImageDecodeError",
    "ModelConfig",
    "NonFiniteLossError",
    "Normalize",
    "ParityReport",
    "Prediction",
    "Predictions",
    "Preprocessing",
    "PruneConfig",
    "RecipeConfig",
    "ResumeError",
    "Run",
    "RunSummary",
    "WeightsError",
    "build_classifier",
    "check_batchnorm",
    "classification_metrics",
    "ensemble",
    "evaluate",
    "evaluate_with_predictions",
    "expected_calibration_error",
    "export_run",
    "fit_temperature",
    "fold_batchnorm",
    "freeze_backbone",
    "get_backbone",
    "grad_cam",
    "inspect_folder",
    "list_backbones",
    "list_runs",
    "load_backbone",
    "load_config",
    "load_exported",
    "lr_find",
    "predict",
    "prune",
    "register_backbone",
    "train",
    "train_with_scratch_baseline",
    "unfreeze_top_groups",
    "write_report",
]
