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


def _load_api() -> None:
    from finetune import _api

    globals().update({name: getattr(_api, name) for name in __all__})


def _lazy() -> bool:
    """True when the `finetune` command started this process (`_finetune_cli.main`): the public
    names, Keras and TensorFlow are then imported on first use, so that a command which needs
    none of them (`--help`, `predict` from a kept conversion) starts in a fraction of a second."""
    launcher = sys.modules.get("_finetune_cli")
    return bool(getattr(launcher, "STARTED", False))


if _lazy():

    def __getattr__(name: str):
        if name in __all__:
            _load_api()
            return globals()[name]
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")

else:
    _load_api()
