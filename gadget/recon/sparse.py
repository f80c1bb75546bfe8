"""L1-wavelet SENSE with the network's image as a prior (the ``cs`` refine).

    x̂ = argmin_x ½||M F S x − y||² + ½λ||x − x₀||² + μ||Ψ x||₁

with ``S`` the coil maps (``Σ|S|² ≤ 1``, so ``||AᴴA|| ≤ 1`` for ``A = M F S``), ``x₀`` the network's
coil images combined with those maps, ``Ψ`` an orthonormal periodic 2-D wavelet transform
(:func:`wavelet2`: Daubechies' four-tap db2 by default, or Haar), ``λ`` the pull towards the network's
image and ``μ`` the sparsity weight, in units of :func:`image_scale`. ``λ = 0``
is plain compressed sensing started from the network's image; large ``λ`` returns ``x₀``. Which pair
suits a scan is measured on the scan's own held-back lines (:mod:`gadget.train.solve_calibration`).

Solved by FISTA (Beck and Teboulle, SIAM J. Imaging Sci. 2009) with step ``1 / (1 + λ)``, the gradient's
Lipschitz bound. The wavelet grid is shifted by random offsets at every step (cycle spinning, which
BART's ``pics`` also does with one offset per step) so that the wavelet's block grid leaves no fixed
edges: each step's shrinkage is the mean of the shrinkages on :data:`SPIN_OFFSETS` grids, a nearer
approach to the shift-invariant (undecimated) wavelet's than one grid, which leaves that step's image
with the blocks of its own grid (Coifman and Donoho, "Translation-invariant de-noising", 1995; measured in
docs/results/adaptation.md, "Cycle spinning in every step"). The offsets come from a seeded generator,
so a solve is repeatable. Why db2: on INIA19's real-intensity brain it kept more
detail than Haar at the same weights; Haar did slightly better only on our label-based simulated heads,
whose piecewise-constant tissue suits it (docs/results/adaptation.md). The mask selects phase columns and every readout sample of
a sampled column is measured, so ``Fᴴ M F`` is a 1-D operation along the phase axis and ``AᴴA`` one
``W × W`` matrix per readout row (:func:`row_gram`), built once per solve: a step costs one batched
matrix product, independent of the number of coils.

Several ``(λ, μ)`` pairs are solved at once as a batch of candidates (``P`` below), in chunks of at
most :data:`CHUNK_VALUES` image values.

Layouts: maps and k-space complex ``(coil, readout, phase)``; images complex ``(readout, phase)``;
candidates ``(P, readout, phase)``; ``columns`` bool ``(phase,)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..mri.coils import sens_reduce
from ..mri.parallel import serial

WAVELET_LEVELS = 4
"""Wavelet levels: the coarsest band (1/16 of the matrix each way) is left unthresholded."""

SPIN_OFFSETS = 4
"""Wavelet grid offsets averaged in each step's shrinkage (:func:`spun_shrink`)."""

CHUNK_VALUES = 1 << 23
"""Most complex values of one chunk of candidate images (candidates × pixels): 64 MiB per copy."""


_SQRT3 = math.sqrt(3.0)
#: Orthonormal scaling (low-pass) filters: Haar, and Daubechies' four-tap filter (db2, two vanishing
#: moments: smooth regions and ramps give no detail coefficients).
WAVELETS = {
    "haar": (1 / math.sqrt(2), 1 / math.sqrt(2)),
    "db2": tuple(c / (4 * math.sqrt(2)) for c in (1 + _SQRT3, 3 + _SQRT3, 3 - _SQRT3, 1 - _SQRT3)),
}


def _filters(wavelet: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(h, g)``: the low-pass filter and its quadrature mirror ``g[k] = (−1)^k h[K−1−k]``."""
    if wavelet not in WAVELETS:
        raise ValueError(f"wavelet must be one of {', '.join(WAVELETS)}, got {wavelet!r}")
    h = WAVELETS[wavelet]
    return h, tuple((-1) ** k * h[len(h) - 1 - k] for k in range(len(h)))


def _analysis(x: torch.Tensor, dim: int, h, g) -> tuple[torch.Tensor, torch.Tensor]:
    """One periodic level along ``dim`` (negative, even length): ``(low, high)``, each half as long;
    ``low[n] = Σ_k h[k] x[2n + k]`` (indices modulo the length), ``high`` likewise with ``g``."""
    even, odd = x.unflatten(dim, (-1, 2)).unbind(dim)
    taps = [even, odd]
    for _ in range(1, len(h) // 2):  # pairs further right, wrapping round
        taps += [torch.roll(taps[-2], -1, dim), torch.roll(taps[-1], -1, dim)]
    low = sum(c * t for c, t in zip(h, taps))
    high = sum(c * t for c, t in zip(g, taps))
    return low, high


def _synthesis(low: torch.Tensor, high: torch.Tensor, dim: int, h, g) -> torch.Tensor:
    """The inverse (the transpose) of :func:`_analysis` along ``dim``."""
    even = h[0] * low + g[0] * high
    odd = h[1] * low + g[1] * high
    for j in range(1, len(h) // 2):  # the contributions of coefficients j places to the left
        low_j, high_j = torch.roll(low, j, dim), torch.roll(high, j, dim)
        even = even + h[2 * j] * low_j + g[2 * j] * high_j
        odd = odd + h[2 * j + 1] * low_j + g[2 * j + 1] * high_j
    return torch.stack((even, odd), dim=dim).flatten(dim - 1, dim)


def wavelet2(x: torch.Tensor, levels: int, wavelet: str = "haar") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Orthonormal periodic 2-D wavelet analysis of ``x`` ``(..., H, W)``, ``H`` and ``W`` multiples of
    ``2**levels``: ``(coarse, details)``, ``details[l]`` ``(..., 3, H / 2**(l+1), W / 2**(l+1))`` the bands
    of level ``l`` (finest first): low along rows and high along columns, high along rows and low along
    columns, high along both."""
    h, g = _filters(wavelet)
    details = []
    a = x
    for _ in range(levels):
        lo_w, hi_w = _analysis(a, -1, h, g)
        a, hl = _analysis(lo_w, -2, h, g)
        lh, hh = _analysis(hi_w, -2, h, g)
        details.append(torch.stack((lh, hl, hh), dim=-3))
    return a, details


def iwavelet2(coarse: torch.Tensor, details: Sequence[torch.Tensor], wavelet: str = "haar") -> torch.Tensor:
    """The inverse of :func:`wavelet2`."""
    h, g = _filters(wavelet)
    a = coarse
    for d in reversed(details):
        lh, hl, hh = d.unbind(-3)
        lo_w = _synthesis(a, hl, -2, h, g)
        hi_w = _synthesis(lh, hh, -2, h, g)
        a = _synthesis(lo_w, hi_w, -1, h, g)
    return a


def soft_threshold(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Complex soft threshold: ``z · max(|z| − t, 0) / |z|`` (``t`` broadcast to ``z``)."""
    mag = z.abs()
    return z * ((mag - t).clamp(min=0) / mag.clamp(min=torch.finfo(mag.dtype).tiny))


def _wrapped_segments(n: int, size: int, offset: int) -> list[tuple[slice, slice]]:
    """Where indices ``0..n-1`` land when shifted by ``offset`` on a circle of ``size`` (``n <= size``):
    ``(source, destination)`` slices, one or two."""
    first = min(n, size - offset)
    out = [(slice(0, first), slice(offset, offset + first))]
    if first < n:
        out.append((slice(first, n), slice(0, n - first)))
    return out


def wavelet_shrink(x: torch.Tensor, threshold: torch.Tensor, levels: int, offset: tuple[int, int],
                   wavelet: str = "haar") -> torch.Tensor:
    """The proximal step of ``t·||Ψ x||₁`` for the wavelet grid moved by ``offset`` (rows, columns): ``x``
    ``(P, H, W)`` placed at ``offset`` in a zero grid of multiples of ``2**levels`` (circularly), detail
    bands soft-thresholded by ``threshold`` ``(P,)``, and read back from the same place."""
    p, h, w = x.shape
    block = 2 ** levels
    grid = x.new_zeros(p, -(-h // block) * block, -(-w // block) * block)
    places = [(rs, rd, cs, cd) for rs, rd in _wrapped_segments(h, grid.shape[1], offset[0])
              for cs, cd in _wrapped_segments(w, grid.shape[2], offset[1])]
    for rs, rd, cs, cd in places:
        grid[:, rd, cd] = x[:, rs, cs]
    coarse, details = wavelet2(grid, levels, wavelet)
    t = threshold.view(p, 1, 1, 1).to(x.real.dtype)
    shrunk = iwavelet2(coarse, [soft_threshold(d, t) for d in details], wavelet)
    out = torch.empty_like(x)
    for rs, rd, cs, cd in places:
        out[:, rs, cs] = shrunk[:, rd, cd]
    return out


def spun_shrink(x: torch.Tensor, threshold: torch.Tensor, levels: int, grids: Sequence[tuple[int, int]],
                wavelet: str = "haar") -> torch.Tensor:
    """The mean of :func:`wavelet_shrink` of ``x`` ``(P, H, W)`` over the wavelet grids moved by the offsets
    ``grids`` (one ``(row, column)`` offset each: cycle spinning); with every offset of the ``2**levels`` block, a
    shrinkage that commutes with circular shifts of images whose sides are multiples of the block."""
    out = wavelet_shrink(x, threshold, levels, grids[0], wavelet)
    for offset in grids[1:]:
        out += wavelet_shrink(x, threshold, levels, offset, wavelet)
    return out.div_(len(grids)) if len(grids) > 1 else out


def row_gram(maps: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``AᴴA`` restricted to each readout row, ``(H, W, W)``: ``G_r = Q ⊙ (S_rᴴ S_r)`` with ``Q = Fᴴ M F``
    (the centred orthonormal 1-D DFT ``F`` along the phase axis, ``M`` the sampled columns) and ``S_r``
    ``(C, W)`` row ``r`` of the maps, since ``Σ_c diag(s̄_c) Q diag(s_c)`` is ``Q`` times ``Σ_c s̄_c s_cᵀ``
    elementwise. One matrix product per row and step then applies ``AᴴA`` whatever the coil count."""
    w = maps.shape[-1]
    eye = torch.eye(w, dtype=maps.dtype, device=maps.device)
    dft = torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(eye, dim=0), dim=0, norm="ortho"), dim=0)
    sampled = dft[columns.to(torch.bool)]
    q = sampled.conj().T @ sampled
    rows = maps.permute(1, 0, 2)                                    # (H, C, W)
    return q * (rows.conj().transpose(1, 2) @ rows)


def apply_gram(gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``AᴴA x`` for candidates ``x`` ``(P, H, W)`` with :func:`row_gram`'s ``gram``: ``x[p, r] @ G_rᵀ``
    per row, as one batched product over rows on a strided view (no copy of ``x``)."""
    return torch.matmul(x.transpose(0, 1), gram.transpose(1, 2)).transpose(0, 1)


def adjoint(maps: torch.Tensor, measured: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``Aᴴ y`` ``(H, W)`` for the measured k-space ``y`` ``(C, H, W)`` on ``columns``."""
    return sens_reduce((measured * columns.to(measured.dtype))[None], maps[None])[0, 0]


def image_scale(prior: torch.Tensor) -> torch.Tensor:
    """The unit ``μ`` is given in: the 99th percentile of ``|x₀|`` (0-d tensor, at least the smallest
    positive float), so one ``μ`` means the same on scans of any signal level."""
    q = torch.quantile(prior.abs().flatten().float(), 0.99)
    return q.clamp(min=torch.finfo(torch.float32).tiny)


def solve(maps: torch.Tensor, measured: torch.Tensor, columns: torch.Tensor, prior: torch.Tensor,
          lam: torch.Tensor, mu: torch.Tensor, iterations: int = 60, seed: int = 0,
          wavelet: str = "db2", offsets: int = SPIN_OFFSETS) -> torch.Tensor:
    """``x̂`` ``(P, H, W)`` for each candidate ``(lam[p], mu[p])`` (``(P,)`` each; ``mu`` in units of
    :func:`image_scale` of ``prior``), by ``iterations`` FISTA steps from ``prior`` with ``wavelet``
    (a key of :data:`WAVELETS`), each step's shrinkage averaged over ``offsets`` wavelet grids. Every chunk of
    candidates sees the same wavelet offsets (``seed``), so a candidate's result does not depend on
    the others solved with it."""
    if offsets < 1:
        raise ValueError(f"offsets must be >= 1, got {offsets}")
    lam = torch.as_tensor(lam, dtype=torch.float32, device=prior.device).reshape(-1)
    mu = torch.as_tensor(mu, dtype=torch.float32, device=prior.device).reshape(-1)
    if lam.shape != mu.shape or bool((lam < 0).any()) or bool((mu < 0).any()):
        raise ValueError(f"lam and mu must be non-negative and of one length, got {lam.shape} and {mu.shape}")
    data = adjoint(maps, measured, columns)
    gram = row_gram(maps, columns)
    scale = image_scale(prior)
    chunk = max(1, CHUNK_VALUES // prior.numel())
    parts = [_fista(gram, data, prior, lam[i:i + chunk], mu[i:i + chunk] * scale, iterations, seed, wavelet,
                    offsets)
             for i in range(0, lam.numel(), chunk)]
    return torch.cat(parts)


def _fista(gram, data, prior, lam, mu, iterations: int, seed: int, wavelet: str, offsets: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    block = 2 ** WAVELET_LEVELS
    lam3 = lam.view(-1, 1, 1)
    step = 1.0 / (1.0 + lam3)
    x = prior.unsqueeze(0).expand(lam.numel(), *prior.shape).clone()
    z, t = x.clone(), 1.0
    for _ in range(iterations):
        normal_z = apply_gram(gram, z)  # the one heavy product: all threads
        grids = [(int(rng.integers(block)), int(rng.integers(block))) for _ in range(offsets)]
        with serial(z.numel()):  # the rest are small passes (gadget.mri.parallel)
            gradient = normal_z - data + lam3 * (z - prior)
            new = spun_shrink(z - step * gradient, mu * step.view(-1), WAVELET_LEVELS, grids, wavelet)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            z = new + ((t - 1) / t_new) * (new - x)
            x, t = new, t_new
    return x
