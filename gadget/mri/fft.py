"""Centered orthonormal 2-D Fourier transforms over the last two axes.

Layout: any complex tensor ``(..., rows, cols)``; for k-space this is
``(batch, coil, readout, phase)``. Image-space origin is at index ``n // 2``
on each axis, matching ``numpy.fft.fftshift(numpy.fft.fft2(numpy.fft.ifftshift(x),
norm="ortho"))`` and the fastMRI convention.
"""
from __future__ import annotations

import torch

_DIMS = (-2, -1)


def _check_complex(x: torch.Tensor) -> None:
    if not torch.is_complex(x):
        raise TypeError(f"expected a complex tensor (..., rows, cols), got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"expected at least 2 dimensions (..., rows, cols), got shape {tuple(x.shape)}")


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Image → k-space, centered, unitary. Shape preserved."""
    _check_complex(image)
    x = torch.fft.ifftshift(image, dim=_DIMS)
    x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """K-space → image, centered, unitary; the exact inverse (and adjoint) of :func:`fft2c`."""
    _check_complex(kspace)
    x = torch.fft.ifftshift(kspace, dim=_DIMS)
    x = torch.fft.ifft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)
