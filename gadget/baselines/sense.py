"""CG-SENSE: Tikhonov-regularised SENSE solved by conjugate gradients (Pruessmann et al., MRM 2001).

Model: ``y = M F S x + noise`` with ``S`` the coil maps, ``F`` the centred orthonormal 2-D FFT
(:func:`gadget.mri.fft.fft2c`) and ``M`` the 0/1 sampling mask over phase columns. The estimate

    x̂ = argmin_x ||M F S x − y||² + λ ||x||²  ⇔  (Aᴴ A + λ I) x = Aᴴ y,   A = M F S,

is found by CG on the normal equations starting from ``x = 0``. With maps normalised so that
``Σ_coil |S|² = 1`` (ESPIRiT's, where kept) ``||AᴴA|| ≤ 1``, so ``λ`` is relative to the largest
eigenvalue of ``AᴴA`` without further scaling; the solution is linear in ``y``, so data units do
not matter. ``|x̂|`` is comparable to an RSS image (RSS = ``|x| · sqrt(Σ|S|²)``).

Layouts: k-space ``(batch, coil, readout, phase)`` complex; maps the same; mask bool ``(phase,)``
(or anything broadcastable to the k-space); images ``(batch, readout, phase)`` complex.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..mri.coils import sens_expand, sens_reduce


@dataclass(frozen=True)
class SenseConfig:
    """``iterations``: CG steps (early stopping also regularises); ``lam``: Tikhonov weight λ
    relative to ``||AᴴA||`` (≤ 1 for normalised maps); ``tol``: stop when the residual norm falls
    below ``tol · ||Aᴴy||`` for every slice of the batch.

    Defaults: on simulated 12-coil brain slices at 4× (30 dB SNR, 10 ACS lines) λ = 1e-2 gave the
    lowest NMSE and, unlike λ ≤ 3e-3, does not degrade when run for 30 iterations (noise
    amplification by the g-factor); 15 iterations are converged to within 1 % NMSE."""

    iterations: int = 15
    lam: float = 1e-2
    tol: float = 1e-6


def _as_mask(mask, kspace: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask, dtype=bool) if not isinstance(mask, torch.Tensor) else mask)
    m = m.to(kspace.device, torch.bool)
    if m.ndim == 1:
        if m.numel() != kspace.shape[-1]:
            raise ValueError(f"mask has {m.numel()} columns, k-space {tuple(kspace.shape)} has {kspace.shape[-1]}")
        m = m.view(*([1] * (kspace.ndim - 1)), -1)
    return m


class SenseOperator:
    """``A = M F S`` for a batch: ``forward`` image ``(b, r, p)`` → k-space ``(b, c, r, p)``,
    ``adjoint`` back, ``normal`` = ``AᴴA`` (``MᴴM = M`` for a 0/1 mask)."""

    def __init__(self, maps: torch.Tensor, mask):
        if maps.ndim != 4 or not torch.is_complex(maps):
            raise ValueError(f"maps must be complex (batch, coil, readout, phase), "
                             f"got {maps.dtype} {tuple(maps.shape)}")
        self.maps = maps
        self.mask = _as_mask(mask, maps)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return sens_expand(image.unsqueeze(1), self.maps) * self.mask

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        return sens_reduce(kspace * self.mask, self.maps).squeeze(1)

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.forward(image))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-slice ⟨a, b⟩ = Σ conj(a) b over all but the first axis → ``(batch,)`` complex."""
    return (a.conj() * b).flatten(1).sum(1)


def conjugate_gradient(apply, rhs: torch.Tensor, iterations: int, tol: float = 0.0) -> torch.Tensor:
    """Solve ``apply(x) = rhs`` (Hermitian positive definite, batched over axis 0) from ``x = 0``."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = _dot(r, r).real
    stop = (tol * tol) * rr
    shape = (-1,) + (1,) * (rhs.ndim - 1)
    for _ in range(iterations):
        if bool((rr <= stop).all()):
            break
        ap = apply(p)
        alpha = torch.where(rr > 0, rr / _dot(p, ap).real.clamp_min(torch.finfo(rr.dtype).tiny), 0.0)
        x = x + alpha.view(shape) * p
        r = r - alpha.view(shape) * ap
        rr_new = _dot(r, r).real
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny), 0.0)
        p = r + beta.view(shape) * p
        rr = rr_new
    return x


def cg_sense(kspace, maps, mask, config: SenseConfig = SenseConfig()) -> torch.Tensor:
    """CG-SENSE reconstruction.

    Args:
        kspace: complex ``(batch, coil, readout, phase)`` or ``(coil, readout, phase)``, unsampled
            columns zero (they are masked again anyway).
        maps: complex coil maps, same shape as ``kspace`` (or ``(coil, r, p)`` shared by the batch).
        mask: bool ``(phase,)`` sampled columns.
        config: :class:`SenseConfig`.

    Returns:
        complex image ``(batch, readout, phase)`` (or ``(readout, phase)`` for unbatched input),
        in the dtype of ``kspace``.
    """
    k = torch.as_tensor(kspace)
    squeeze = k.ndim == 3
    if squeeze:
        k = k.unsqueeze(0)
    if k.ndim != 4 or not torch.is_complex(k):
        raise ValueError(f"kspace must be complex (batch, coil, readout, phase), got {k.dtype} {tuple(k.shape)}")
    s = torch.as_tensor(maps).to(k.device, k.dtype)
    if s.ndim == 3:
        s = s.unsqueeze(0).expand(k.shape[0], -1, -1, -1)
    if s.shape != k.shape:
        raise ValueError(f"maps shape {tuple(s.shape)} does not match k-space {tuple(k.shape)}")
    op = SenseOperator(s, mask)
    lam = float(config.lam)
    x = conjugate_gradient(lambda v: op.normal(v) + lam * v, op.adjoint(k), config.iterations, config.tol)
    return x[0] if squeeze else x
