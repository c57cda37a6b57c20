"""Export: a run's model as a `.keras` file, a SavedModel, a LiteRT (`.tflite`) or an ONNX model,
optionally quantized (LiteRT: float16, dynamic-range or full-integer int8), with its labels beside
it and a parity check against the Keras model (`export_run`); and exported models run by their
own runtimes with the run's labels and temperature (`load_exported`, used by `finetune predict`).
"""

from finetune.export.convert import FORMATS, QUANTIZATIONS
from finetune.export.exporter import ExportReport, export_run
from finetune.export.parity import MIN_FLOAT_AGREEMENT, ParityReport, check_parity
from finetune.export.runtime import ExportedModel, is_exported_model, load_exported

__all__ = [
    "FORMATS",
    "MIN_FLOAT_AGREEMENT",
    "QUANTIZATIONS",
    "ExportReport",
    "ExportedModel",
    "ParityReport",
    "check_parity",
    "export_run",
    "is_exported_model",
    "load_exported",
]
