"""Noise prewhitening from noise-measurement acquisitions (the step Gadgetron's NoiseAdjustGadget does).

Noise lines (ACQ_IS_NOISE_MEASUREMENT) are collected and consumed; at the first other
acquisition the coil noise covariance ``C = X Xᴴ / (N - 1)`` (X: complex ``(coil, samples)``)
is estimated and every later line's data becomes ``W · data`` with
``W = sqrt(mean(diag C)) · L⁻¹``, ``C = L Lᴴ`` (Cholesky). The whitened noise has covariance
``mean(diag C) · I``: coils decorrelated, overall scale unchanged. A scan without noise lines
passes unchanged.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional

import numpy as np

from .types import FLAG_IS_NOISE, AcqLine

log = logging.getLogger(__name__)


class NoiseError(ValueError):
    pass


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """``samples`` complex ``(coil, N)`` → Hermitian ``(coil, coil)`` (complex128)."""
    x = samples.astype(np.complex128)
    x = x - x.mean(axis=1, keepdims=True)
    return (x @ x.conj().T) / max(x.shape[1] - 1, 1)


def whitening_matrix(cov: np.ndarray) -> np.ndarray:
    """``W`` with ``W C Wᴴ = mean(diag C) · I``; complex64 ``(coil, coil)``."""
    try:
        lower = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise NoiseError("noise covariance is not positive definite (too few noise samples or a dead "
                         "channel); disable prewhitening or fix the noise scan") from None
    scale = np.sqrt(np.mean(np.real(np.diag(cov))))
    return (scale * np.linalg.inv(lower)).astype(np.complex64)


def prewhiten(lines: Iterable, enabled: bool = True) -> Iterator:
    """Generator stage over pipeline items: consumes noise lines, whitens the acquisitions after
    them, passes everything else through unchanged."""
    noise: list[np.ndarray] = []
    matrix: Optional[np.ndarray] = None
    for item in lines:
        if not isinstance(item, AcqLine):
            yield item
            continue
        if item.has_flag(FLAG_IS_NOISE):
            if matrix is not None:
                log.warning("noise acquisition after imaging data ignored")
            else:
                noise.append(item.data)
            continue
        if noise and matrix is None:
            channels = {n.shape[0] for n in noise}
            if len(channels) != 1 or item.data.shape[0] not in channels:
                raise NoiseError(f"noise scan has {sorted(channels)} channels but data has {item.data.shape[0]}")
            samples = np.concatenate(noise, axis=1)
            cov = noise_covariance(samples)
            matrix = whitening_matrix(cov) if enabled else np.eye(cov.shape[0], dtype=np.complex64)
            log.info("noise: %d samples x %d coils, prewhitening %s", samples.shape[1], cov.shape[0],
                     "on" if enabled else "off (config)")
        if matrix is not None and enabled:
            if item.data.shape[0] != matrix.shape[0]:
                raise NoiseError(f"acquisition has {item.data.shape[0]} channels, noise scan had {matrix.shape[0]}")
            item = AcqLine(item.head, matrix @ item.data, item.traj)
        yield item
