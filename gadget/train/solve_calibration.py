"""Choosing the ``cs`` refine's weights for one scan from its own acquired lines (``adapt: solve``).

The ``cs`` refine (:mod:`gadget.recon.sparse`) solves ``½||A x − y||² + ½λ||x − x₀||² + μ||Ψ x||₁``
around the network's image ``x₀``. How much to trust the network (λ) and how much sparsity (μ) differs
with the scan: its noise, its coils, and how far its anatomy and contrast are from what the network was
trained on. No fully sampled data is needed to choose them; K-fold cross-validation on the acquired
lines stands in for it:

- the acquired lines outside the ACS block are dealt at random into ``folds`` disjoint folds (the ACS
  block always stays: the maps and the sensitivity network read it);
- for each fold, the network runs on the slice without that fold's lines, and every candidate
  ``(λ, μ)`` of the grid is solved on the same lines;
- each candidate predicts the fold's lines (``F S x̂`` on those columns); its score is the squared
  error normalised by the lines' energy, summed over folds and slices;
- the pair with the lowest score wins and the scan is reconstructed with it on all its lines.

Every acquired outer line is held back exactly once, and a candidate never sees the lines it is scored
on, nor does the network that gives it ``x₀``. Leaving a fold out makes the data a little more
undersampled than the scan itself; more folds keep that change small (at more cost).

Layouts as in :class:`gadget.train.adapt.AdaptSlice`: k-space complex64 ``(coil, readout, phase)`` with
zeros at lines not acquired, mask bool ``(phase,)``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..mri.fft import fft2c, ifft2c
from ..recon.refine import RefineConfig, choose_maps
from ..recon.sparse import solve
from .adapt import AdaptError, AdaptSlice
from .splits import acs_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of :func:`calibrate_solve`. ``lams`` × ``mus``: the grid of candidates (λ is the pull to
    the network's image relative to the data term, μ the sparsity weight in units of the image's 99th
    percentile); ``folds``: K of the cross-validation; ``slices``: the most slices scored (spread over
    the scan; the noise, coils and contrast that decide the weights are the scan's, not the slice's);
    ``iterations``: FISTA steps per solve.

    Why these defaults: the grid spans plain compressed sensing (λ 0) to the network's image (λ 1, where
    the solve barely moves it) and no sparsity to strong sparsity at low SNR; six folds hold back a
    sixth of the outer lines at a time, so the data the candidates are scored on stay close to the
    scan's own sampling."""

    lams: tuple = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    mus: tuple = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
    folds: int = 6
    slices: int = 2
    iterations: int = 60
    seed: int = 0

    def __post_init__(self):
        if not self.lams or not self.mus or min(self.lams) < 0 or min(self.mus) < 0:
            raise ValueError(f"the calibration grid needs non-negative λ and μ values, got {self.lams}, {self.mus}")
        if self.folds < 2 or self.slices < 1 or self.iterations < 1:
            raise ValueError(f"folds must be >= 2, slices and iterations >= 1, got {self.folds}, {self.slices}, "
                             f"{self.iterations}")

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ, μ)`` of every grid point, float32 ``(P,)`` each."""
        lam, mu = np.meshgrid(np.asarray(self.lams, np.float32), np.asarray(self.mus, np.float32), indexing="ij")
        return torch.from_numpy(lam.ravel()), torch.from_numpy(mu.ravel())

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class CalibrationResult:
    """What :func:`calibrate_solve` chose: ``lam``/``mu``, their ``score`` and the whole grid's
    (``table``: one ``{lam, mu, score}`` per candidate), the folds and slices it used and its time."""

    lam: float
    mu: float
    score: float
    table: list
    folds: int
    slices: int
    seconds: float

    def summary(self) -> str:
        return (f"λ {self.lam:g}, μ {self.mu:g} (held-out error {self.score:.4g}; {len(self.table)} candidates, "
                f"{self.folds} folds on {self.slices} slices, {self.seconds:.1f} s)")

    def refine_config(self, base: RefineConfig = RefineConfig()) -> RefineConfig:
        """The ``cs`` refine with the chosen weights (the other settings from ``base``)."""
        return RefineConfig(**{**asdict(base), "mode": "cs", "cs_lambda": self.lam, "cs_mu": self.mu})


def outer_folds(mask: np.ndarray, acs: int, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The acquired lines of ``mask`` outside the ACS block dealt at random into ``folds`` disjoint sets
    (sorted column indices; sizes differ by at most one)."""
    outer = np.flatnonzero(np.asarray(mask, bool) & ~acs_lines(mask.size, acs))
    if outer.size < folds:
        raise AdaptError(f"{outer.size} acquired lines outside the ACS block: too few for {folds} folds")
    rng.shuffle(outer)
    return [np.sort(outer[k::folds]) for k in range(folds)]


def spread(count: int, most: int) -> list[int]:
    """Up to ``most`` indices of ``range(count)`` spread evenly (the middle one when ``most`` is 1)."""
    if count <= most:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, most + 2)[1:-1]})


def network_prior(engine, kspace: np.ndarray, mask: np.ndarray, acs: int, sens_kspace=None,
                  refine: RefineConfig = RefineConfig()):
    """``(image, maps, prior)``: the network's RSS image ``(H, W)``, the refine's maps ``(C, H, W)``
    (:func:`gadget.recon.refine.choose_maps`) and the network's coil images combined with them ``(H, W)``,
    for one slice. ``acs``: the network's ACS count (with ``sens_kspace``, the reference's lines)."""
    image, final = engine.run_tensors(kspace[None], mask, acs, None if sens_kspace is None else sens_kspace[None])
    measured = torch.from_numpy(kspace[None]).to(final.device, torch.complex64)
    maps_acs = 0 if sens_kspace is not None else acs  # no calibration block in the imaging lines: the network's maps
    maps, _ = choose_maps(image, final, measured, torch.from_numpy(mask).to(final.device), refine, maps_acs)
    prior = (maps.conj() * ifft2c(final.to(torch.complex64))).sum(1)
    return image[0], maps[0], prior[0]


def fold_errors(engine, sl: AdaptSlice, fold: np.ndarray, lam: torch.Tensor, mu: torch.Tensor,
                settings: CalibrationConfig) -> torch.Tensor:
    """Each candidate's normalised squared error ``(P,)`` on the lines of ``fold``, solved without them."""
    kept = sl.mask.copy()
    kept[fold] = False
    measured = sl.kspace * kept
    _, maps, prior = network_prior(engine, measured, kept, sl.acs, sl.sens_kspace)
    device = prior.device
    y = torch.from_numpy(measured).to(device, torch.complex64)
    x = solve(maps, y, torch.from_numpy(kept).to(device), prior, lam, mu, settings.iterations, settings.seed)
    held = torch.from_numpy(sl.kspace[..., fold]).to(device, torch.complex64)
    errors = []
    for candidate in x:  # one at a time: the whole k-space of every candidate at once is large
        predicted = fft2c(maps * candidate)[..., fold]
        errors.append((predicted - held).abs().square().sum())
    return torch.stack(errors).cpu() / held.abs().square().sum().clamp(min=torch.finfo(torch.float32).tiny).cpu()


@torch.inference_mode()
def calibrate_solve(engine, slices: Sequence[AdaptSlice], settings: CalibrationConfig = CalibrationConfig(),
                    on_fold: Optional[Callable[[int, int], None]] = None) -> CalibrationResult:
    """The ``cs`` refine's ``(λ, μ)`` for a scan (module docstring). ``engine``: a
    :class:`gadget.recon.engine.Reconstructor` (the network the scan will be reconstructed with);
    ``slices``: the scan's undersampled slices; ``on_fold(done, total)`` is called after each fold.
    Raises :class:`AdaptError` when no slice has enough outer lines for the folds."""
    if not slices:
        raise AdaptError("no slices to calibrate the solve on")
    t0 = time.perf_counter()
    lam, mu = settings.candidates()
    rng = np.random.default_rng(settings.seed)
    chosen = [slices[i] for i in spread(len(slices), settings.slices)]
    plan = [(sl, fold) for sl in chosen for fold in outer_folds(sl.mask, sl.split_acs, settings.folds, rng)]
    total = torch.zeros(lam.numel())
    for done, (sl, fold) in enumerate(plan, 1):
        total += fold_errors(engine, sl, fold, lam, mu, settings)
        if on_fold:
            on_fold(done, len(plan))
    score = total / len(plan)
    best = int(torch.argmin(score))
    table = [{"lam": float(a), "mu": float(b), "score": float(s)} for a, b, s in zip(lam, mu, score)]
    return CalibrationResult(float(lam[best]), float(mu[best]), float(score[best]), table, settings.folds,
                             len(chosen), time.perf_counter() - t0)
