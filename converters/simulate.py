"""Simulated multi-coil Cartesian scans from real anatomy (or a phantom) in fastMRI layout.

Physics, in order (one function each, tested separately in ``tests/test_synth.py``):

1. **Anatomy** (:mod:`gadget.converters.anatomy`, :mod:`gadget.converters.geometry`): slices from the central
   part of a 3-D head/brain volume (MNI152, Colin27) or an analytic phantom, the subject
   randomly scaled/turned/shifted per volume, sampled (trilinear) on a **fine grid**: twice the
   acquisition matrix over the recon FOV (pixel = FOV / (2 · matrix)).
2. **Smooth random phase** (:class:`SmoothPhase`): a quadratic polynomial plus a few
   low-frequency cosines (periods of about 150 mm) in scanner coordinates, like B0-offset phase.
3. **Coil sensitivities** (:mod:`gadget.converters.coils`): Biot–Savart fields of circular loops on a
   cylinder around the head; sensitivity ``B_x - i B_y``.
4. **k-space without inverse crime** (:func:`fine_to_kspace`): coil images on the fine grid →
   centred orthonormal FFT → keep the central ``W`` phase and ``2H`` readout frequencies, with the
   readout FOV twice the recon FOV (2× readout oversampling, as fastMRI stores 640 for a 320 image).
5. **Noise** (:func:`correlated_noise`): complex Gaussian, covariance ``σ² Ψ`` across coils
   (``Ψ`` from :func:`gadget.converters.coils.noise_covariance`, mean diagonal 1), white over k-space,
   plus a noise-only acquisition. **SNR definition**: ``SNR_dB = 20 log10(μ / σ)`` where ``μ`` is
   the mean of the noise-free RSS target over the object (pixels above 10 % of the volume's
   maximum) and ``σ²`` the mean per-coil noise variance of one k-space sample — equal, with the
   orthonormal FFT, to the per-coil noise variance of one image pixel.
6. **Determinism**: every random draw comes from one ``numpy.random.Generator`` seeded with
   ``seed``; the same arguments give bitwise identical arrays.

Layouts: ``kspace`` complex64 ``(slice, coil, 2H, W)`` (readout oversampled, fully sampled, noisy);
targets float32 ``(slice, H, W)``: ``target_rss`` (RSS of the noisy k-space, centre-cropped — what
fastMRI stores as ``reconstruction_rss``) and ``target`` (the same without noise, stored in files as
:data:`NOISE_FREE_TARGET` = ``"target_noise_free"``); ``noise`` complex64 ``(coil, samples)``.
Signal scale: magnitude 1 tissue × unit sensitivity ↦ :data:`SIGNAL_SCALE` (about fastMRI's range).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import scipy.fft as sfft

from .anatomy import Anatomy, load_anatomy, shepp_logan  # noqa: F401  (shepp_logan re-exported)
from .coils import (
    CoilArray,
    check_num_coils,
    coarse_axis,
    cubic_interpolation_matrix,
    loop_array,
    noise_covariance,
    receive_sensitivities,
    upsample_maps,
)
from .geometry import (
    NORMAL_AXIS,
    Pose,
    SlicePlane,
    axis_positions,
    central_slice_positions,
    check_orientation,
    random_pose,
    slice_planes,
)

NOISE_FREE_TARGET = "target_noise_free"  # extra dataset next to fastMRI's reconstruction_rss
SIGNAL_SCALE = 1e-4
DEFAULT_SNR_DB = 30.0
COIL_GAP_MM = 15.0          # loops sit this far outside the object's radius
OBJECT_THRESHOLD = 0.1      # "object" = noise-free RSS above this fraction of the volume maximum


@dataclass
class SimulatedVolume:
    kspace: np.ndarray        # complex64 (slice, coil, 2H, W), noisy, fully sampled
    target: np.ndarray        # float32 (slice, H, W): noise-free RSS, cropped
    target_rss: np.ndarray    # float32 (slice, H, W): RSS of the noisy data, cropped (fastMRI's target)
    noise: np.ndarray         # complex64 (coil, samples): a noise-only acquisition
    noise_covariance: np.ndarray  # complex128 (coil, coil), the covariance the noise was drawn with
    acquisition: str = "SIM_PHANTOM_T1"
    fov_mm: tuple[float, float] = (240.0, 240.0)   # recon FOV (rows = readout, columns = phase)
    slice_thickness_mm: float = 5.0
    orientation: str = "axial"
    slice_positions_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))  # scanner, along the normal
    snr_db: float = DEFAULT_SNR_DB
    sigma: float = 0.0        # per-coil noise standard deviation (mean over coils)


# ----------------------------------------------------------------------------- step 2: phase


@dataclass(frozen=True)
class SmoothPhase:
    """Phase (radians) at scanner points ``p`` (mm): with ``u = p / 100 mm``,
    ``φ = offset + g·u + uᵀ Q u + Σ_k a_k cos(2π f_k·p + ψ_k)``."""

    offset: float
    gradient: np.ndarray      # (3,) rad per 100 mm
    quadratic: np.ndarray     # (3, 3) symmetric, rad per (100 mm)²
    frequencies: np.ndarray   # (K, 3) cycles per mm
    amplitudes: np.ndarray    # (K,) rad
    phases: np.ndarray        # (K,) rad

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        p = np.asarray(points_mm, float)
        u = p / 100.0
        phi = self.offset + u @ self.gradient + np.einsum("...i,ij,...j->...", u, self.quadratic, u)
        return phi + np.cos(2 * np.pi * (p @ self.frequencies.T) + self.phases) @ self.amplitudes


def random_phase(rng: np.random.Generator, terms: int = 6, period_mm: float = 150.0) -> SmoothPhase:
    """Draw a :class:`SmoothPhase`: offset uniform in [0, 2π); gradient N(0, 0.6²); quadratic
    N(0, 0.25²); ``terms`` cosines with frequencies N(0, (1/period_mm)²) per axis, amplitudes N(0, 0.3²)."""
    q = rng.normal(0, 0.25, (3, 3))
    return SmoothPhase(float(rng.uniform(0, 2 * np.pi)), rng.normal(0, 0.6, 3), (q + q.T) / 2,
                       rng.normal(0, 1 / period_mm, (terms, 3)), rng.normal(0, 0.3, terms),
                       rng.uniform(0, 2 * np.pi, terms))


# ----------------------------------------------------------------------------- step 4: k-space


def centred_fft(x: np.ndarray, axis: int, workers: int = 1, inverse: bool = False) -> np.ndarray:
    """Centred orthonormal 1-D (inverse) DFT along ``axis`` — ``fftshift(fft(ifftshift(x)))`` —
    the convention of fastMRI's ``fft2c``; for even lengths done by sign modulation instead of
    shifts (``(-1)^(k - N/2) · DFT((-1)^m x)``), which saves two copies."""
    n = x.shape[axis]
    transform = sfft.ifft if inverse else sfft.fft
    if n % 2:
        return sfft.fftshift(transform(sfft.ifftshift(x, axes=axis), axis=axis, norm="ortho", workers=workers),
                             axes=axis)
    shape = [1] * x.ndim
    shape[axis] = n
    sign = np.where(np.arange(n) % 2, -1, 1).astype(np.float32).reshape(shape)
    y = transform(x * sign, axis=axis, norm="ortho", workers=workers, overwrite_x=True)
    y *= sign if (n // 2) % 2 == 0 else -sign
    return y


def image_from_kspace(kspace: np.ndarray, workers: int = 1) -> np.ndarray:
    """Centred orthonormal 2-D inverse DFT over the last two axes (``(..., readout, phase)`` →
    coil images, readout FOV still doubled)."""
    return centred_fft(centred_fft(kspace, -1, workers, inverse=True), -2, workers, inverse=True)


def _centre(n_from: int, n_to: int) -> slice:
    start = n_from // 2 - n_to // 2
    return slice(start, start + n_to)


def fine_to_kspace(images: np.ndarray, workers: int = 1) -> np.ndarray:
    """Coil images on the fine grid → acquired k-space.

    ``images``: complex ``(coil, 2H, 2W)`` over the recon FOV, pixel FOV/(2H) × FOV/(2W).
    Returns complex64 ``(coil, 2H, W)``: the central ``W`` phase frequencies and, with the readout
    FOV doubled (zero padding to ``4H``), the central ``2H`` readout frequencies of the centred
    orthonormal DFT, scaled by ``sqrt(N_acquired / N_fine) = 1/2`` so the inverse FFT of the
    result reproduces the image magnitudes.
    """
    coils, rows, cols = images.shape
    h, w = rows // 2, cols // 2
    k = centred_fft(images.astype(np.complex64, copy=False), -1, workers)[..., _centre(cols, w)]
    padded = np.zeros((coils, 4 * h, w), np.complex64)
    padded[:, h:3 * h] = k
    return (centred_fft(padded, -2, workers)[:, _centre(4 * h, 2 * h)] * np.float32(0.5)).astype(np.complex64)


def kspace_to_rss(kspace: np.ndarray, height: int, workers: int = 1) -> np.ndarray:
    """RSS image of ``(coil, readout, phase)`` k-space, centre-cropped to ``height`` rows →
    float32 ``(height, phase)``."""
    img = image_from_kspace(kspace, workers)
    rss = np.sqrt((img.real ** 2 + img.imag ** 2).sum(0))
    return rss[_centre(rss.shape[0], height)].astype(np.float32)


# ----------------------------------------------------------------------------- step 5: noise


def correlated_noise(shape: tuple[int, ...], covariance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Complex Gaussian noise ``(coil, ...)``, zero mean, ``E[n nᴴ] = covariance`` across coils,
    independent over the other axes → complex64. (``L w`` with ``L`` the Cholesky factor and ``w``
    standard complex normal, ``E|w|² = 1``; the product is summed coil by coil, not by BLAS, so the
    result does not depend on the BLAS thread count.)"""
    covariance = np.asarray(covariance)
    if covariance.shape != (shape[0], shape[0]):
        raise ValueError(f"covariance shape {covariance.shape} does not match {shape[0]} coils")
    chol = np.linalg.cholesky(covariance).astype(np.complex64)
    size = int(np.prod(shape[1:]))
    white = rng.standard_normal((shape[0], size, 2), dtype=np.float32).view(np.complex64)[..., 0]
    white *= np.float32(np.sqrt(0.5))
    out = np.zeros((shape[0], size), np.complex64)
    for c in range(shape[0]):
        for j in range(c + 1):
            out[c] += chol[c, j] * white[j]
    return out.reshape(shape)


def noise_sigma(target: np.ndarray, snr_db: float) -> float:
    """σ for ``snr_db`` given the noise-free RSS ``target`` (see the SNR definition above)."""
    if not np.isfinite(snr_db):
        raise ValueError(f"SNR must be a finite number of dB, got {snr_db}")
    mean = float(target[target > OBJECT_THRESHOLD * target.max()].mean())
    return mean / 10 ** (snr_db / 20)


def add_coil_noise(kspace: np.ndarray, target: np.ndarray, psi: np.ndarray, snr_db: float,
                   rng: np.random.Generator, noise_samples: int, workers: int = 1,
                   progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Step 5 for a volume, in place: ``kspace`` ``(slice, coil, readout, phase)`` gets noise of
    covariance ``σ² psi`` with σ from ``snr_db`` and the noise-free RSS ``target`` ``(slice, H, W)``.
    Returns ``(target_rss (slice, H, W), noise-only samples (coil, noise_samples), covariance, σ)``;
    ``progress(1)`` after each slice."""
    sigma = noise_sigma(target, snr_db)
    cov = psi * sigma**2
    target_rss = np.empty_like(target)
    for s in range(kspace.shape[0]):
        kspace[s] += correlated_noise(kspace[s].shape, cov, rng)
        target_rss[s] = kspace_to_rss(kspace[s], target.shape[-2], workers)
        if progress is not None:
            progress(1)
    noise = correlated_noise((kspace.shape[1], noise_samples), cov, rng)
    return target_rss, noise, cov, float(sigma)


# ----------------------------------------------------------------------------- the scan


@dataclass
class ScanGeometry:
    """Everything fixed for one volume: pose, slice planes, coil array, fine and coarse grids."""

    anatomy: Anatomy
    pose: Pose
    planes: list[SlicePlane]
    slice_spacing_mm: float
    fov_mm: tuple[float, float]
    recon_size: tuple[int, int]
    coil_array: CoilArray
    coil_phase: np.ndarray
    phase: SmoothPhase
    fine_rows: np.ndarray = field(init=False)
    fine_cols: np.ndarray = field(init=False)
    coarse_rows: np.ndarray = field(init=False)
    coarse_cols: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        h, w = self.recon_size
        self.fine_rows = axis_positions(2 * h, self.fov_mm[0] / (2 * h))
        self.fine_cols = axis_positions(2 * w, self.fov_mm[1] / (2 * w))
        self.coarse_rows, self.coarse_cols = coarse_axis(self.fine_rows), coarse_axis(self.fine_cols)
        self._row_matrix = cubic_interpolation_matrix(self.coarse_rows, self.fine_rows)
        self._col_matrix = cubic_interpolation_matrix(self.coarse_cols, self.fine_cols)

    def object_magnitude(self, plane: SlicePlane) -> np.ndarray:
        """Step 1: float32 ``(2H, 2W)`` fine-grid magnitude (anatomy, no scale)."""
        return self.anatomy.sample(self.pose.to_object(plane.points(self.fine_rows, self.fine_cols)))

    def object_image(self, plane: SlicePlane) -> np.ndarray:
        """Steps 1+2: complex64 ``(2H, 2W)`` fine-grid object (magnitude × phase × SIGNAL_SCALE)."""
        phase = self.phase(plane.points(self.fine_rows, self.fine_cols)).astype(np.float32)
        return (self.object_magnitude(plane) * np.float32(SIGNAL_SCALE)) * np.exp(1j * phase)

    def coarse_sensitivities(self, plane: SlicePlane) -> np.ndarray:
        return receive_sensitivities(self.coil_array, plane.points(self.coarse_rows, self.coarse_cols), self.coil_phase)

    def sensitivities(self, plane: SlicePlane) -> np.ndarray:
        """Step 3: complex64 ``(coil, 2H, 2W)`` maps on the fine grid."""
        return upsample_maps(self.coarse_sensitivities(plane), self._row_matrix, self._col_matrix)

    def phased_sensitivities(self, plane: SlicePlane) -> np.ndarray:
        """Steps 2+3 together: ``(coil, 2H, 2W)`` maps × object phase × SIGNAL_SCALE. Both factors
        are smooth (features of 100 mm and more), so they are multiplied on the coarse grid and
        upsampled once — this saves evaluating the phase at every fine pixel."""
        coarse_points = plane.points(self.coarse_rows, self.coarse_cols)
        weights = SIGNAL_SCALE * np.exp(1j * self.phase(coarse_points))
        return upsample_maps(self.coarse_sensitivities(plane) * weights, self._row_matrix, self._col_matrix)

    def object_support_coarse(self, plane: SlicePlane) -> np.ndarray:
        magnitude = self.anatomy.sample(self.pose.to_object(plane.points(self.coarse_rows, self.coarse_cols)))
        return magnitude > 0.05 * max(float(magnitude.max()), 1e-12)


def scan_geometry(anatomy: Anatomy, num_slices: int, num_coils: int, recon_size: tuple[int, int],
                  orientation: str, rng: np.random.Generator, fov_mm: Optional[float] = None) -> ScanGeometry:
    """Draw the per-volume geometry (pose, slab position, coil phases, phase field) from ``rng``."""
    check_num_coils(num_coils)
    check_orientation(orientation)
    h, w = _check_recon_size(recon_size)
    fov_rows = float(fov_mm if fov_mm is not None else anatomy.default_fov_mm)
    if not fov_rows > 0:
        raise ValueError(f"field of view must be > 0 mm, got {fov_mm}")
    pose = random_pose(rng, orientation)
    positions, spacing = central_slice_positions(anatomy.central_mm[NORMAL_AXIS[orientation]], num_slices, rng)
    radius = pose.radius_bound_mm(anatomy.radius_mm, anatomy.extent_mm) + COIL_GAP_MM
    length = pose.scale * float(np.ptp(anatomy.extent_mm[2]))
    return ScanGeometry(
        anatomy=anatomy, pose=pose, planes=slice_planes(orientation, pose.scale * positions),
        slice_spacing_mm=pose.scale * spacing, fov_mm=(fov_rows, fov_rows * w / h), recon_size=(h, w),
        coil_array=loop_array(num_coils, radius, length), coil_phase=rng.uniform(0, 2 * np.pi, num_coils),
        phase=random_phase(rng))


def _check_recon_size(recon_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in recon_size)
    except (TypeError, ValueError):
        raise ValueError(f"recon_size must be (H, W), got {recon_size!r}") from None
    if h < 8 or w < 8 or (h, w) != tuple(recon_size):
        raise ValueError(f"recon_size must be two integers >= 8, got {recon_size!r}")
    return h, w


def simulate_clean_slice(geometry: ScanGeometry, plane: SlicePlane, workers: int = 1) -> np.ndarray:
    """Steps 1–4 for one slice: noise-free acquired k-space complex64 ``(coil, 2H, W)``."""
    return fine_to_kspace(geometry.phased_sensitivities(plane) * geometry.object_magnitude(plane), workers)


def simulate_volume(num_slices: int = 4, num_coils: int = 8, recon_size: tuple[int, int] = (128, 128),
                    snr_db: float = DEFAULT_SNR_DB, seed: int = 0, noise_samples: int = 256, *,
                    source: str = "phantom", orientation: str = "axial", contrast: str = "t1w",
                    fov_mm: Optional[float] = None, workers: int = 1,
                    progress: Optional[Callable[[int], None]] = None) -> SimulatedVolume:
    """Simulate a multi-slice scan; ``recon_size = (H, W)`` is the image matrix, k-space readout is 2·H.

    ``source`` ∈ mni | colin | phantom; ``fov_mm`` is the recon FOV along the rows (default per
    source; square pixels); ``workers`` threads for the FFTs; ``progress(1)`` after each slice.
    """
    if num_slices < 1:
        raise ValueError(f"number of slices must be >= 1, got {num_slices}")
    if noise_samples < 1:
        raise ValueError(f"noise_samples must be >= 1, got {noise_samples}")
    rng = np.random.default_rng(seed)
    anatomy = load_anatomy(source, contrast)
    geo = scan_geometry(anatomy, num_slices, num_coils, recon_size, orientation, rng, fov_mm)
    h, w = geo.recon_size
    middle = geo.planes[num_slices // 2]
    support = geo.object_support_coarse(middle)
    sens = geo.coarse_sensitivities(middle)
    psi = noise_covariance(sens[:, support] if support.any() else sens.reshape(num_coils, -1), rng)

    kspace = np.empty((num_slices, num_coils, 2 * h, w), np.complex64)
    target = np.empty((num_slices, h, w), np.float32)
    for s, plane in enumerate(geo.planes):
        kspace[s] = simulate_clean_slice(geo, plane, workers)
        target[s] = kspace_to_rss(kspace[s], h, workers)
    target_rss, noise, cov, sigma = add_coil_noise(kspace, target, psi, snr_db, rng, noise_samples, workers, progress)
    return SimulatedVolume(
        kspace, target, target_rss, noise, cov, acquisition=f"SIM_{anatomy.name}_{contrast[:-1].upper()}",
        fov_mm=geo.fov_mm, slice_thickness_mm=geo.slice_spacing_mm, orientation=orientation,
        slice_positions_mm=np.array([float(np.dot(p.centre_mm, p.normal)) for p in geo.planes]),
        snr_db=float(snr_db), sigma=float(sigma))


# ----------------------------------------------------------------------------- files


def fastmri_header(vol: SimulatedVolume, fov_mm: Optional[float] = None, slice_mm: Optional[float] = None,
                   acceleration: int = 1, calibration_mode: str = "other") -> str:
    """ISMRMRD header consistent with the simulated data: encoded matrix ``(2H, W, 1)`` over a
    readout FOV twice the recon FOV, recon matrix ``(H, W, 1)``, phase limits 0..W-1 centred at
    W//2 (fastMRI padding 0..W). ``fov_mm`` (rows) and ``slice_mm`` default to the volume's."""
    from gadget.data.mrd_header import build_header_xml

    s, c, readout, phase = vol.kspace.shape
    h, w = vol.target.shape[-2:]
    fov_r, fov_c = (vol.fov_mm if fov_mm is None else (float(fov_mm), float(fov_mm) * w / h))
    thick = vol.slice_thickness_mm if slice_mm is None else float(slice_mm)
    return build_header_xml(
        encoded_matrix=(readout, phase, 1), recon_matrix=(h, w, 1),
        encoded_fov_mm=(fov_r * readout / h, fov_c * phase / w, thick), recon_fov_mm=(fov_r, fov_c, thick),
        e1_max=phase - 1, e1_center=phase // 2, num_coils=c, num_slices=s,
        acceleration_e1=acceleration, calibration_mode=calibration_mode)


def write_fastmri(path, vol: SimulatedVolume, mask: np.ndarray | None = None,
                  num_low_frequency: int | None = None, acceleration: float | None = None,
                  patient_id: str = "sim", keep_targets: bool = False, with_noise: bool = False) -> None:
    """Write a fastMRI multicoil file (atomically).

    Train/val layout when ``mask`` is None: full ``kspace``, ``reconstruction_rss``,
    :data:`NOISE_FREE_TARGET`, ``ismrmrd_header``. Test layout otherwise: undersampled ``kspace``,
    ``mask``, attrs ``acceleration`` and ``num_low_frequency`` — plus the two targets when
    ``keep_targets``. ``with_noise`` adds the noise-only samples as ``noise`` complex64
    ``(coil, samples)`` (converters turn it into a noise scan). Attrs always: ``max``, ``norm``
    (of ``reconstruction_rss``), ``acquisition``, ``patient_id``.
    """
    from gadget.data.fastmri_file import write_atomic_h5

    attrs = {"acquisition": vol.acquisition, "patient_id": patient_id,
             "max": float(vol.target_rss.max()), "norm": float(np.linalg.norm(vol.target_rss))}
    targets = {"reconstruction_rss": vol.target_rss, NOISE_FREE_TARGET: vol.target}
    if mask is None:
        data = {"kspace": vol.kspace, **targets, "ismrmrd_header": fastmri_header(vol)}
    else:
        mask = np.asarray(mask, bool)
        if mask.shape != (vol.kspace.shape[-1],):
            raise ValueError(f"mask must have shape ({vol.kspace.shape[-1]},), got {mask.shape}")
        data = {"kspace": (vol.kspace * mask).astype(np.complex64), "mask": mask.astype(np.float32),
                "ismrmrd_header": fastmri_header(vol, acceleration=int(round(acceleration or 1)))}
        if keep_targets:
            data.update(targets)
        attrs.update(acceleration=float(acceleration or mask.size / mask.sum()),
                     num_low_frequency=int(num_low_frequency or 0))
    if with_noise:
        data["noise"] = vol.noise
    write_atomic_h5(path, data, attrs)
