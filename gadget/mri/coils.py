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


def outer_readout(kspace: torch.Tensor, fraction: int = 8) -> torch.Tensor:
    """The outer ``1 / fraction`` of the readout on each side of k-space ``(..., readout, phase)``, where
    k-space holds the least signal: ``(..., 2·band, phase)``."""
    band = max(kspace.shape[-2] // fraction, 1)
    return torch.cat([kspace[..., :band, :], kspace[..., -band:, :]], dim=-2)


def noise_level(samples: torch.Tensor) -> torch.Tensor:
    """σ (``E|n|² = σ²``) of complex Gaussian noise from ``samples`` (any shape): the median magnitude over
    √ln2 (|n| has median σ·√ln2), 0-d. Samples that are exactly zero were never measured (lines not
    acquired, an asymmetric echo, a partial-Fourier or zero-padded region: noise is never exactly 0) and are
    left out; none measured gives 0."""
    magnitudes = samples.abs().flatten()
    magnitudes = magnitudes[magnitudes > 0]
    if not magnitudes.numel():
        return magnitudes.new_zeros(())
    return magnitudes.median() / math.sqrt(math.log(2))


def coil_noise_levels(kspace: np.ndarray, fraction: int = 8) -> np.ndarray:
    """Each coil's :func:`noise_level` over the :func:`outer_readout` of k-space ``(coil, readout, phase)``,
    ``(coil,)`` float64 (0 for a coil with nothing measured there)."""
    band = outer_readout(torch.from_numpy(np.ascontiguousarray(kspace)), fraction)
    return np.array([float(noise_level(coil)) for coil in band])
