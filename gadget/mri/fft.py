"""Centered orthonormal 2-D Fourier transforms over the last two axes.

Layout: any complex tensor ``(..., rows, cols)``; for k-space this is
``(batch, coil, readout, phase)``. Image-space origin is at index ``n // 2``
on each axis, matching ``numpy.fft.fftshift(numpy.fft.fft2(numpy.fft.ifftshift(x),
norm="ortho"))`` and the fastMRI convention.

Even sizes (every MR matrix in practice) take no shifts: with ``c = (-1)^(i+j)`` (:func:`checkerboard`)
and ``σ = (-1)^(rows/2 + cols/2)``, ``fft2c(x) = σ c · fft2(c x)`` and ``ifft2c(k) = σ c · ifft2(c k)``
(a half-period shift of a signal is a modulation of its transform), two sign flips instead of the four
copies that ``ifftshift``/``fftshift`` make. The same identity lets a model keep k-space in the
*unshifted* frame ``u = σ c k`` between operations (``fft2(c x) = u``, ``c ifft2(u) = ifft2c(k)``), so
that no transform pays for centring at all (:class:`gadget.model.varnet.VarNet` does so at inference).
Odd sizes use the shifts.
"""
from __future__ import annotations

import torch

_DIMS = (-2, -1)
_CHECKERBOARDS: dict = {}


def _check_complex(x: torch.Tensor) -> None:
    if not torch.is_complex(x):
        raise TypeError(f"expected a complex tensor (..., rows, cols), got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"expected at least 2 dimensions (..., rows, cols), got shape {tuple(x.shape)}")


def checkerboard(rows: int, cols: int, device, dtype: torch.dtype = torch.float32, centred: bool = False,
                 like: torch.Tensor | None = None) -> torch.Tensor:
    """Real ``(rows, cols)`` tensor ``(-1)^(i+j)``; ``centred``: times ``σ = (-1)^(rows//2 + cols//2)``, the
    sign that maps centred k-space to the unshifted frame and back (module docstring). Cached, except
    while a graph is being recorded (``like``: the tensor it will multiply, a fake one under export)."""
    recording = (torch.jit.is_tracing() or torch.compiler.is_compiling()
                 or (like is not None and type(like) is not torch.Tensor))
    key = (rows, cols, str(device), dtype, centred)
    board = None if recording else _CHECKERBOARDS.get(key)
    if board is None:
        # a normal tensor even when first asked for under inference_mode: training reuses the cache
        with torch.inference_mode(False):
            i = torch.arange(rows, device=device).view(-1, 1)
            j = torch.arange(cols, device=device)
            sign = -1 if centred and (rows // 2 + cols // 2) % 2 else 1
            board = ((1 - 2 * ((i + j) % 2)) * sign).to(dtype)
        if not recording and type(board) is torch.Tensor:
            if len(_CHECKERBOARDS) > 32:
                _CHECKERBOARDS.clear()
            _CHECKERBOARDS[key] = board
    return board


def _real_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.complex128 else torch.float32


def _even(x: torch.Tensor) -> bool:
    return x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and x.dtype in (torch.complex64, torch.complex128)


def _modulated(x: torch.Tensor, transform) -> torch.Tensor:
    rows, cols = x.shape[-2:]
    dtype = _real_dtype(x)
    y = transform(x * checkerboard(rows, cols, x.device, dtype, like=x), dim=_DIMS, norm="ortho")
    return y.mul_(checkerboard(rows, cols, x.device, dtype, centred=True, like=x))  # the transform's own output


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Image → k-space, centered, unitary. Shape preserved."""
    _check_complex(image)
    if _even(image):
        return _modulated(image, torch.fft.fft2)
    x = torch.fft.ifftshift(image, dim=_DIMS)
    x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """K-space → image, centered, unitary; the exact inverse (and adjoint) of :func:`fft2c`."""
    _check_complex(kspace)
    if _even(kspace):
        return _modulated(kspace, torch.fft.ifft2)
    x = torch.fft.ifftshift(kspace, dim=_DIMS)
    x = torch.fft.ifft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)
