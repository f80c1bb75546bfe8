"""Image-quality metrics with fastMRI (``fastmri/evaluate.py``) semantics, in numpy only.

Inputs are real magnitude volumes, numpy arrays ``(slices, H, W)`` in arbitrary
intensity units (target and reconstruction in the same units). All arithmetic is
done in float64 whatever the input dtype.

* NMSE = ||target - recon||² / ||target||² (unitless, over the whole volume).
* PSNR = 10 log10(maxval² / MSE) in dB, MSE over the whole volume.
* SSIM = mean over slices of the per-slice mean SSIM, computed as scikit-image's
  ``structural_similarity`` with its defaults (7x7 uniform window, K1=0.01,
  K2=0.03, sample covariance, mean over the pixels whose window lies entirely
  inside the slice).

``maxval`` defaults to ``target.max()`` of the volume, as in fastMRI. fastMRI
computes in the input precision (float32 for float32 volumes); this module uses
float64, so for float32 inputs results differ from fastMRI only by float32
rounding.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
METRIC_NAMES = ("nmse", "psnr", "ssim")


# ----------------------------------------------------------------------------- helpers


def center_crop(x, shape: Tuple[int, int]):
    """Centre crop of the last two axes of an array/tensor ``(..., H, W)`` to ``(h, w)``.

    The crop starts at ``(H - h) // 2`` and ``(W - w) // 2`` (fastMRI convention).
    Returns a view (slicing) of ``x``; works for numpy arrays and torch tensors.
    """
    if len(x.shape) < 2:
        raise ValueError(f"center_crop needs at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")
    h, w = (int(s) for s in shape)
    rows, cols = x.shape[-2], x.shape[-1]
    if not (0 < h <= rows and 0 < w <= cols):
        raise ValueError(f"crop shape {(h, w)} must be positive and fit in the last two axes {(rows, cols)}")
    top, left = (rows - h) // 2, (cols - w) // 2
    return x[..., top : top + h, left : left + w]


def center_crop_at_most(x, shape: Tuple[int, int]):
    """:func:`center_crop` to ``shape``, but no crop along an axis that is already smaller."""
    return center_crop(x, (min(int(shape[0]), x.shape[-2]), min(int(shape[1]), x.shape[-1])))


def _pair_as_float64(target, recon) -> Tuple[np.ndarray, np.ndarray]:
    target = np.asarray(target)
    recon = np.asarray(recon)
    if target.shape != recon.shape:
        raise ValueError(f"target shape {target.shape} does not match reconstruction shape {recon.shape}")
    if np.iscomplexobj(target) or np.iscomplexobj(recon):
        raise ValueError("metrics expect real-valued (magnitude) volumes, got complex data")
    if target.size == 0:
        raise ValueError(f"volumes are empty (shape {target.shape})")
    return target.astype(np.float64, copy=False), recon.astype(np.float64, copy=False)


def _resolve_maxval(target: np.ndarray, maxval: Optional[float]) -> float:
    value = float(target.max()) if maxval is None else float(maxval)
    if not value > 0 or not math.isfinite(value):
        source = "target.max()" if maxval is None else "maxval"
        raise ValueError(f"{source} must be a finite positive number, got {value}")
    return value


# ----------------------------------------------------------------------------- metrics


def nmse(target, recon) -> float:
    """Normalised MSE ``||target - recon||² / ||target||²`` over arrays of any (equal) shape."""
    target, recon = _pair_as_float64(target, recon)
    energy = float(np.sum(target * target))
    if energy == 0.0:
        raise ValueError("target is all zeros; NMSE is undefined")
    return float(np.sum((target - recon) ** 2)) / energy


def psnr(target, recon, maxval: Optional[float] = None) -> float:
    """Peak SNR in dB: ``10 log10(maxval² / mean((target - recon)²))``; ``inf`` if identical.

    Args:
        target, recon: arrays of equal shape (typically ``(slices, H, W)``).
        maxval: peak value, default ``target.max()``.
    """
    target, recon = _pair_as_float64(target, recon)
    peak = _resolve_maxval(target, maxval)
    mse = float(np.mean((target - recon) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def _box_mean_valid(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over every ``size x size`` window fully inside the last two axes: ``(..., H-size+1, W-size+1)``."""
    rows = sliding_window_view(x, size, axis=-2).sum(axis=-1)
    return sliding_window_view(rows, size, axis=-1).sum(axis=-1) / (size * size)


def ssim_slice(target: np.ndarray, recon: np.ndarray, maxval: float) -> float:
    """Mean SSIM of one 2-D slice ``(H, W)`` (H, W >= 7) with data range ``maxval``."""
    size = SSIM_WIN_SIZE
    n = size * size
    cov_norm = n / (n - 1)  # sample (N-1) covariance, as scikit-image's default
    mu_x = _box_mean_valid(target, size)
    mu_y = _box_mean_valid(recon, size)
    var_x = cov_norm * (_box_mean_valid(target * target, size) - mu_x * mu_x)
    var_y = cov_norm * (_box_mean_valid(recon * recon, size) - mu_y * mu_y)
    cov_xy = cov_norm * (_box_mean_valid(target * recon, size) - mu_x * mu_y)
    c1 = (SSIM_K1 * maxval) ** 2
    c2 = (SSIM_K2 * maxval) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


def ssim(target, recon, maxval: Optional[float] = None) -> float:
    """Mean over slices of the per-slice SSIM of volumes ``(slices, H, W)``, H and W >= 7.

    Args:
        maxval: data range, default ``target.max()`` of the whole volume.
    """
    target, recon = _pair_as_float64(target, recon)
    if target.ndim != 3:
        raise ValueError(f"ssim expects volumes (slices, H, W), got shape {target.shape}")
    if min(target.shape[1:]) < SSIM_WIN_SIZE:
        raise ValueError(
            f"slices must be at least {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} for SSIM, got {target.shape[1:]}"
        )
    peak = _resolve_maxval(target, maxval)
    per_slice = [ssim_slice(t, r, peak) for t, r in zip(target, recon)]
    return float(np.mean(per_slice))


def volume_metrics(target, recon, maxval: Optional[float] = None) -> Dict[str, float]:
    """``{"nmse", "psnr", "ssim"}`` of one volume ``(slices, H, W)``."""
    return {
        "nmse": nmse(target, recon),
        "psnr": psnr(target, recon, maxval),
        "ssim": ssim(target, recon, maxval),
    }


# ----------------------------------------------------------------------------- aggregation


class VolumeMetrics:
    """Collects per-volume metrics; the summary is the unweighted mean over volumes (as fastMRI)."""

    def __init__(self, crop: Optional[Tuple[int, int]] = None):
        """``crop``: optional ``(h, w)`` centre crop applied to target and reconstruction first."""
        self.crop = None if crop is None else tuple(int(s) for s in crop)
        self.per_volume: Dict[str, Dict[str, float]] = {}

    def add(self, name: str, target, recon, maxval: Optional[float] = None) -> Dict[str, float]:
        """Score one volume ``(slices, H, W)`` under ``name`` (must be new) and return its metrics."""
        if name in self.per_volume:
            raise ValueError(f"volume {name!r} was already added")
        target, recon = np.asarray(target), np.asarray(recon)
        if self.crop is not None:
            target, recon = center_crop(target, self.crop), center_crop(recon, self.crop)
        try:
            scores = volume_metrics(target, recon, maxval)
        except ValueError as err:
            raise ValueError(f"volume {name!r}: {err}") from err
        self.per_volume[name] = scores
        return scores

    def __len__(self) -> int:
        return len(self.per_volume)

    def mean(self) -> Dict[str, float]:
        """Mean of each metric over the volumes added so far."""
        if not self.per_volume:
            raise ValueError("no volumes added; mean is undefined")
        return {
            key: float(np.mean([scores[key] for scores in self.per_volume.values()])) for key in METRIC_NAMES
        }

    def summary(self) -> Dict[str, object]:
        """``{"per_volume": {name: {metric: value}}, "mean": {metric: value}, "num_volumes": int}``."""
        return {
            "per_volume": {name: dict(scores) for name, scores in self.per_volume.items()},
            "mean": self.mean(),
            "num_volumes": len(self.per_volume),
        }


def evaluate_volumes(
    pairs: Iterable[Sequence], crop: Optional[Tuple[int, int]] = None
) -> Dict[str, object]:
    """Score ``(name, target, recon)`` or ``(name, target, recon, maxval)`` items.

    Volumes are ``(slices, H, W)`` real arrays. Returns :meth:`VolumeMetrics.summary`:
    per-volume metrics and their unweighted mean over volumes.
    """
    collector = VolumeMetrics(crop=crop)
    for item in pairs:
        if len(item) not in (3, 4):
            raise ValueError(f"expected (name, target, recon[, maxval]) items, got {len(item)} elements")
        collector.add(*item)
    return collector.summary()
