"""Coil combination and the sensitivity expand/reduce operators (E2E-VarNet eqs. 8-9).

Layouts: coil images and k-space ``(batch, coil, rows, cols)`` complex; sensitivity
maps the same; a combined image ``(batch, 1, rows, cols)`` complex.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .fft import fft2c, ifft2c


def rss(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Root-sum-of-squares over ``dim`` of a real or complex tensor (real result)."""
    if torch.is_complex(x):
        return torch.sqrt((x.real**2 + x.imag**2).sum(dim))
    return torch.sqrt((x**2).sum(dim))


def sens_expand(image: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """E: combined image ``(b, 1, h, w)`` → multi-coil k-space ``(b, c, h, w)``: F(S_i x)."""
    return fft2c(image * sens)


def sens_reduce(kspace: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """R = Eᴴ: multi-coil k-space ``(b, c, h, w)`` → combined image ``(b, 1, h, w)``: Σ S_i* F⁻¹(k_i)."""
    return (ifft2c(kspace) * sens.conj()).sum(dim=1, keepdim=True)


def normalize_sens(sens: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale maps so that Σ_i |S_i|² = 1 at every pixel (pixels with no signal stay 0, not NaN)."""
    return sens / rss(sens, dim=1).clamp_min(eps).unsqueeze(1)


def coil_noise_levels(kspace: np.ndarray, fraction: int = 8) -> np.ndarray:
    """Each coil's noise σ_c (``E|n|² = σ_c²``) of k-space ``(coil, readout, phase)``: the median magnitude
    of the outer ``1 / fraction`` of the readout on each side over √ln2 (|n| of complex Gaussian noise has
    median σ·√ln2), ``(coil,)`` float64. Samples that are exactly zero were never measured (lines not
    acquired, an asymmetric echo) and are left out; a coil with none gives 0."""
    band = max(kspace.shape[1] // fraction, 1)
    outer = np.abs(np.concatenate([kspace[:, :band], kspace[:, -band:]], axis=1)).reshape(kspace.shape[0], -1)
    return np.array([np.median(row[row > 0]) / math.sqrt(math.log(2)) if (row > 0).any() else 0.0
                     for row in outer])
