"""Evaluation: fastMRI-style scoring of reconstructions and method comparisons.

* :mod:`.scoring` — per-volume NMSE/PSNR/SSIM with fastMRI ``evaluate.py`` semantics, means over
  volumes and per acquisition (``varnet evaluate``);
* :mod:`.compare` — zero-filled, CG-SENSE, BART and E2E-VarNet on the same data
  (``varnet compare``, :func:`compare_methods` for training scripts);
* :mod:`.sources` — naming inputs (sources, ``NAME=PATH``) and checkpoints (``varnet:NAME`` rows);
* :mod:`.report` — ``results.md``, ``results.csv`` (per source and pooled), ``figure.png``;
* :mod:`.generalisation` — models × test sets seen in training or held out
  (``experiments/generalisation/scripts/generalisation_matrix.py``).
"""
from .compare import METHODS, Undersample, compare_methods
from .scoring import (
    TARGET_KEYS,
    EvaluationError,
    EvaluationResult,
    VolumeScore,
    evaluate_predictions,
    resolve_target_key,
    score_volume,
)

__all__ = ["METHODS", "Undersample", "compare_methods", "TARGET_KEYS", "EvaluationError", "EvaluationResult",
           "VolumeScore", "evaluate_predictions", "resolve_target_key", "score_volume"]
