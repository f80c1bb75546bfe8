"""Cartesian undersampling masks over the phase-encode axis (fastMRI-compatible).

A mask here is a 1-D boolean numpy array of shape ``(num_cols,)``: ``True`` where
a phase-encode line (a k-space column) is acquired. For k-space laid out as a
complex tensor ``(..., readout, phase)`` (see :mod:`gadget.mri.fft`), the mask
indexes the last axis. Column ``num_cols // 2`` is the k-space centre (DC).

The three mask kinds reproduce ``fastmri.data.subsample`` bit for bit — the same
shape, parameters and seed give the same mask and the same count of
low-frequency (ACS) lines:

* ``"random"`` — ``RandomMaskFunc``: a fully sampled centre block plus columns
  drawn independently with a probability that makes the *expected* acceleration
  equal the requested one.
* ``"equispaced"`` — ``EquiSpacedMaskFunc``: a centre block plus every
  ``acceleration``-th column from an offset (the true acceleration is lower).
* ``"equispaced-fraction"`` — ``EquispacedMaskFractionFunc``: a centre block plus
  columns at a fractional spacing chosen so that the total matches
  ``num_cols / acceleration`` (spacing is rounded, so not exactly even).

Random draws come from a ``numpy.random.RandomState`` in the same order as
fastMRI: first the choice of (centre fraction, acceleration), then the
acceleration mask (uniform draws, or the equispaced offset when none is given).
A per-call ``seed`` reseeds that generator for the one call and restores its
previous state afterwards, so calls with a seed never disturb the unseeded
sequence.
"""
from __future__ import annotations

import contextlib
import itertools
import numbers
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Seed = Union[int, Tuple[int, ...]]

MASK_KINDS = ("random", "equispaced", "equispaced-fraction")
_KIND_ALIASES = {"equispaced_fraction": "equispaced-fraction"}


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class MaskSpec:
    """What to sample: the mask kind and the candidate (centre fraction, acceleration) pairs.

    Attributes:
        kind: one of :data:`MASK_KINDS` (``"equispaced_fraction"`` is accepted as an alias).
        center_fractions: fraction of columns, each in (0, 1), sampled densely at the centre.
        accelerations: undersampling factors, each >= 1 (integers for ``"equispaced"``).
        allow_any_combination: if False, the two lists are paired element-wise and must
            have equal length; if True, a fraction and an acceleration are drawn
            independently from the two lists.
        seed: seed of the sampler's own random generator (None: seeded from the OS).
    """

    kind: str
    center_fractions: Sequence[float]
    accelerations: Sequence[float]
    allow_any_combination: bool = False
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        kind = _KIND_ALIASES.get(self.kind, self.kind)
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; expected one of {MASK_KINDS}")
        fractions = tuple(_check_center_fraction(c) for c in self.center_fractions)
        accels = tuple(_check_acceleration(a, kind) for a in self.accelerations)
        if not fractions:
            raise ValueError("center_fractions must not be empty")
        if not accels:
            raise ValueError("accelerations must not be empty")
        if not self.allow_any_combination and len(fractions) != len(accels):
            raise ValueError(
                f"center_fractions ({len(fractions)} values) and accelerations "
                f"({len(accels)} values) must have the same length unless "
                "allow_any_combination=True"
            )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "center_fractions", fractions)
        object.__setattr__(self, "accelerations", accels)

    def combinations(self) -> Iterator[Tuple[float, float]]:
        """Every (center_fraction, acceleration) pair a sampler may draw."""
        if self.allow_any_combination:
            return itertools.product(self.center_fractions, self.accelerations)
        return zip(self.center_fractions, self.accelerations)


def _check_center_fraction(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"center fraction must be a number in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"center fraction must be in (0, 1), got {value}")
    return float(value)


def _check_acceleration(value: float, kind: str) -> Union[int, float]:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"acceleration must be a number >= 1, got {value!r}")
    if not float(value) >= 1.0:  # also rejects NaN
        raise ValueError(f"acceleration must be >= 1, got {value}")
    if kind == "equispaced":
        if float(value) != int(value):
            raise ValueError(f"acceleration must be an integer for 'equispaced' masks, got {value}")
        return int(value)
    return int(value) if isinstance(value, numbers.Integral) else float(value)


# ----------------------------------------------------------------------------- building blocks


def num_low_frequencies(num_cols: int, center_fraction: float) -> int:
    """Number of densely sampled centre columns: ``round(num_cols * center_fraction)``.

    Python's ``round`` (half to even), as fastMRI uses.
    """
    return round(num_cols * center_fraction)


def center_block(num_cols: int, num_low: int) -> np.ndarray:
    """Bool ``(num_cols,)`` mask of ``num_low`` contiguous columns starting at ``(num_cols - num_low + 1) // 2``."""
    mask = np.zeros(num_cols, dtype=bool)
    start = (num_cols - num_low + 1) // 2
    mask[start : start + num_low] = True
    return mask


def _random_lines(rng: np.random.RandomState, num_cols: int, acceleration: float, num_low: int) -> np.ndarray:
    """Outer columns kept independently with probability ``(N/R - N_low) / (N - N_low)``."""
    prob = (num_cols / acceleration - num_low) / (num_cols - num_low)
    return rng.uniform(size=num_cols) < prob


def _equispaced_lines(
    rng: np.random.RandomState, num_cols: int, acceleration: int, offset: Optional[int]
) -> np.ndarray:
    """Every ``acceleration``-th column from ``offset`` (drawn in ``[0, R)`` when None)."""
    if offset is None:
        offset = rng.randint(0, high=round(acceleration))
    mask = np.zeros(num_cols, dtype=bool)
    mask[offset::acceleration] = True
    return mask


def _equispaced_fraction_lines(
    rng: np.random.RandomState, num_cols: int, acceleration: float, offset: Optional[int], num_low: int
) -> np.ndarray:
    """Columns at rounded positions ``offset + k * s`` below ``num_cols - 1``.

    The spacing ``s = R (N - N_low) / (N - N_low R)`` makes centre plus outer
    columns total about ``N / R``. The offset is drawn in ``[0, round(s))`` when None.
    """
    spacing = (acceleration * (num_low - num_cols)) / (num_low * acceleration - num_cols)
    if offset is None:
        offset = rng.randint(0, high=round(spacing))
    positions = np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.int64)
    mask = np.zeros(num_cols, dtype=bool)
    mask[positions] = True
    return mask


@contextlib.contextmanager
def _reseeded(rng: np.random.RandomState, seed: Optional[Seed]):
    """Reseed ``rng`` for the duration of the block, then restore its previous state."""
    if seed is None:
        yield
        return
    saved = rng.get_state()
    try:
        rng.seed(seed)
    except (TypeError, ValueError) as err:
        rng.set_state(saved)
        raise ValueError(f"seed must be a non-negative int or a tuple of them, got {seed!r}") from err
    try:
        yield
    finally:
        rng.set_state(saved)


# ----------------------------------------------------------------------------- sampler


class MaskSampler:
    """Draws masks for a :class:`MaskSpec`; a drop-in equivalent of a fastMRI ``MaskFunc``.

    The sampler owns a ``numpy.random.RandomState(spec.seed)``; successive calls without
    a per-call seed advance it exactly as the fastMRI mask function advances its own.
    """

    def __init__(self, spec: MaskSpec):
        if not isinstance(spec, MaskSpec):
            raise ValueError(f"expected a MaskSpec, got {type(spec).__name__}")
        self.spec = spec
        self.rng = np.random.RandomState(spec.seed)

    def __call__(
        self, num_cols: int, offset: Optional[int] = None, seed: Optional[Seed] = None
    ) -> Tuple[np.ndarray, int]:
        """Sample one mask.

        Args:
            num_cols: number of phase-encode columns N (k-space width), >= 2.
            offset: first outer column for the equispaced kinds (ignored by ``"random"``);
                drawn at random when None. Must lie in ``[0, num_cols)``.
            seed: int or tuple of ints (e.g. ``tuple(map(ord, fname))``) that reseeds the
                generator for this call only.

        Returns:
            ``(mask, num_low_frequencies)``: bool array ``(num_cols,)`` and the number of
            columns in the dense centre block.
        """
        center, outer, num_low = self.sample_parts(num_cols, offset, seed)
        return center | outer, num_low

    def sample_parts(
        self, num_cols: int, offset: Optional[int] = None, seed: Optional[Seed] = None
    ) -> Tuple[np.ndarray, np.ndarray, int]:
        """Like ``__call__`` but keeps the parts apart: ``(center, outer, num_low)`` with
        ``center`` the dense calibration block and ``outer`` the undersampling pattern (both
        bool ``(num_cols,)``; they may overlap). Converters use this to flag ACS-only lines."""
        self._check_call(num_cols, offset)
        with _reseeded(self.rng, seed):
            center_fraction, acceleration = self._choose()
            num_low = num_low_frequencies(num_cols, center_fraction)
            outer = self._outer_lines(num_cols, acceleration, offset, num_low)
        return center_block(num_cols, num_low), np.asarray(outer, bool), num_low

    def _choose(self) -> Tuple[float, float]:
        """Draw the (center_fraction, acceleration) pair, consuming the RNG as fastMRI does."""
        spec = self.spec
        if spec.allow_any_combination:
            fraction = spec.center_fractions[self.rng.choice(len(spec.center_fractions))]
            acceleration = spec.accelerations[self.rng.choice(len(spec.accelerations))]
            return fraction, acceleration
        index = self.rng.randint(len(spec.center_fractions))
        return spec.center_fractions[index], spec.accelerations[index]

    def _outer_lines(self, num_cols: int, acceleration: float, offset: Optional[int], num_low: int) -> np.ndarray:
        kind = self.spec.kind
        if kind == "random":
            return _random_lines(self.rng, num_cols, acceleration, num_low)
        if kind == "equispaced":
            return _equispaced_lines(self.rng, num_cols, int(acceleration), offset)
        return _equispaced_fraction_lines(self.rng, num_cols, acceleration, offset, num_low)

    def _check_call(self, num_cols: int, offset: Optional[int]) -> None:
        """Validate before any random draw so a failing call leaves the RNG untouched."""
        if isinstance(num_cols, bool) or not isinstance(num_cols, numbers.Integral) or num_cols < 2:
            raise ValueError(f"num_cols must be an integer >= 2, got {num_cols!r}")
        if offset is not None and (
            isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or not 0 <= offset < num_cols
        ):
            raise ValueError(f"offset must be an integer in [0, num_cols={num_cols}), got {offset!r}")
        for fraction, acceleration in self.spec.combinations():
            num_low = num_low_frequencies(num_cols, fraction)
            if num_low < 1:
                raise ValueError(
                    f"center fraction {fraction} of {num_cols} columns rounds to 0 center lines; "
                    "shape too small or center fraction too low"
                )
            if num_low >= num_cols:
                raise ValueError(
                    f"center fraction {fraction} gives {num_low} center lines, "
                    f"not fewer than the {num_cols} columns"
                )
            if self.spec.kind == "equispaced-fraction" and num_low * acceleration >= num_cols:
                raise ValueError(
                    f"{num_low} center lines already reach acceleration {acceleration} "
                    f"for {num_cols} columns (need center lines * acceleration < columns)"
                )


def make_mask(
    kind: str,
    num_cols: int,
    acceleration: float,
    center_fraction: float,
    seed: Optional[Seed] = None,
    offset: Optional[int] = None,
) -> Tuple[np.ndarray, int]:
    """One mask with a single (acceleration, center_fraction): ``(bool (num_cols,), num_low_frequencies)``.

    Equals fastMRI's ``MaskFunc([center_fraction], [acceleration])((1, num_cols, 1), offset, seed)``;
    ``seed=None`` gives a non-reproducible mask.
    """
    spec = MaskSpec(kind, [center_fraction], [acceleration])
    return MaskSampler(spec)(num_cols, offset=offset, seed=seed)


# ----------------------------------------------------------------------------- inspection / application


def _as_bool_1d(mask_1d) -> np.ndarray:
    if isinstance(mask_1d, torch.Tensor):
        mask_1d = mask_1d.detach().cpu().numpy()
    mask = np.asarray(mask_1d)
    if mask.ndim != 1:
        raise ValueError(f"expected a 1-D mask (num_cols,), got shape {mask.shape}")
    return mask != 0


def _run_length(values: np.ndarray) -> int:
    """Number of leading True values."""
    misses = np.flatnonzero(~values)
    return int(misses[0]) if misses.size else int(values.size)


def detect_num_low_frequencies(mask: torch.Tensor) -> torch.Tensor:
    """ACS width as fastMRI's sensitivity model detects it, for a batch of masks ``(b, ..., phase)``
    (any leading singleton dims): with ``c = phase // 2``, ``left`` is the run of sampled columns
    going down from ``c - 1`` and ``right`` the run going up from ``c``; the result is
    ``max(2 * min(left, right), 1)`` per batch entry, long ``(b,)``. A half that is sampled
    *entirely* counts as 0 (fastMRI's argmin finds no unsampled column), so a fully sampled mask
    gives 1. Stays in torch so the model can call it on-device."""
    m = mask.reshape(mask.shape[0], -1).to(torch.int8)
    centre = m.shape[1] // 2
    left = torch.argmin(m[:, :centre].flip(1), dim=1)
    right = torch.argmin(m[:, centre:], dim=1)
    return torch.clamp_min(2 * torch.minimum(left, right), 1).long()


def detect_acs_count(mask_1d) -> int:
    """:func:`detect_num_low_frequencies` for one 1-D mask ``(num_cols,)`` (array-like or tensor;
    nonzero means sampled)."""
    mask = _as_bool_1d(mask_1d)
    if mask.size < 2:
        raise ValueError(f"mask must have at least 2 columns, got {mask.size}")
    return int(detect_num_low_frequencies(torch.from_numpy(mask).view(1, -1))[0])


def contiguous_center_lines(mask_1d) -> int:
    """Length of the run of sampled columns that contains column ``num_cols // 2`` (0 if it is unsampled).

    Unlike :func:`detect_acs_count` this is the true block length: it may be odd and
    equals ``num_cols`` for a fully sampled mask.
    """
    mask = _as_bool_1d(mask_1d)
    if mask.size < 1:
        raise ValueError("mask must have at least 1 column")
    cent = mask.size // 2
    if not mask[cent]:
        return 0
    return _run_length(mask[:cent][::-1]) + _run_length(mask[cent:])


ACS_FALLBACKS = ("run", "run-or-detect", "detect")


class AcsLinesError(ValueError):
    """:func:`acs_lines` found no count. ``reason``: ``"missing"`` (a required given count is absent) or
    ``"centre-unsampled"`` (fallback ``"run"`` and column ``num_cols // 2`` not sampled). The message names
    no scan or file: callers that know one catch this and raise their own error."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def acs_lines(mask_1d, given: Optional[int] = None, *, required: bool = False, fallback: str = "run",
              on_detect=None) -> int:
    """The one rule for the number of ACS (calibration) lines given to the sensitivity network or ESPIRiT.

    1. ``given`` — a count the data states (calibration-flagged lines, a file's ``num_low_frequency``, a
       separate reference's line count) — is used when positive; ``None`` and ``0`` mean unknown.
    2. Unknown and ``required``: :class:`AcsLinesError` (``reason="missing"``).
    3. Otherwise the count comes from ``mask_1d`` by ``fallback`` (one of :data:`ACS_FALLBACKS`):

       * ``"run"`` — :func:`contiguous_center_lines`, the run of sampled columns containing the centre
         column (the whole width for a full mask); centre column unsampled: :class:`AcsLinesError`
         (``reason="centre-unsampled"``).
       * ``"run-or-detect"`` — the run; centre column unsampled: ``on_detect()`` (if given, e.g. a
         caller's log line), then fastMRI's detection.
       * ``"detect"`` — fastMRI's detection, :func:`detect_acs_count` (``2*min(left, right)``; 1 for a
         full mask), as the reference model does when given no count.

    Callers: :meth:`gadget.recon.pipeline.ScanReconstructor.acs_count` (flags, else ``"run"``; a separate
    reference's count ``required``), :func:`gadget.recon.fastmri_infer.acs_count` (file attribute,
    ``"run-or-detect"``; ``--acs attrs`` required, ``--acs mask`` ``"detect"`` without the attribute) and
    :func:`gadget.train.trainer.acs_counts` (the sample's count, 0 → ``"detect"``).
    """
    if fallback not in ACS_FALLBACKS:
        raise ValueError(f"unknown ACS fallback {fallback!r}; expected one of {ACS_FALLBACKS}")
    if given is not None and int(given) > 0:
        return int(given)
    if required:
        raise AcsLinesError("missing", "no ACS line count given and one is required")
    if fallback == "detect":
        return detect_acs_count(mask_1d)
    run = contiguous_center_lines(mask_1d)
    if run:
        return run
    if fallback == "run":
        raise AcsLinesError("centre-unsampled", "no ACS line count given and the k-space centre column "
                            "is not sampled")
    if on_detect is not None:
        on_detect()
    return detect_acs_count(mask_1d)


def apply_mask(kspace: torch.Tensor, mask_1d) -> torch.Tensor:
    """Zero the unsampled phase-encode columns of k-space.

    Args:
        kspace: complex tensor ``(..., readout, phase)``.
        mask_1d: bool/0-1 array or tensor ``(phase,)``; nonzero means sampled.

    Returns:
        A new tensor, same shape/dtype/device as ``kspace``, with exact zeros (also
        where the input was NaN/inf) in unsampled columns.
    """
    if not isinstance(kspace, torch.Tensor) or not torch.is_complex(kspace):
        raise ValueError(f"kspace must be a complex torch tensor (..., readout, phase), got {type(kspace).__name__}"
                         + (f" of dtype {kspace.dtype}" if isinstance(kspace, torch.Tensor) else ""))
    if kspace.ndim < 2:
        raise ValueError(f"kspace must have at least 2 dimensions (..., readout, phase), got shape {tuple(kspace.shape)}")
    mask = torch.from_numpy(_as_bool_1d(mask_1d).copy()).to(kspace.device)
    if mask.numel() != kspace.shape[-1]:
        raise ValueError(
            f"mask has {mask.numel()} columns but kspace shape {tuple(kspace.shape)} "
            f"has {kspace.shape[-1]} phase-encode columns (last axis)"
        )
    return torch.where(mask, kspace, torch.zeros((), dtype=kspace.dtype, device=kspace.device))
