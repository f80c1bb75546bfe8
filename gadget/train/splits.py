"""Splitting a slice's acquired phase-encode lines for self-supervised learning from undersampled data.

Notation (SSDU, Yaman et al., MRM 2020; zero-shot SSL, Yaman et al., ICLR 2022):

* Ω — the lines the scanner acquired (a bool mask over the phase axis);
* Γ — a few acquired lines held back once, never seen in training, used only to score the network
  (it predicts them from Ω \\ Γ);
* Θ, Λ — a fresh random partition of Ω \\ Γ at every step: the network sees Θ (its input and its data
  consistency) and is scored in k-space on Λ.

The ACS block (the ``acs`` centre lines, fastMRI's placement: they start at ``(W - acs + 1) // 2``) always
stays in Θ, so the sensitivity network always reads the whole calibration region, and is never put in Γ.
Lines are drawn without replacement, either uniformly or with a Gaussian weight over the distance to the
k-space centre (``std = width / std_scale``, SSDU's "Gaussian selection"), which puts more of the selected
lines where the signal is.

All masks are bool numpy arrays ``(phase,)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

SELECTIONS = ("gaussian", "uniform")


def acs_lines(width: int, acs: int) -> np.ndarray:
    """The ``acs`` centre lines of ``width`` as a bool mask (fastMRI's placement)."""
    if not 0 <= acs <= width:
        raise ValueError(f"ACS count {acs} outside 0..{width}")
    out = np.zeros(width, bool)
    start = (width - acs + 1) // 2
    out[start:start + acs] = True
    return out


def _pick(candidates: np.ndarray, count: int, rng: np.random.Generator, selection: str,
          std_scale: float) -> np.ndarray:
    """``count`` of the True positions of ``candidates`` as a bool mask, drawn without replacement."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    where = np.flatnonzero(candidates)
    count = min(count, where.size)
    out = np.zeros_like(candidates)
    if count <= 0:
        return out
    if selection == "uniform":
        weights = None
    else:
        width = candidates.size
        distance = where - width // 2
        weights = np.exp(-0.5 * (distance / (width / std_scale)) ** 2)
        weights = weights / weights.sum()
    out[rng.choice(where, size=count, replace=False, p=weights)] = True
    return out


@dataclass(frozen=True)
class SplitSettings:
    """``holdout``: fraction of the non-ACS acquired lines put in Γ (at least one line while there are
    two or more); ``rho``: |Λ| / |Ω \\ Γ| (SSDU's ρ); ``selection``/``std_scale``: how lines are drawn."""

    rho: float = 0.4
    holdout: float = 0.2
    selection: str = "gaussian"
    std_scale: float = 4.0

    def __post_init__(self):
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"rho must be in (0, 1), got {self.rho}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.std_scale <= 0:
            raise ValueError(f"std_scale must be > 0, got {self.std_scale}")


def holdout_lines(acquired: np.ndarray, acs: int, settings: SplitSettings,
                  rng: np.random.Generator) -> np.ndarray:
    """Γ: a fraction ``settings.holdout`` of the acquired lines outside the ACS block."""
    acquired = _as_mask(acquired)
    outer = acquired & ~acs_lines(acquired.size, acs)
    n_outer = int(outer.sum())
    if settings.holdout == 0 or n_outer < 2:
        return np.zeros_like(acquired)
    count = max(1, int(round(settings.holdout * n_outer)))
    count = min(count, n_outer - 1)  # leave at least one outer line to train on
    return _pick(outer, count, rng, settings.selection, settings.std_scale)


def split_lines(available: np.ndarray, acs: int, settings: SplitSettings,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(Θ, Λ)``: a random partition of ``available`` (Ω \\ Γ) with the ACS block in Θ and
    ``|Λ| ≈ rho · |available|`` drawn from the other lines."""
    available = _as_mask(available)
    acs_mask = acs_lines(available.size, acs) & available
    outer = available & ~acs_mask
    count = min(int(round(settings.rho * available.sum())), int(outer.sum()) - 1)
    loss = _pick(outer, count, rng, settings.selection, settings.std_scale)
    return available & ~loss, loss


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 1 or mask.dtype != bool:
        raise ValueError(f"a line mask must be bool (phase,), got {mask.dtype} {mask.shape}")
    return mask


def seeded_rng(seed: Optional[int], *keys: int) -> np.random.Generator:
    """A generator for ``seed`` and ``keys`` (slice index, step …): the same draws on every run."""
    return np.random.default_rng(None if seed is None else [int(seed), *map(int, keys)])
