"""Domain-randomised whole-head scans: what real 2-D head k-space has that a template lacks.

Per volume, every choice is drawn from one ``numpy.random.Generator`` (:func:`random_head_scan`):

* anatomy: a whole head (:mod:`gadget.converters.tissue`: scalp, fat, skull, marrow, muscle — real for
  Colin27, derived for the skull-stripped sources), or with ``brain_only`` the brain alone
  (skull-stripped; field of view and coils placed as for the head around it), with a random
  contrast (T1w/T2w/PDw/FLAIR-like or fully random class values), a random smooth deformation
  (:class:`SmoothDeformation`) and pose;
* image: fine texture (:func:`fine_texture`) and a smooth bias field (:func:`bias_field`);
* field of view: the readout FOV holds the head; the phase FOV is drawn around the head's width, so
  heads fill it and some fold into it (:func:`fold_phase`, exact periodic aliasing); which in-plane
  axis is the phase axis is drawn too;
* matrix: readout and phase sizes from the pixel size, 96–384, square or not, even or odd; 2×
  readout oversampling or none;
* receive array: 8–32 loops hugging the scalp (:func:`gadget.converters.coils.head_array`, 3–12 mm away),
  random element phases, noise correlation from the sensitivity overlap; B0-like smooth phase;
* noise: SNR drawn in dB (definition in :mod:`gadget.converters.simulate`).

The forward model is that of :mod:`gadget.converters.simulate` (fine grid at twice the resolution,
cropped in k-space, no inverse crime), extended to rectangular fields of view, optional readout
oversampling and phase aliasing. Output: a :class:`gadget.converters.simulate.SimulatedVolume` (k-space
``(slice, coil, os·H, W)``, targets ``(slice, H, W)``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.fft as sfft

from .anatomy import Anatomy, voxel_anatomy
from .coils import (
    coarse_axis,
    cubic_interpolation_matrix,
    head_array,
    noise_covariance,
    receive_sensitivities,
    upsample_maps,
)
from .geometry import NORMAL_AXIS, ORIENTATIONS, SlicePlane, axis_positions, central_slice_positions, random_pose
from .simulate import (
    SIGNAL_SCALE,
    SimulatedVolume,
    SmoothPhase,
    add_coil_noise,
    centred_fft,
    kspace_to_rss,
    random_phase,
)
from .tissue import HEAD_SOURCES, brain_only_signals, head_tissues, random_signals

MATRIX_LIMITS = (96, 384)
SCALP_AND_SKULL_MM = 15.0   # brain surface to scalp surface, adult head (typically 10-20 mm)


# ----------------------------------------------------------------------------- randomisation elements


@dataclass(frozen=True)
class SmoothDeformation:
    """A displacement field ``u(p) = Σ_k a_k cos(2π f_k·p + ψ_k)`` (mm, ``a_k`` 3-vectors): the
    anatomy at ``p`` is read at ``p + u(p)`` — a smooth random warp of the head."""

    frequencies: np.ndarray   # (K, 3) cycles per mm
    amplitudes: np.ndarray    # (K, 3) mm
    phases: np.ndarray        # (K,)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        p = np.asarray(points_mm, float)
        waves = np.cos(2 * np.pi * (p @ self.frequencies.T) + self.phases)    # (..., K)
        return p + waves @ self.amplitudes


def random_deformation(rng: np.random.Generator, max_mm: float = 5.0, terms: int = 4,
                       period_mm: float = 90.0) -> SmoothDeformation:
    """Draw a :class:`SmoothDeformation`: ``terms`` waves of periods about ``period_mm``, each
    component's amplitude ``U(-1, 1) · max_mm / sqrt(terms)``."""
    amp = rng.uniform(-1, 1, (terms, 3)) * max_mm / np.sqrt(terms)
    return SmoothDeformation(rng.normal(0, 1 / period_mm, (terms, 3)), amp, rng.uniform(0, 2 * np.pi, terms))


def deformed(anatomy: Anatomy, deformation: SmoothDeformation) -> Anatomy:
    """``anatomy`` read through ``deformation`` (same extents; the warp is a few mm)."""
    sampler = anatomy.sampler
    return replace(anatomy, sampler=lambda points: sampler(deformation(points)))


def fine_texture(shape: tuple[int, int], rng: np.random.Generator, amplitude: float, width_px: float = 1.0) -> np.ndarray:
    """Multiplicative texture ``1 + amplitude · g`` with ``g`` white noise smoothed by a Gaussian of
    ``width_px`` pixels and scaled to unit std → float32 ``shape`` (vessels, sulcal detail the
    templates smooth away). ``amplitude`` 0 gives ones."""
    from scipy import ndimage

    g = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), width_px)
    g /= max(float(g.std()), 1e-12)
    return np.clip(1 + np.float32(amplitude) * g, 0, None).astype(np.float32)


def bias_field(phase: SmoothPhase, strength: float) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth intensity non-uniformity ``exp(strength · tanh(φ(p) - φ(0)))`` (transmit field and
    receive chain), built from a :class:`SmoothPhase` field so it varies over about 100 mm."""
    centre = float(phase(np.zeros(3)))
    return lambda points: np.exp(strength * np.tanh(phase(points) - centre))


def fold_phase(images: np.ndarray, period: int) -> np.ndarray:
    """Periodic aliasing along the last axis: pixels of an extended grid ``(..., n)`` with
    ``n = m · period`` (pixel ``k`` at ``(k - n//2)`` pixels from the centre) summed into
    ``(..., period)`` (pixel ``j`` at ``(j - period//2)``), as sampling k-space at the spacing
    ``1 / period`` does. ``m = 1`` returns the input."""
    n = images.shape[-1]
    if n % period:
        raise ValueError(f"extended width {n} is not a multiple of the period {period}")
    m = n // period
    if m == 1:
        return images
    rolled = np.roll(images, -(n // 2 - period // 2), axis=-1)
    return rolled.reshape(images.shape[:-1] + (m, period)).sum(-2)


# ----------------------------------------------------------------------------- scan parameters


@dataclass(frozen=True)
class HeadScan:
    """One volume's draws (see module doc). Lengths in mm; the field of view and matrix follow
    from the head's real in-plane extent (:func:`scan_grid`)."""

    source: str
    contrast: str
    signals: np.ndarray
    orientation: str
    swap_axes: bool            # True: phase along the plane's row direction
    read_margin: float         # readout FOV / head extent along the readout (>= 1)
    phase_ratio: float         # phase FOV / head extent along the phase axis (< 1 folds)
    pixel_mm: float            # readout pixel size
    phase_pixel_ratio: float   # phase pixel size / readout pixel size
    oversampling: int          # 1 or 2 along the readout
    coils: int
    coil_gap_mm: float
    snr_db: float
    texture: float
    bias: float
    matrix_limits: tuple[int, int] = MATRIX_LIMITS
    brain_only: bool = False   # skull-stripped: the classes outside the brain give no signal


def random_head_scan(rng: np.random.Generator, sources: Sequence[str] = ("mni", "colin"),
                     matrix_limits: tuple[int, int] = MATRIX_LIMITS, coil_limits: tuple[int, int] = (8, 32),
                     snr_limits_db: tuple[float, float] = (15.0, 40.0),
                     brain_only_fraction: float = 0.0) -> HeadScan:
    """Draw a :class:`HeadScan`: source uniform over ``sources``; contrast by
    :func:`gadget.converters.tissue.random_signals`; axial 60 %, coronal and sagittal 20 % each; phase
    axis either in-plane axis; readout FOV 1.0–1.25 × the head, phase FOV 0.8–1.15 × (below 1 the
    head folds in); pixel 0.7–2.0 mm, phase pixels 1–1.35 × coarser; readout oversampling 1 or 2;
    coils and SNR uniform in their limits; loops 3–12 mm from the head; texture 0–8 %; bias 0–0.3;
    brain only with probability ``brain_only_fraction`` (drawn last, and only when it is above 0,
    so the draws of the other fields for a seed do not depend on it)."""
    for src in sources:
        if src not in HEAD_SOURCES:
            raise ValueError(f"unknown head source {src!r}; choose from {', '.join(HEAD_SOURCES)}")
    lo, hi = (int(v) for v in matrix_limits)
    if not 16 <= lo <= hi:
        raise ValueError(f"matrix limits must satisfy 16 <= low <= high, got {matrix_limits}")
    if not 4 <= coil_limits[0] <= coil_limits[1] <= 32:
        raise ValueError(f"coil limits must satisfy 4 <= low <= high <= 32, got {coil_limits}")
    if not 0.0 <= brain_only_fraction <= 1.0:
        raise ValueError(f"brain-only fraction must be in [0, 1], got {brain_only_fraction}")
    source = sources[int(rng.integers(len(sources)))]
    contrast, signals = random_signals(rng)
    orientation = ("axial", "coronal", "sagittal")[int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
    scan = HeadScan(source, contrast, signals, orientation, bool(rng.uniform() < 0.5),
                    float(rng.uniform(1.0, 1.25)), float(rng.uniform(0.8, 1.15)), float(rng.uniform(0.7, 2.0)),
                    float(rng.uniform(1.0, 1.35)), int(rng.choice([1, 2])),
                    int(rng.integers(coil_limits[0], coil_limits[1] + 1)), float(rng.uniform(3, 12)),
                    float(rng.uniform(*snr_limits_db)), float(rng.uniform(0, 0.08)), float(rng.uniform(0, 0.3)),
                    (lo, hi))
    if brain_only_fraction > 0 and rng.uniform() < brain_only_fraction:
        scan = replace(scan, brain_only=True)
    return scan


def scan_grid(scan: HeadScan, read_extent_mm: float, phase_extent_mm: float) -> tuple[tuple[int, int], tuple[float, float], int]:
    """``((H, W), (readout FOV, phase FOV) mm, fold)`` for a head of the given in-plane extents:
    FOVs from the margins, matrix from the pixel sizes clipped to the matrix limits (the FOV is
    kept, the pixel changes), ``fold`` the number of phase FOVs that hold the whole head."""
    lo, hi = scan.matrix_limits
    fov_read = max(read_extent_mm, 40.0) * scan.read_margin
    fov_phase = max(phase_extent_mm, 40.0) * scan.phase_ratio
    h = int(np.clip(round(fov_read / scan.pixel_mm), lo, hi))
    w = int(np.clip(round(fov_phase / (scan.pixel_mm * scan.phase_pixel_ratio)), lo, hi))
    fold = max(1, int(np.ceil((phase_extent_mm + 10.0) / fov_phase)))
    return (h, w), (float(fov_read), float(fov_phase)), fold


# ----------------------------------------------------------------------------- simulation


def _plane_axes(orientation: str, swap: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols, normal = ORIENTATIONS[orientation]
    return (cols, rows, normal) if swap else (rows, cols, normal)


def in_plane_extent(anatomy: Anatomy, to_object, centre: np.ndarray, row_dir, col_dir,
                    half_mm: float = 200.0, step_mm: float = 4.0) -> tuple[float, float]:
    """Extent (mm) of the object's support (> 5 % of its maximum) along ``row_dir`` and
    ``col_dir`` in the plane through ``centre`` (scanner mm) — from a coarse look-up."""
    axis = np.arange(-half_mm, half_mm + step_mm, step_mm)
    pts = centre + axis[:, None, None] * np.asarray(row_dir) + axis[None, :, None] * np.asarray(col_dir)
    mag = anatomy.sample(to_object(pts))
    inside = mag > 0.05 * max(float(mag.max()), 1e-12)
    if not inside.any():
        return 0.0, 0.0
    r, c = np.nonzero(inside)
    return float(np.ptp(axis[r]) + step_mm), float(np.ptp(axis[c]) + step_mm)


def simulate_head_volume(scan: HeadScan, num_slices: int, rng: np.random.Generator, noise_samples: int = 1024,
                         workers: int = 1, progress: Optional[Callable[[int], None]] = None) -> SimulatedVolume:
    """Simulate ``num_slices`` slices of ``scan`` (see module doc). Draws the anatomy's random
    layers, warp, pose, slab position, coil layout and phases, bias and texture from ``rng``."""
    tissues = head_tissues(scan.source, rng)
    signals = brain_only_signals(scan.signals) if scan.brain_only else scan.signals
    anatomy = voxel_anatomy(tissues.name, scan.contrast, tissues.magnitude(signals), tissues.affine)
    anatomy = deformed(anatomy, random_deformation(rng))
    pose = random_pose(rng, scan.orientation, max_angle_deg=15.0, scale_range=(0.9, 1.1), max_shift_mm=8.0)
    row_dir, col_dir, normal = _plane_axes(scan.orientation, scan.swap_axes)
    positions, spacing = central_slice_positions(anatomy.central_mm[NORMAL_AXIS[scan.orientation]], num_slices, rng)
    planes = [SlicePlane(tuple(pose.scale * p * normal), tuple(row_dir), tuple(col_dir), tuple(normal))
              for p in positions]
    mid = np.asarray(planes[num_slices // 2].centre_mm)
    read_extent, phase_extent = in_plane_extent(anatomy, pose.to_object, mid, row_dir, col_dir)
    if scan.brain_only:  # the field of view is planned on the head, so the brain sits in empty background
        read_extent, phase_extent = (e + 2 * pose.scale * SCALP_AND_SKULL_MM for e in (read_extent, phase_extent))
    (h, w), (fov_read, fov_phase), fold = scan_grid(scan, read_extent, phase_extent)
    os_ = scan.oversampling
    fine_rows = axis_positions(2 * os_ * h, fov_read / (2 * h))
    fine_cols = axis_positions(2 * w * fold, fov_phase / (2 * w))
    coarse_rows, coarse_cols = coarse_axis(fine_rows), coarse_axis(fine_cols)
    row_matrix = cubic_interpolation_matrix(coarse_rows, fine_rows)
    col_matrix = cubic_interpolation_matrix(coarse_cols, fine_cols)

    gap = scan.coil_gap_mm + (SCALP_AND_SKULL_MM if scan.brain_only else 0.0)  # the coils stay at the scalp
    semi = 0.5 * pose.scale * np.ptp(anatomy.extent_mm[:2], axis=1) + gap
    array = head_array(scan.coils, (float(semi[0]), float(semi[1])), pose.scale * float(np.ptp(anatomy.extent_mm[2])), rng)
    coil_phase = rng.uniform(0, 2 * np.pi, scan.coils)
    b0 = random_phase(rng, period_mm=float(rng.uniform(60, 150)))
    bias = bias_field(random_phase(rng), scan.bias)

    num_read, num_coils = os_ * h, scan.coils
    kspace = np.empty((num_slices, num_coils, num_read, w), np.complex64)
    target = np.empty((num_slices, h, w), np.float32)
    support_coarse = None
    for s, plane in enumerate(planes):
        coarse_pts = plane.points(coarse_rows, coarse_cols)
        weights = SIGNAL_SCALE * np.exp(1j * b0(coarse_pts)) * bias(coarse_pts)
        coarse_sens = receive_sensitivities(array, coarse_pts, coil_phase)
        maps = upsample_maps(coarse_sens * weights, row_matrix, col_matrix)
        magnitude = anatomy.sample(pose.to_object(plane.points(fine_rows, fine_cols)))
        magnitude *= fine_texture(magnitude.shape, rng, scan.texture)
        images = fold_phase(maps * magnitude, 2 * w)
        kspace[s] = fine_images_to_kspace(images, num_read, w, workers)
        target[s] = kspace_to_rss(kspace[s], h, workers)
        if s == num_slices // 2:
            mag_coarse = anatomy.sample(pose.to_object(coarse_pts))
            support_coarse = (coarse_sens, mag_coarse > 0.05 * max(float(mag_coarse.max()), 1e-12))
    sens, support = support_coarse
    psi = noise_covariance(sens[:, support] if support.any() else sens.reshape(num_coils, -1), rng)
    target_rss, noise, cov, sigma = add_coil_noise(kspace, target, psi, scan.snr_db, rng, noise_samples, workers,
                                                   progress)
    tag = f"SIM_{tissues.name}{'BRAIN' if scan.brain_only else 'HEAD'}_{scan.contrast.upper()}"
    return SimulatedVolume(
        kspace, target, target_rss, noise, cov, acquisition=tag, fov_mm=(float(fov_read), float(fov_phase)),
        slice_thickness_mm=float(pose.scale * spacing), orientation=scan.orientation,
        slice_positions_mm=np.array([float(np.dot(p.centre_mm, p.normal)) for p in planes]),
        snr_db=float(scan.snr_db), sigma=float(sigma))


def fine_images_to_kspace(images: np.ndarray, num_read: int, num_phase: int, workers: int = 1) -> np.ndarray:
    """Coil images on the fine grid ``(coil, 2·num_read, 2·num_phase)`` (twice the acquired
    resolution over the acquired FOV) → acquired k-space complex64 ``(coil, num_read, num_phase)``:
    the central frequencies of the centred orthonormal DFT, scaled by ``sqrt(N_acq / N_fine) = 1/2``."""
    k = centred_fft(images.astype(np.complex64, copy=False), -1, workers)
    start = k.shape[-1] // 2 - num_phase // 2
    k = centred_fft(np.ascontiguousarray(k[..., start:start + num_phase]), -2, workers)
    start = k.shape[-2] // 2 - num_read // 2
    return (k[:, start:start + num_read] * np.float32(0.5)).astype(np.complex64)

