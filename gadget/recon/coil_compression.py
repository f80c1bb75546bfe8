"""PCA (SVD) coil compression from a slice's calibration region, as Gadgetron's eigen-channel
gadgets do (docs/guide/pipeline.md): many-channel arrays (32-64 coils) are reduced to ``N`` virtual coils
before the network, which then works on fewer, fixed-count channels.

For calibration data ``X`` (complex ``(coil, samples)``: every readout sample of every calibration
line), ``X = U S Vᴴ`` (SVD); the compression matrix is ``A = U[:, :N]ᴴ`` ``(N, coil)`` and a
line's virtual coils are ``A · data``. ``A`` has orthonormal rows (``A Aᴴ = I``), so compressed
noise stays white when the data was prewhitened, and data lying in the span of the first ``N``
singular vectors is kept exactly (RSS images unchanged).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..mri.masks import contiguous_center_lines
from ..stream.assemble import SliceData


class CompressionError(ValueError):
    """Coil compression cannot be computed for a slice; the message says why."""


def compression_matrix(calibration: np.ndarray, virtual_coils: int) -> np.ndarray:
    """``calibration`` complex ``(coil, readout, lines)`` (k-space, any units) → complex64
    ``(virtual_coils, coil)``: the conjugate transposes of the first ``virtual_coils`` left singular
    vectors of the ``(coil, readout·lines)`` matrix, strongest first."""
    calibration = np.asarray(calibration)
    if calibration.ndim != 3:
        raise CompressionError(f"calibration data must be (coil, readout, lines), got shape {calibration.shape}")
    coils = calibration.shape[0]
    if not 1 <= virtual_coils <= coils:
        raise CompressionError(f"cannot keep {virtual_coils} virtual coils of {coils}")
    x = calibration.reshape(coils, -1).astype(np.complex128)
    if x.shape[1] == 0 or not np.any(x):
        raise CompressionError("calibration region holds no data (no lines or all zero)")
    u, _, _ = np.linalg.svd(x, full_matrices=False)
    return np.ascontiguousarray(u[:, :virtual_coils].conj().T).astype(np.complex64)


def retained_energy(calibration: np.ndarray, matrix: np.ndarray) -> float:
    """Fraction (0-1) of the calibration data's energy ``‖X‖²`` kept by ``matrix`` ``(N, coil)``:
    ``‖A X‖² / ‖X‖²`` with ``X`` ``(coil, samples)``."""
    x = np.asarray(calibration).reshape(matrix.shape[1], -1).astype(np.complex128)
    total = float(np.vdot(x, x).real)
    if total == 0:
        raise CompressionError("calibration region holds no data (all zero)")
    y = matrix.astype(np.complex128) @ x
    return float(np.vdot(y, y).real) / total


def calibration_columns(mask: np.ndarray) -> np.ndarray:
    """Phase columns of the calibration region: the run of sampled columns holding the k-space centre
    column ``phase // 2`` (it contains any calibration-flagged centre block, which
    :class:`SliceData` counts but does not locate). ``mask`` bool ``(phase,)`` → int indices."""
    mask = np.asarray(mask, bool)
    run = contiguous_center_lines(mask)
    if run == 0:
        raise CompressionError("the k-space centre line was not acquired: no calibration region for coil "
                               "compression")
    centre = mask.size // 2
    start = centre
    while start > 0 and mask[start - 1]:
        start -= 1
    return np.arange(start, start + run)


def slice_calibration(sl: SliceData) -> np.ndarray:
    """The calibration data of a slice, complex ``(coil, readout, lines)``: with a separate reference
    (``sl.calibration_kspace``) its measured (non-zero) columns, else the centre run of sampled columns
    of ``sl.kspace`` (:func:`calibration_columns`)."""
    reference = getattr(sl, "calibration_kspace", None)
    if reference is not None:
        columns = np.flatnonzero(np.any(reference != 0, axis=(0, 1)))
        if columns.size == 0:
            raise CompressionError("the separate reference k-space holds no lines")
        return reference[:, :, columns]
    return sl.kspace[:, :, calibration_columns(sl.mask)]


def _apply(matrix: np.ndarray, kspace: np.ndarray) -> np.ndarray:
    """``matrix`` ``(N, coil)`` applied along the coil axis of ``kspace`` ``(coil, readout, lines)`` →
    a new complex64 ``(N, readout, lines)`` C-ordered array that owns its memory (``base is None``)."""
    out = np.empty((matrix.shape[0],) + kspace.shape[1:], np.complex64)
    # per line: (N, coil) @ (coil, readout); the assembler's k-space is (lines, coil, readout) in memory
    np.matmul(matrix, kspace.transpose(2, 0, 1), out=out.transpose(2, 0, 1))
    return out


def compress_slice(sl: SliceData, matrix: np.ndarray) -> SliceData:
    """A new :class:`SliceData` whose k-space (and any other complex ``(coil, readout, lines)`` k-space
    field, e.g. separate reference data) is ``matrix`` ``(N, coil)`` applied along the coil axis;
    everything else (mask, headers, counts) shared with ``sl``. The new k-space owns its memory, so
    the assembler does not recycle it."""
    changes = {}
    for f in dataclasses.fields(sl):
        value = getattr(sl, f.name)
        if isinstance(value, np.ndarray) and np.iscomplexobj(value) and value.ndim == 3:
            if value.shape[0] != matrix.shape[1]:
                raise CompressionError(f"SliceData.{f.name} has {value.shape[0]} coils, the compression matrix "
                                       f"expects {matrix.shape[1]}")
            changes[f.name] = _apply(matrix, value)
    return dataclasses.replace(sl, **changes)


def compress(sl: SliceData, virtual_coils: int) -> tuple[SliceData, np.ndarray, float]:
    """``(compressed slice, matrix (N, coil), retained energy fraction)`` for one slice, the matrix from
    its calibration region. A slice with ``virtual_coils`` or fewer coils is returned unchanged
    (identity matrix, energy 1)."""
    coils = sl.kspace.shape[0]
    if virtual_coils >= coils:
        return sl, np.eye(coils, dtype=np.complex64), 1.0
    calibration = slice_calibration(sl)
    matrix = compression_matrix(calibration, virtual_coils)
    return compress_slice(sl, matrix), matrix, retained_energy(calibration, matrix)
