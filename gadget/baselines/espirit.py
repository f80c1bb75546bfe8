"""ESPIRiT coil sensitivity maps (Uecker et al., MRM 71:990, 2014), numpy + torch.

Layouts: k-space of one slice complex ``(coil, readout, phase)`` (fastMRI's per-slice layout, the
k-space centre at index ``n // 2`` on each axis, :mod:`gadget.mri.fft` convention); maps complex64
``(coil, readout, phase)`` on the same grid. Units: maps are unitless, ``Σ_coil |S|² = 1`` where
the eigenvalue passed the crop threshold and ``0`` elsewhere.

Steps:

1. **Calibration region**: the fully sampled centre block of phase columns (``num_low`` lines,
   from the file or :func:`gadget.mri.masks.contiguous_center_lines`) × a centred readout window.
2. **Calibration matrix**: every ``k × k`` patch of all coils in that region is one row
   (``C·k²`` columns). Its right singular vectors with ``σ > threshold · σ_max`` span the signal
   subspace; ``P`` is the projector onto it.
3. **Image-space operator**: averaging ``P`` over all patch positions that cover a k-space sample
   is a convolution with a ``(2k-1) × (2k-1)`` kernel ``g`` (C × C per tap). Its Fourier transform
   is a Hermitian ``C × C`` matrix ``G(x)`` per pixel with eigenvalues in ``[0, 1]``; the coil
   sensitivities are the eigenvector with eigenvalue ≈ 1. Computing ``g`` first and FFT-ing it
   (``C²`` FFTs) avoids the ``n·C`` kernel images of the textbook description.
4. **Eigen-decomposition** per pixel with :func:`torch.linalg.eigh` (batched), keep the top
   eigenvector, zero it where its eigenvalue is below ``crop``, and rotate its phase so that a
   reference coil is real and non-negative.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..mri.coils import coil_noise_levels, rss
from ..mri.masks import contiguous_center_lines
from ..mri.native import NativeKernel
from ..mri.parallel import all_threads

log = logging.getLogger(__name__)
ROWS_PER_COLUMN = 4  # default calibration window: patches per unknown of the calibration matrix
#: Patch positions along the phase axis the calibration keeps where the lines allow (:func:`calibration_kernel`).
MIN_PHASE_POSITIONS = 5


@dataclass(frozen=True)
class EspiritConfig:
    """ESPIRiT parameters.

    Attributes:
        kernel: the largest kernel width ``k`` in k-space samples on both axes; shrunk where the
            calibration lines are too few for it (:func:`calibration_kernel`).
        phase_positions: the patch positions along the phase axis the kernel leaves where the lines allow
            (:func:`calibration_kernel`); 1 shrinks the kernel only to the calibration block.
        calib_readout: readout width of the calibration window; ``None`` = wide enough that the
            calibration matrix has :data:`ROWS_PER_COLUMN` × as many rows as columns (at least
            ``max(24, 2·num_low)``, at most the whole readout). With the few ACS lines of 4× and 8×
            masks (10 of 128, 30 of 368) a square window leaves the matrix underdetermined and the
            maps poor; the ACS columns are fully sampled along the whole readout anyway.
        threshold: keep singular vectors with ``σ > threshold · σ_max``.
        crop: zero the maps where the top eigenvalue is below this (``0`` keeps everything).
        ref_coil: coil whose phase is removed from all maps; ``None`` = the coil with the most
            energy in the (cropped) maps.
        step: solve the per-pixel eigenproblems on a grid ``step`` × coarser on both axes (the same
            field of view; at least the kernel support) and interpolate maps and eigenvalues
            linearly to the full grid before cropping. The maps are smooth, and the eigenproblems
            are most of the cost: ``step`` 4 is about 16× fewer. ``1``: every pixel (BART's way).
        max_grid: with ``step`` > 1, at most this many grid points per axis (None: no cap). Coil
            sensitivities vary on the scale of the field of view, not of the pixel, so a fixed number
            of points serves every matrix size; the cap keeps large matrices from paying for detail
            the maps do not have.
        rows_per_column: with ``calib_readout`` None, the calibration window holds this many patches
            per unknown of the calibration matrix (:func:`default_calib_readout`).
        single: the calibration's Gram matrix and its eigen-decomposition in complex64 instead of
            complex128 (the signal subspace is kept down to ``threshold²`` of the largest eigenvalue,
            far above single precision's rounding; half the work).
        equalise_noise: calibrate on the coils scaled to one noise level (each by ``1 / σ_c`` from the
            outer readout, :func:`gadget.mri.coils.coil_noise_levels`) and map the maps back (per pixel
            ``S_c ∝ S'_c / w_c``, renormalised). The threshold on the calibration's singular values
            assumes noise of one level in every coil (ESPIRiT, Uecker et al. 2014, prewhitens); a coil
            noisier than the rest fills the signal subspace with its noise. Without a noise scan this is
            the diagonal of the prewhitening. No effect where some coil's level reads 0.
    """

    kernel: int = 6
    calib_readout: Optional[int] = None
    threshold: float = 0.02
    crop: float = 0.95
    ref_coil: Optional[int] = None
    step: int = 1
    max_grid: Optional[int] = None
    rows_per_column: int = ROWS_PER_COLUMN
    single: bool = False
    phase_positions: int = MIN_PHASE_POSITIONS
    equalise_noise: bool = False


def default_calib_readout(coils: int, rows: int, num_low: int, kernel: int,
                          rows_per_column: int = ROWS_PER_COLUMN) -> int:
    """Readout width giving ``rows_per_column · coils · kernel²`` patches, clipped to
    ``[max(24, 2·num_low), rows]``."""
    per_row = max(num_low - kernel + 1, 1)
    needed = -(-rows_per_column * coils * kernel * kernel // per_row) + kernel - 1
    return min(rows, max(24, 2 * num_low, needed))


def calibration_kernel(num_low: int, kernel: int, phase_positions: int = MIN_PHASE_POSITIONS) -> int:
    """The kernel width for ``num_low`` calibration lines: at most ``kernel``, at least 2, and narrow enough
    to leave ``phase_positions`` patch positions along the phase axis, or half the lines and one more where
    that is fewer (with the default 5 and ``kernel`` 6: 4 lines: 2; 5, 6: 3; 7, 8: 4; 9: 5; 10 and more: 6).

    Why: a kernel nearly as wide as the block leaves one to four positions along the phase axis; the
    calibration matrix then barely constrains the kernels along it, the signal subspace spans too much,
    and the maps' eigenvalues fall below the crop inside the object. The widths were measured on simulated
    heads with 4 to 14 calibration lines (docs/results/adaptation.md, "ESPIRiT with few calibration lines")."""
    positions = min(phase_positions, num_low // 2 + 1)
    return max(2, min(kernel, num_low - positions + 1))


def calibration_region(kspace: np.ndarray, num_low: int, calib_readout: Optional[int] = None,
                       kernel: int = 6, rows_per_column: int = ROWS_PER_COLUMN) -> np.ndarray:
    """Centre block ``(coil, calib_readout, num_low)`` of ``(coil, readout, phase)`` k-space.

    The phase block starts at ``(phase - num_low + 1) // 2`` (where fastMRI masks put their ACS
    lines); the readout window is centred on ``readout // 2`` (``None``: :func:`default_calib_readout`).
    """
    coils, rows, cols = kspace.shape
    if not 1 <= num_low <= cols:
        raise ValueError(f"num_low must be in [1, {cols}], got {num_low}")
    if calib_readout is None:
        calib_readout = default_calib_readout(coils, rows, num_low, kernel, rows_per_column)
    width = min(rows, calib_readout)
    top = rows // 2 - width // 2
    left = (cols - num_low + 1) // 2
    return np.asarray(kspace[:, top:top + width, left:left + num_low])


def calibration_gram(calib: torch.Tensor, kernel: int) -> torch.Tensor:
    """``AᴴA`` ``(C·k², C·k²)`` of the calibration matrix ``A`` of ``calib`` ``(coil, r, p)`` (complex): one row
    per ``k × k`` patch position, its columns the patch flattened ``(coil, kr, kp)``. Computed without forming
    ``A``: about a third of the arithmetic of the product, and shorter sums.

    Name the shorter of the two axes ``s``, the other ``l``, and let ``B_j`` be the ``(l - k + 1, C·k)``
    matrix of the patch rows along ``l`` at line ``j`` of ``s``: ``B_j[q, (c, e)] = x_c(j, q + e)``. The Gram
    block of offsets ``d, d'`` along ``s`` is ``Σ_i B_{i+d}ᴴ B_{i+d'}`` over the ``s - k + 1`` patch
    positions ``i``: per lag ``d' - d ≥ 0`` one batched product over ``j`` and a cumulative sum whose
    differences give each window; a negative lag's block is the conjugate transpose (``AᴴA`` is Hermitian).
    """
    coils, r, p = calib.shape
    swap = p < r
    x = calib.transpose(1, 2) if swap else calib  # (coil, s, l): products batched over the shorter axis
    s, width = x.shape[1], coils * kernel
    windows = s - kernel + 1
    rows = x.unfold(2, kernel, 1).permute(1, 2, 0, 3).reshape(s, -1, width)  # B_j: (s, l - k + 1, C·k)
    rows_h = rows.mH.contiguous()
    gram = torch.empty(kernel, width, kernel, width, dtype=calib.dtype)  # (d, (c, e), d', (c', e'))
    for lag in range(kernel):
        totals = torch.bmm(rows_h[:s - lag], rows[lag:]).cumsum(0)  # Σ_{j ≤ i} B_jᴴ B_{j+lag}
        for d in range(kernel - lag):
            block = totals[d + windows - 1] - totals[d - 1] if d else totals[windows - 1]
            gram[d, :, d + lag] = block
            if lag:
                gram[d + lag, :, d] = block.mH
    gram = gram.view(kernel, coils, kernel, kernel, coils, kernel)  # (d, c, e, d', c', e')
    order = (1, 2, 0, 4, 5, 3) if swap else (1, 0, 2, 4, 3, 5)      # to (c, kr, kp) on both sides
    return gram.permute(*order).reshape(coils * kernel * kernel, -1)


@contextlib.contextmanager
def single_thread():
    """Run a small dense eigen-decomposition on one torch thread (restored afterwards): for a few-hundred
    square matrix threads gain nothing, and on a busy 2-core machine they cost up to 50×."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def hermitian_eigh(matrices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`torch.linalg.eigh` (ascending) of Hermitian ``(..., n, n)`` on one thread (:func:`single_thread`).
    Single-precision LAPACK can fail to converge on a matrix of many (numerically) repeated zero eigenvalues,
    as a calibration of few patches gives (MKL's ``cheevd`` on one thread, a 108-square Gram matrix of rank
    11); then the decomposition is done in double precision and returned in the input's precision."""
    with single_thread():
        try:
            return torch.linalg.eigh(matrices)
        except torch.linalg.LinAlgError:
            if matrices.dtype not in (torch.complex64, torch.float32):
                raise
            wide = torch.complex128 if matrices.is_complex() else torch.float64
            values, vectors = torch.linalg.eigh(matrices.to(wide))
            return values.to(matrices.real.dtype), vectors.to(matrices.dtype)


def signal_kernels(calib: np.ndarray, kernel: int, threshold: float, single: bool = False) -> np.ndarray:
    """Basis of the patch signal subspace, ``(n, coil, k, k)`` complex128, orthonormal rows.

    With ``A = U Σ Vᴴ`` and patches as rows of ``A``, every patch lies in the span of the rows of
    ``Vᴴ`` with non-negligible ``σ`` (as vectors, the conjugated right singular vectors). ``V`` and
    ``σ²`` come from the eigen-decomposition of the Gram matrix ``AᴴA`` (``C·k²`` square, complex128,
    or complex64 with ``single``), several times faster than an SVD of the tall ``A``.
    """
    a = torch.from_numpy(calib.astype(np.complex64 if single else np.complex128))
    # the Gram matrix's products and the subspace iteration's: every thread helps, also inside a serial block
    # (the small eigen-decompositions in leading_eigenvectors stay on one)
    with all_threads():
        gram = calibration_gram(a, kernel)
        s2, v = leading_eigenvectors(gram, threshold ** 2)
    if s2[0] <= 0:
        raise ValueError("calibration region is all zeros")
    n = int(torch.sum(s2 > threshold ** 2 * s2[0]))
    return v[:, :n].conj().T.resolve_conj().numpy().astype(np.complex128).reshape(n, calib.shape[0], kernel, kernel)


#: :func:`leading_eigenvectors`: the first subspace's width, and the products with the matrix that refine it.
SUBSPACE_WIDTH = 96
SUBSPACE_STEPS = 5


def leading_eigenvectors(gram: torch.Tensor, ratio: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, ``≥ 0``) and eigenvectors (columns) of the Hermitian positive semi-definite
    ``gram`` ``(n, n)``, at least all of those above ``ratio`` × the largest, by randomized subspace iteration
    (Halko, Martinsson & Tropp, SIAM Rev. 53:217, 2011, algorithm 4.4): a seeded random block of
    :data:`SUBSPACE_WIDTH` columns, :data:`SUBSPACE_STEPS` products with ``gram`` (re-orthonormalised each
    time), then the eigen-decomposition of ``gram`` projected onto that subspace. A calibration's spectrum
    falls steeply (20–65 kept of 144–1,152 on the project's scanner data), so a few dozen columns hold
    it at a fraction of a full decomposition's cost; when more than three quarters of the subspace pass
    ``ratio`` it is doubled, and past half of ``n`` the full decomposition runs instead. The products and
    orthonormalisations use the caller's threads, the eigen-decompositions one (:func:`hermitian_eigh`)."""
    n = gram.shape[0]
    width = SUBSPACE_WIDTH
    generator = torch.Generator().manual_seed(0)
    while 2 * width < n:
        basis = torch.randn(n, width, dtype=gram.dtype, generator=generator)
        for _ in range(SUBSPACE_STEPS):
            basis = torch.linalg.qr(gram @ basis).Q
        projected = basis.conj().T @ gram @ basis
        values, vectors = hermitian_eigh(0.5 * (projected + projected.conj().T))
        values, vectors = values.flip(0).clamp_min(0), basis @ vectors.flip(1)
        if int(torch.sum(values > ratio * values[0])) <= 3 * width // 4:
            return values, vectors
        width *= 2
    values, vectors = hermitian_eigh(gram)  # ascending
    return values.flip(0).clamp_min(0), vectors.flip(1)


def averaged_projector_kernel(kernels: np.ndarray) -> np.ndarray:
    """Convolution kernel ``g`` ``(coil, coil, 2k-1, 2k-1)`` of ``(1/k²) Σ_r R_rᴴ P R_r``.

    ``g[c, c', δ] = (1/k²) Σ_n Σ_{d - d' = δ} v_n[c, d] · conj(v_n[c', d'])``, tap ``δ = 0`` at
    index ``k - 1``.
    """
    n, coils, k, _ = kernels.shape
    flat = kernels.reshape(n, coils * k * k)
    proj = torch.from_numpy(flat.T @ flat.conj()).view(coils, k, k, coils, k, k)  # P[c, d, c', d']
    # tap index of δ = d - d' (per axis d - d' + k - 1) for every pair (d, d'), in P's (d0, d1, d0', d1') order
    d = torch.arange(k)
    tap = (d.view(-1, 1) - d.view(1, -1) + k - 1)                                # (d, d') along one axis
    taps = (tap.view(k, 1, k, 1) * (2 * k - 1) + tap.view(1, k, 1, k)).reshape(-1)
    pairs = proj.permute(0, 3, 1, 2, 4, 5).reshape(coils * coils, k ** 4)
    g = torch.zeros(coils * coils, (2 * k - 1) ** 2, dtype=pairs.dtype).index_add_(1, taps, pairs)
    return g.view(coils, coils, 2 * k - 1, 2 * k - 1).numpy() / (k * k)


def image_operator(g: np.ndarray, shape: Tuple[int, int]) -> torch.Tensor:
    """Per-pixel Hermitian matrices ``G(x)`` ``(readout·phase, coil, coil)`` complex64.

    ``G(x) = Σ_δ g[δ] exp(+2πi δ·x / N)`` with ``x`` the centred pixel coordinate (``j - N // 2``) and ``δ``
    the tap offset, per axis: the unnormalised centred inverse DFT of ``g`` zero-padded to ``shape``. The
    ``2k - 1`` taps per axis make it two small matrix products with the DFT's columns at those offsets,
    separable over the axes (several times faster than 2-D FFTs of the padded kernel at every size).
    """
    coils, _, taps, _ = g.shape
    rows, cols = shape
    if rows < taps or cols < taps:
        raise ValueError(f"image {shape} is smaller than the ESPIRiT kernel support {taps}×{taps}")

    def phases(n: int) -> torch.Tensor:  # (n, taps): exp(+2πi δ x / n), in double precision, then single
        x = torch.arange(n, dtype=torch.float64) - n // 2
        offsets = torch.arange(taps, dtype=torch.float64) - taps // 2
        angle = 2 * torch.pi * x[:, None] * offsets[None] / n
        return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)

    kernel = torch.from_numpy(g).to(torch.complex64).reshape(coils * coils * taps, taps)  # (c, c', δr, δc)
    along_cols = (kernel @ phases(cols).T).view(coils * coils, taps, cols)                 # (c c', δr, x_c)
    along_cols = along_cols.permute(1, 2, 0).reshape(taps, cols * coils * coils)         # (δr, x_c c c')
    # pixels first, coil pairs last: (x_r, x_c, c, c') is already (pixel, coil, coil)
    return (phases(rows) @ along_cols).view(rows * cols, coils, coils)


def coarse_size(n: int, step: int, taps: int, max_grid: Optional[int] = None) -> int:
    """Points of the coarse eigenproblem grid along an axis of ``n`` pixels: ``ceil(n / step)``, at most
    ``max_grid`` (when given), at least the kernel support ``taps``, never more than ``n``."""
    size = -(-n // step)
    if max_grid is not None:
        size = min(size, max_grid)
    return min(n, max(size, taps))


def interpolation_matrix(full: int, coarse: int) -> torch.Tensor:
    """``(full, coarse)`` float64 linear interpolation from ``coarse`` samples of a field of view to
    ``full`` ones, both centred as :func:`image_operator` centres them (pixel ``j`` at ``j - n // 2`` in
    units of fov / n); beyond the outermost coarse samples the edge value is held."""
    fine_pos = (torch.arange(full, dtype=torch.float64) - full // 2) / full
    coarse_pos = (torch.arange(coarse, dtype=torch.float64) - coarse // 2) / coarse
    t = ((fine_pos - coarse_pos[0]) * coarse).clamp(0, coarse - 1)
    lo = t.floor().long().clamp(max=coarse - 2) if coarse > 1 else torch.zeros(full, dtype=torch.long)
    frac = t - lo
    w = torch.zeros(full, coarse, dtype=torch.float64)
    w[torch.arange(full), lo] = 1 - frac
    if coarse > 1:
        w[torch.arange(full), lo + 1] += frac
    return w


def interpolate_maps(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ maps @ colsᵀ`` for complex64 maps ``(coil, gh, gw)`` and real float32 interpolation matrices
    ``rows`` ``(h, gh)``, ``cols`` ``(w, gw)`` → complex64 ``(coil, h, w)``, as real products (a real matrix
    acts on the real and imaginary parts alike; half the arithmetic of complex ones): the columns first,
    on the small grid, so that the full-size result is written once, already interleaved."""
    coils, gh, gw = maps.shape
    parts = torch.view_as_real(maps).permute(0, 1, 3, 2)            # (coil, gh, 2, gw)
    wide = (parts @ cols.T).transpose(2, 3).contiguous()             # (coil, gh, w, 2)
    full = rows @ wide.reshape(coils, gh, -1)                        # (coil, h, w·2)
    return torch.view_as_complex(full.view(coils, rows.shape[0], -1, 2))


#: Squarings of the normalised matrix in :func:`top_eigenvectors`: components of eigenvalue ratio λ₂/λ₁ shrink
#: by (λ₂/λ₁)^(2^8), 0.97^256 < 1e-3.
SQUARINGS = 8
#: A pixel whose squared matrix is not yet a projector onto one vector (its squared Frobenius norm, 1 for a
#: rank-one projector of trace 1, below ``1 − EIGEN_MIXTURE``: the second eigenvalue still weighs more than
#: about ``EIGEN_MIXTURE / 2``, as where noise fills the calibration's subspace and the top eigenvalues
#: crowd together), or whose vector leaves ``‖G v − λ v‖`` above :data:`EIGEN_RESIDUAL` (eigenvalues in
#: [0, 1]), is decided by a full eigen-decomposition instead.
EIGEN_MIXTURE = 2e-3
EIGEN_RESIDUAL = 1e-3


#: The squarings in C (``csrc/hermitian_squarings.c``: the upper triangle of each Hermitian product only, eight
#: matrices per vector operation), where it builds (:mod:`gadget.mri.native`; off with
#: ``VARNET_NATIVE_SQUARINGS=0``): several times faster than batched products of such small matrices.
SQUARING_KERNEL = NativeKernel(
    Path(__file__).with_name("csrc") / "hermitian_squarings.c", "hermitian_squarings",
    [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long], ctypes.c_int, "VARNET_NATIVE_SQUARINGS",
    "ESPIRiT's C squarings unavailable (%s): they run as PyTorch's batched products, slower on the CPU", log)


def top_eigenvectors(matrices: torch.Tensor, chunk: int = 16384) -> Tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue ``(n,)`` and its unit eigenvector ``(n, coil)`` of Hermitian positive semi-definite
    ``(n, c, c)`` with eigenvalues in [0, 1] (ESPIRiT's :func:`image_operator`), by repeated squaring: ``G``
    squared :data:`SQUARINGS` times, rescaled by its trace each time, is the projector ``v vᴴ`` onto the top
    eigenvector wherever that eigenvalue stands apart; its largest column, times ``G`` once more, is ``v``.
    Batched products of ``c × c`` matrices cost a fraction of one LAPACK eigen-decomposition per pixel.
    Where it does not stand apart (:data:`EIGEN_MIXTURE`, :data:`EIGEN_RESIDUAL`) :func:`torch.linalg.eigh`
    answers, as it did for every pixel before. ``chunk`` pixels at a time (a full-grid map set has one
    matrix per pixel)."""
    parts = [_top_eigenvectors(matrices[start:start + chunk]) for start in range(0, matrices.shape[0], chunk)]
    return torch.cat([values for values, _ in parts]), torch.cat([vectors for _, vectors in parts])


def _top_eigenvectors(matrices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    g = matrices
    tiny = torch.finfo(g.real.dtype).tiny
    p = g.clone()
    if not _squared_in_c_(p):
        for squaring in range(SQUARINGS + 1):  # rescaled to trace 1 before each product and after the last
            _scale_to_unit_trace_(p, tiny)
            if squaring < SQUARINGS:
                p = torch.bmm(p, p)
    # norms as sums of squares over the interleaved values: several times faster than vector_norm on the
    # short complex columns
    n, c = p.shape[:2]
    purity = torch.view_as_real(p).square().sum(dim=(-3, -2, -1))  # ‖p‖_F², p of trace 1
    column = torch.view_as_real(p).view(n, c * c, 2)[:, ::c + 1, 0].argmax(-1)  # the largest diagonal entry
    v = torch.bmm(g, torch.gather(p, 2, column.view(-1, 1, 1).expand(-1, c, 1)))
    v = v / torch.view_as_real(v).square().sum(dim=(1, 3)).sqrt_().clamp_min_(tiny).view(n, 1, 1)
    gv = torch.bmm(g, v)
    values = (v.conj() * gv).sum(1).real                                    # (n, 1) Rayleigh quotients
    residual = torch.view_as_real(gv - values.unsqueeze(1) * v).square().sum(dim=(1, 2, 3)).sqrt_()
    values, v = values.squeeze(1), v.squeeze(2)
    unsure = ((residual > EIGEN_RESIDUAL) | (purity < 1 - EIGEN_MIXTURE)).nonzero().squeeze(1)
    if unsure.numel():
        m = g[unsure]
        w, vectors = hermitian_eigh(0.5 * (m + m.mH))  # exact Hermitian symmetry for eigh
        values[unsure], v[unsure] = w[:, -1], vectors[:, :, -1]
    return values, v


def _squared_in_c_(p: torch.Tensor) -> bool:
    """:func:`_top_eigenvectors`' squarings of the complex64 ``(n, c, c)`` CPU matrices ``p`` in place by the C
    kernel; False (``p`` untouched) where it does not apply or is not available."""
    if not (p.device.type == "cpu" and p.dtype == torch.complex64 and p.dim() == 3 and p.is_contiguous()
            and not p.requires_grad):
        return False
    run = SQUARING_KERNEL.get()
    return run is not None and run(p.data_ptr(), p.shape[0], p.shape[1], SQUARINGS) == 0


def _scale_to_unit_trace_(p: torch.Tensor, tiny: float) -> None:
    """Divide each of the complex ``(n, c, c)`` matrices by its real trace, in place (a real product on the
    interleaved values: a complex division by a real tensor costs several times more)."""
    trace = torch.diagonal(p, dim1=-2, dim2=-1).real.sum(-1)
    torch.view_as_real(p).mul_(trace.clamp_min(tiny).reciprocal_().view(-1, 1, 1, 1))


@dataclass(frozen=True)
class Calibration:
    """ESPIRiT of one slice before the full grid: ``maps`` complex64 ``(coil, gh, gw)`` (top eigenvectors,
    phase relative to the reference coil, not yet cropped) and ``values`` float32 ``(gh, gw)`` (their
    eigenvalues) on the eigenproblem grid, for a slice of ``shape`` ``(readout, phase)``; the grid is the
    full one when ``config.step`` is 1. Small (a few hundred kB on a capped grid): what a scan keeps per
    slice position (:class:`gadget.recon.refine.PositionCalibrations`). ``signal_share``: the share of the
    calibration matrix's ``C·k²`` dimensions its signal subspace spans (near 1 where noise fills the
    calibration lines: then every vector is an eigenvector of eigenvalue 1 and the maps mean nothing)."""

    maps: torch.Tensor
    values: torch.Tensor
    shape: Tuple[int, int]
    signal_share: float


def espirit_calibration(kspace, num_low: Optional[int] = None, mask=None,
                        config: EspiritConfig = EspiritConfig()) -> Calibration:
    """Steps 1–4 of the module docstring on :func:`espirit_maps`'s arguments, up to the eigenproblem grid."""
    k = kspace.detach().cpu().numpy() if isinstance(kspace, torch.Tensor) else np.asarray(kspace)
    if k.ndim != 3 or not np.iscomplexobj(k):
        raise ValueError(f"kspace must be complex (coil, readout, phase), got {k.dtype} shape {k.shape}")
    coils, rows, cols = k.shape
    if num_low is None:
        sampled = np.asarray(mask, bool) if mask is not None else np.any(k != 0, axis=(0, 1))
        num_low = contiguous_center_lines(sampled)
    if num_low < 2:
        raise ValueError(f"ESPIRiT needs a fully sampled centre block; found {num_low} centre lines")
    weights = noise_weights(k) if config.equalise_noise else None
    if weights is not None:
        k = k * weights[:, None, None].astype(k.real.dtype)
    kernel = calibration_kernel(num_low, config.kernel, config.phase_positions)
    if kernel < config.kernel:
        log.debug("ESPIRiT: %d calibration lines; kernel %d instead of %d", num_low, kernel, config.kernel)
    calib = calibration_region(k, num_low, config.calib_readout, kernel, config.rows_per_column)
    kernels = signal_kernels(calib, kernel, config.threshold, config.single)
    g = averaged_projector_kernel(kernels)
    taps = g.shape[-1]
    grid = (rows, cols) if config.step <= 1 else tuple(coarse_size(n, config.step, taps, config.max_grid)
                                                       for n in (rows, cols))
    values, vectors = top_eigenvectors(image_operator(g, grid))
    maps = vectors.T.reshape(coils, *grid)
    if weights is not None:  # the same direction per pixel, for the coils as measured
        maps = maps / torch.from_numpy(weights).to(maps.real.dtype).view(-1, 1, 1)
        maps = maps / rss(maps, dim=0).clamp_min(torch.finfo(maps.real.dtype).tiny)
    values = values.reshape(grid)
    ref = config.ref_coil
    if ref is None:
        ref = int(torch.argmax((torch.where(values >= config.crop, maps, 0).abs() ** 2).sum(dim=(1, 2))))
    if not 0 <= ref < coils:
        raise ValueError(f"ref_coil must be in [0, {coils}), got {ref}")
    maps = (maps * torch.sgn(maps[ref]).conj()).to(torch.complex64)  # sgn(0) = 0
    return Calibration(maps, values, (rows, cols), kernels.shape[0] / (coils * kernel * kernel))


def noise_weights(kspace: np.ndarray) -> Optional[np.ndarray]:
    """``w_c = 1 / σ_c`` of k-space ``(coil, readout, phase)`` (:func:`gadget.mri.coils.coil_noise_levels`),
    scaled to a geometric mean of 1, float64 ``(coil,)``; None where some coil's level reads 0."""
    levels = coil_noise_levels(kspace)
    if not (levels > 0).all():
        log.debug("ESPIRiT: a coil's noise level reads 0; calibrating on the coils as measured")
        return None
    return np.exp(np.log(levels).mean()) / levels


def calibrated_maps(calibration: Calibration, config: EspiritConfig = EspiritConfig()
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(maps complex64 (coil, readout, phase), eigenvalues float32 (readout, phase))`` on the slice's grid
    from :func:`espirit_calibration`: interpolated from the eigenproblem grid and renormalised, cropped
    where the eigenvalue is below ``config.crop``."""
    maps, values = calibration.maps, calibration.values
    rows, cols = calibration.shape
    if tuple(values.shape) != (rows, cols):  # same field of view sampled coarsely: interpolate, then renormalise
        up = interpolation_matrix(rows, values.shape[0]), interpolation_matrix(cols, values.shape[1])
        values = (up[0] @ values.to(up[0].dtype) @ up[1].T).float()
        kept = values >= config.crop
        # only the readout rows where some pixel is kept: the others are 0 (across the readout oversampling,
        # half the grid), and the interpolation is most of the cost
        lines = kept.any(1).nonzero().squeeze(1)
        full = torch.zeros(maps.shape[0], rows, cols, dtype=maps.dtype)
        if lines.numel():
            part = interpolate_maps(maps, up[0][lines].float(), up[1].float())  # (coil, lines, phase)
            part.mul_(torch.where(kept[lines], rss(part, dim=0).clamp_min(1e-12).reciprocal(), 0.0))
            full[:, lines] = part  # unit norm where kept, 0 where cropped
        maps = full
    else:
        maps = torch.where(values >= config.crop, maps, torch.zeros((), dtype=maps.dtype))
    return maps, values.to(torch.float32)


def espirit_maps(kspace, num_low: Optional[int] = None, mask=None,
                 config: EspiritConfig = EspiritConfig(), return_eigenvalues: bool = False):
    """ESPIRiT maps of one slice.

    Args:
        kspace: complex ``(coil, readout, phase)`` numpy array or tensor (undersampled or full).
        num_low: number of fully sampled centre phase columns; when ``None`` it is measured from
            ``mask`` (bool ``(phase,)``) with :func:`contiguous_center_lines`, or, without a
            mask, from the non-zero columns of ``kspace``.
        config: :class:`EspiritConfig`.
        return_eigenvalues: also return the top eigenvalue map float32 ``(readout, phase)``.

    Returns:
        maps complex64 ``(coil, readout, phase)`` (a torch tensor), optionally with the eigenvalues.
    """
    maps, values = calibrated_maps(espirit_calibration(kspace, num_low, mask, config), config)
    return (maps, values) if return_eigenvalues else maps


# --------------------------------------------------------------------------- fixed maps for the models

FIXED_MAPS_CONFIG = EspiritConfig()
"""ESPIRiT settings of :func:`fixed_maps` (the defaults of :class:`EspiritConfig`, the ones the CG-SENSE
baseline and the safety check's SENSE image use): kernel 6, calibration readout window sized for 4×
as many patches as unknowns, σ threshold 0.02, crop 0.95 (maps 0 outside the object), phase relative
to the coil with the most energy."""


def fixed_maps(kspace, mask=None, num_low=None, config: EspiritConfig = FIXED_MAPS_CONFIG) -> np.ndarray:
    """Fixed coil sensitivities for the ``vnu-k`` / ``vnu`` / ``vn`` model variants: ESPIRiT
    (:func:`espirit_maps`, ``config``) on each slice's fully sampled centre (ACS) block.

    One map set (the eigenvector of eigenvalue ≈ 1, :func:`espirit_maps`): the models' expand /
    reduce operators (seed eqs. 8-9) carry one image per pixel with ``Σ_i |S_i|² = 1`` (seed eq. 3),
    as the original VN's ESPIRiT maps did; a second set (soft-SENSE for a folded field of view) would
    need a second image per pixel. Where the set is cropped the maps are 0.

    Args:
        kspace: complex ``(coil, readout, phase)`` (one slice) or ``(batch, coil, readout, phase)``,
            numpy or torch (undersampled: only the ACS block is read).
        mask: bool ``(phase,)`` shared, or one row per slice ``(batch, phase)`` / ``(batch, 1, 1, phase)``;
            used only when ``num_low`` is None (the contiguous sampled run through the centre column).
        num_low: ACS line count: None, one int, or one per slice.

    Returns:
        complex64 numpy maps, the shape of ``kspace``.

    Raises:
        ValueError: fewer than 2 ACS lines (ESPIRiT needs a calibration block), or maps that are 0
            everywhere (no pixel's eigenvalue reached ``config.crop``), naming the slice.
    """
    k = kspace.detach().cpu().numpy() if isinstance(kspace, torch.Tensor) else np.asarray(kspace)
    if k.ndim not in (3, 4) or not np.iscomplexobj(k):
        raise ValueError("fixed_maps: kspace must be complex (coil, readout, phase) or (batch, coil, readout, "
                         f"phase), got {k.dtype} shape {k.shape}")
    single = k.ndim == 3
    k = k[None] if single else k
    batch, phase = k.shape[0], k.shape[-1]
    masks = None
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        m = m.astype(bool).reshape(-1, phase)
        if m.shape[0] not in (1, batch):
            raise ValueError(f"fixed_maps: mask has {m.shape[0]} rows for {batch} slices")
        masks = np.broadcast_to(m, (batch, phase))
    counts = per_slice_counts(num_low, batch)
    out = np.empty(k.shape, np.complex64)
    for i in range(batch):
        n = counts[i]
        if n is None:
            if masks is None:
                raise ValueError("fixed_maps: give num_low or a mask (the ACS lines are found from the mask)")
            n = contiguous_center_lines(masks[i])
        if n < 2:
            raise ValueError(f"fixed_maps: slice {i}: ESPIRiT needs at least 2 fully sampled centre (ACS) lines to "
                             f"calibrate the fixed sensitivity maps; found {n}")
        maps = espirit_maps(k[i], int(n), config=config).numpy()
        if not np.any(maps):
            raise ValueError(f"fixed_maps: slice {i}: ESPIRiT maps are 0 everywhere (no pixel's eigenvalue reached "
                             f"crop {config.crop}); the {n} ACS lines hold no usable calibration signal")
        out[i] = maps
    return out[0] if single else out


def per_slice_counts(num_low, batch: int) -> list:
    """Calibration-line counts per slice: ``num_low`` as None, one count, or one per slice (sequence or
    tensor) → a list of ``batch`` ints or Nones."""
    if num_low is None or isinstance(num_low, (int, np.integer)):
        return [None if num_low is None else int(num_low)] * batch
    values = num_low.detach().cpu().numpy() if isinstance(num_low, torch.Tensor) else np.asarray(num_low)
    values = values.reshape(-1)
    if values.size == 1:
        return [int(values[0])] * batch
    if values.size != batch:
        raise ValueError(f"num_low has {values.size} entries for {batch} slices")
    return [int(v) for v in values]
