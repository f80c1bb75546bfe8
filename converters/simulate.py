"""Simulated multi-coil Cartesian scans (numerical phantom) in fastMRI layout.

Physics, in order: analytic modified Shepp-Logan anatomy (varying across slices) × smooth random
phase × smooth coil sensitivities of receive loops on a ring around the object; simulated on a
grid twice as fine as the acquisition and cropped in k-space (no inverse crime); 2× readout
oversampling as scanners store it; complex Gaussian noise correlated across coils.

Layouts: k-space ``(slice, coil, 2·H, W)`` complex64 (readout oversampled); targets ``(slice, H, W)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Modified Shepp-Logan (Toft 1996): intensity, semi-axes a, b, centre x0, y0, rotation (deg).
_ELLIPSES = np.array([
    [1.0, .69, .92, 0, 0, 0], [-.8, .6624, .874, 0, -.0184, 0],
    [-.2, .11, .31, .22, 0, -18], [-.2, .16, .41, -.22, 0, 18],
    [.1, .21, .25, 0, .35, 0], [.1, .046, .046, 0, .1, 0], [.1, .046, .046, 0, -.1, 0],
    [.1, .046, .023, -.08, -.605, 0], [.1, .023, .023, 0, -.606, 0], [.1, .023, .046, .06, -.605, 0],
])


@dataclass
class SimulatedVolume:
    kspace: np.ndarray        # complex64 (slice, coil, 2H, W), noisy, fully sampled
    target: np.ndarray        # float32 (slice, H, W): noise-free RSS, cropped
    target_rss: np.ndarray    # float32 (slice, H, W): RSS of the noisy data, cropped (fastMRI's target)
    noise: np.ndarray         # complex64 (coil, samples): a noise-only acquisition
    noise_covariance: np.ndarray  # complex128 (coil, coil), the covariance the noise was drawn with


def _fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _ifft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def phantom(u: np.ndarray, v: np.ndarray, z: float) -> np.ndarray:
    """Shepp-Logan intensity at coordinates ``(u, v)`` (object within [-1, 1]²); ``z`` in [-1, 1]
    shrinks the ellipses like a slice moving off the centre of an ellipsoid."""
    scale = np.sqrt(max(1.0 - 0.6 * z * z, 0.05))
    out = np.zeros(u.shape)
    for amp, a, b, x0, y0, deg in _ELLIPSES:
        t = np.deg2rad(deg)
        du, dv = u - x0 * scale, v - y0 * scale
        ru = (du * np.cos(t) + dv * np.sin(t)) / (a * scale)
        rv = (-du * np.sin(t) + dv * np.cos(t)) / (b * scale)
        out += amp * (ru * ru + rv * rv <= 1.0)
    return out


def coil_sensitivities(u: np.ndarray, v: np.ndarray, num_coils: int, radius: float = 1.25,
                       loop_size: float = 0.6) -> np.ndarray:
    """``(coil, *u.shape)`` complex maps of loops evenly spaced on a ring of ``radius``: magnitude
    falls off like a loop's on-axis field, (1 + (d/size)²)^-1.5; phase varies with position."""
    maps = []
    for c in range(num_coils):
        ang = 2 * np.pi * c / num_coils
        cu, cv = radius * np.cos(ang), radius * np.sin(ang)
        d2 = (u - cu) ** 2 + (v - cv) ** 2
        mag = (1.0 + d2 / loop_size**2) ** -1.5
        phase = ang + 0.8 * ((u - cu) * np.sin(ang) - (v - cv) * np.cos(ang))
        maps.append(mag * np.exp(1j * phase))
    return np.stack(maps)


def _smooth_phase(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c = rng.normal(scale=[1.0, 0.8, 0.8, 0.3, 0.3, 0.3])
    return np.exp(1j * (c[0] + c[1] * u + c[2] * v + c[3] * u * u + c[4] * u * v + c[5] * v * v))


def noise_covariance(num_coils: int, rng: np.random.Generator, correlation: float = 0.2) -> np.ndarray:
    """Hermitian positive-definite coil covariance with unit mean diagonal and neighbour coupling."""
    idx = np.arange(num_coils)
    dist = np.minimum(np.abs(idx[:, None] - idx[None]), num_coils - np.abs(idx[:, None] - idx[None]))
    cov = correlation ** dist * np.exp(1j * 0.3 * (idx[:, None] - idx[None]))
    cov = cov * np.outer(g := rng.uniform(0.8, 1.2, num_coils), g)
    return cov / np.mean(np.real(np.diag(cov)))


def simulate_volume(num_slices: int = 4, num_coils: int = 8, recon_size: tuple[int, int] = (128, 128),
                    snr_db: float = 30.0, seed: int = 0, noise_samples: int = 256) -> SimulatedVolume:
    """Simulate a multi-slice scan; ``recon_size = (H, W)`` is the image matrix, k-space readout is 2·H."""
    rng = np.random.default_rng(seed)
    h, w = recon_size
    H_os = 2 * h
    # fine grid: 2× the acquired matrix, same FOV (readout FOV twice the object FOV)
    fu = (np.arange(2 * H_os) - H_os) / H_os * 2.0  # readout coordinate, object spans [-1, 1]
    fv = (np.arange(2 * w) - w) / w * 1.1            # phase coordinate, small margin
    U, V = np.meshgrid(fu, fv, indexing="ij")
    sens = coil_sensitivities(U, V, num_coils)
    cov = noise_covariance(num_coils, rng)
    chol = np.linalg.cholesky(cov)

    kspace = np.empty((num_slices, num_coils, H_os, w), np.complex64)
    target = np.empty((num_slices, h, w), np.float32)
    target_rss = np.empty_like(target)
    scale = 1e-4
    sigma = None
    for s in range(num_slices):
        z = 0.0 if num_slices == 1 else -0.8 + 1.6 * s / (num_slices - 1)
        obj = phantom(U, V, z) * _smooth_phase(U, V, rng) * scale
        fine_k = _fft2c(sens * obj)
        r0, c0 = (2 * H_os - H_os) // 2, (2 * w - w) // 2
        clean = fine_k[:, r0:r0 + H_os, c0:c0 + w] * np.sqrt((H_os * w) / (4 * H_os * w))
        if sigma is None:  # SNR defined on the first slice's mean signal in the object
            img = np.sqrt((np.abs(_ifft2c(clean)) ** 2).sum(0))
            sigma = img[img > 0.1 * img.max()].mean() / 10 ** (snr_db / 20)
        white = (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)) * (sigma / np.sqrt(2))
        noisy = clean + np.einsum("ij,j...->i...", chol, white)
        kspace[s] = noisy
        target[s] = _crop_rss(_ifft2c(clean), h)
        target_rss[s] = _crop_rss(_ifft2c(noisy), h)
    white = (rng.standard_normal((num_coils, noise_samples)) + 1j * rng.standard_normal((num_coils, noise_samples)))
    noise = (chol @ white) * (sigma / np.sqrt(2))
    return SimulatedVolume(kspace, target, target_rss, noise.astype(np.complex64), cov * sigma**2)


def _crop_rss(coil_images: np.ndarray, h: int) -> np.ndarray:
    r = np.sqrt((np.abs(coil_images) ** 2).sum(0))
    start = (r.shape[0] - h) // 2
    return r[start:start + h]


NOISE_FREE_TARGET = "target_noise_free"  # extra dataset next to fastMRI's reconstruction_rss


def fastmri_header(vol: SimulatedVolume, fov_mm: float = 200.0, slice_mm: float = 4.0,
                   acceleration: int = 1, calibration_mode: str = "other") -> str:
    """ISMRMRD header consistent with the simulated data (readout 2× oversampled)."""
    from gadget.data.mrd_header import build_header_xml

    s, c, readout, phase = vol.kspace.shape
    h, w = vol.target.shape[-2:]
    return build_header_xml(
        encoded_matrix=(readout, phase, 1), recon_matrix=(h, w, 1),
        encoded_fov_mm=(2 * fov_mm, fov_mm * phase / h, slice_mm), recon_fov_mm=(fov_mm, fov_mm * w / h, slice_mm),
        e1_max=phase - 1, e1_center=phase // 2, num_coils=c, num_slices=s,
        acceleration_e1=acceleration, calibration_mode=calibration_mode)


def write_fastmri(path, vol: SimulatedVolume, mask: np.ndarray | None = None,
                  num_low_frequency: int | None = None, acceleration: float | None = None,
                  patient_id: str = "sim") -> None:
    """Write a fastMRI multicoil file: train/val layout when ``mask`` is None, else test layout
    (undersampled ``kspace``, ``mask``, attrs ``acceleration`` and ``num_low_frequency``)."""
    from gadget.data.fastmri_file import write_atomic_h5

    attrs = {"acquisition": "SIMULATED_PHANTOM", "patient_id": patient_id,
             "max": float(vol.target_rss.max()), "norm": float(np.linalg.norm(vol.target_rss))}
    if mask is None:
        data = {"kspace": vol.kspace, "reconstruction_rss": vol.target_rss, NOISE_FREE_TARGET: vol.target,
                "ismrmrd_header": fastmri_header(vol)}
    else:
        mask = np.asarray(mask, bool)
        data = {"kspace": (vol.kspace * mask).astype(np.complex64), "mask": mask.astype(np.float32),
                "ismrmrd_header": fastmri_header(vol, acceleration=int(round(acceleration or 1)))}
        attrs.update(acceleration=float(acceleration or mask.size / mask.sum()),
                     num_low_frequency=int(num_low_frequency or 0))
    write_atomic_h5(path, data, attrs)
