"""Compression of a fine-tuned classifier: magnitude pruning (`finetune.compress.prune`).

Quantization happens on export (`finetune.export`: LiteRT float16, dynamic-range and full-integer
int8, calibrated on the run's training images).
"""

from finetune.compress.prune import (
    MagnitudePruning,
    choose_layers,
    gzipped_weights_size,
    polynomial_sparsity,
    prune_phase,
)

__all__ = [
    "MagnitudePruning",
    "choose_layers",
    "gzipped_weights_size",
    "polynomial_sparsity",
    "prune_phase",
]
