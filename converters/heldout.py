"""Held-out anatomy and coils for test sets: INIA19's real T1 brain (an anatomy no training source
contains) and a birdcage coil model (neither our training coils, Biot–Savart loops, nor BART's).
Used by the held-out test sets (experiments/generalisation/scripts/make_ood_data.py) and the adaptation
matrix (experiments/adaptation/scripts/adaptation_matrix.py)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import _read_nifti
from .tissue import INIA_SCALE, inia_path


def birdcage_sensitivities(size: int, coils: int, radius: float = 1.5) -> np.ndarray:
    """Birdcage-style coil model ``(coil, size, size)`` complex64, max modulus 1: coil ``c`` sits at
    angle ``2πc/C`` on a circle of ``radius`` (in half fields of view); its sensitivity is the inverse
    distance, with the phase of the direction to the coil plus the coil's angle. Neither our training
    coil model (Biot–Savart loops) nor BART's (which stops at 8 coils)."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    maps = []
    for c in range(coils):
        angle = 2 * np.pi * c / coils
        dy, dx = yy - radius * np.sin(angle), xx - radius * np.cos(angle)
        maps.append(np.exp(1j * (np.arctan2(dy, dx) + angle)) / np.hypot(dy, dx))
    maps = np.stack(maps)
    return (maps / np.abs(maps).max()).astype(np.complex64)


def inia_t1_slice(fraction: float, size: int) -> np.ndarray:
    """Axial slice at ``fraction`` of INIA19's T1 brain height, scaled to human size
    (``gadget.converters.tissue.INIA_SCALE``), centred in ``size``×``size`` 1 mm pixels; float32, max 1."""
    data, affine = _read_nifti(inia_path())
    k = int(round(fraction * (data.shape[2] - 1)))
    img = ndimage.zoom(data[:, :, k], abs(affine[0, 0]) * INIA_SCALE, order=1)
    img = np.clip(img, 0, None)[::-1].T                  # rows anterior→posterior, columns right→left
    out = np.zeros((size, size), np.float32)
    h, w = min(img.shape[0], size), min(img.shape[1], size)
    r0, c0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    out[(size - h) // 2:(size - h) // 2 + h, (size - w) // 2:(size - w) // 2 + w] = img[r0:r0 + h, c0:c0 + w]
    return out / out.max()
