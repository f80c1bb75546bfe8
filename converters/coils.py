"""Receive coil array: circular loops on a cylinder, Biot–Savart sensitivities, noise covariance.

Frame: scanner coordinates (mm, RAS; B0 along +z — see :mod:`gadget.converters.geometry`).

Geometry (:func:`loop_array`): ``C`` flat loops tangent to a cylinder of radius ``R`` around the
z axis, in ``ceil(C / 8)`` rings spread along z (every other ring turned by half a loop
spacing), each loop's normal pointing at the axis. Loops are ellipses: half-width ``a`` (around
the cylinder) half the arc between neighbours, at most 60 mm; half-height ``b`` (along z)
stretched so the rings, 1.8 ``b`` apart, cover the object's length (as the elongated elements of
head arrays do), between ``a`` and 120 mm. Every wire point is at least ``R`` from the axis, so
with ``R`` larger than the object's radius the wires never enter the object.

Sensitivity (:func:`biot_savart`, :func:`receive_sensitivities`): the field of a unit current in
loop ``c``, ``B(r) = Σ_segments dl × (r - r') / (|r - r'|² + ε²)^{3/2}`` (μ0 I / 4π dropped;
each loop cut into straight segments, evaluated at segment midpoints; ``ε`` a 1 mm wire radius
that keeps the field finite on the wire itself). The receive sensitivity is the
counter-rotating transverse component ``s_c = B_x - i B_y`` (Hoult's reciprocity, B1⁻; the
conjugate would only mirror the phase convention), times a random receiver phase per coil,
normalised so the root-sum-of-squares over coils is 1 at the isocentre.

Evaluating Biot–Savart at every fine-grid pixel is needlessly slow: maps are computed on a
coarse grid (about 4 mm) over the plane and brought to the fine grid with separable cubic
(Keys) interpolation (:func:`cubic_interpolation_matrix`) — the field is smooth there.

Noise (:func:`noise_covariance`): body noise is correlated where coil sensitivities overlap;
``Ψ = β · corr(S Sᴴ) + (1 - β) · I`` (``S`` the maps over the object), then per-coil gains in
[0.85, 1.15], scaled to unit mean diagonal. Hermitian positive definite for ``β < 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_COILS, MAX_COILS = 4, 32
COILS_PER_RING = 8
WIRE_RADIUS_MM = 1.0


def check_num_coils(num_coils: int) -> int:
    if isinstance(num_coils, bool) or not isinstance(num_coils, (int, np.integer)) or \
            not MIN_COILS <= num_coils <= MAX_COILS:
        raise ValueError(f"number of coils must be an integer in [{MIN_COILS}, {MAX_COILS}], got {num_coils!r}")
    return int(num_coils)


@dataclass(frozen=True)
class CoilArray:
    """Loops as polygons: ``vertices`` float ``(coil, segments + 1, 3)`` mm, closed (last = first)."""

    vertices: np.ndarray
    cylinder_radius_mm: float
    loop_width_mm: float      # half-width a (around the cylinder)
    loop_height_mm: float     # half-height b (along z)

    @property
    def num_coils(self) -> int:
        return int(self.vertices.shape[0])


def ring_sizes(num_coils: int) -> list[int]:
    """Coils per ring: ``ceil(C / 8)`` rings, sizes as equal as possible (larger rings first)."""
    rings = math.ceil(num_coils / COILS_PER_RING)
    base, extra = divmod(num_coils, rings)
    return [base + (i < extra) for i in range(rings)]


def loop_array(num_coils: int, cylinder_radius_mm: float, length_mm: float = 0.0, segments: int = 48,
               max_loop_width_mm: float = 60.0, max_loop_height_mm: float = 120.0) -> CoilArray:
    """Loops on a cylinder centred on z = 0, covering ``length_mm`` along z (see module docstring)."""
    check_num_coils(num_coils)
    if not cylinder_radius_mm > 0:
        raise ValueError(f"cylinder radius must be > 0 mm, got {cylinder_radius_mm}")
    sizes = ring_sizes(num_coils)
    a = min(0.5 * 2 * np.pi * cylinder_radius_mm / max(sizes), max_loop_width_mm)
    b = float(np.clip(length_mm / (1.8 * len(sizes)), a, max(a, max_loop_height_mm)))
    t = np.linspace(0, 2 * np.pi, segments + 1)
    axial = np.array([0.0, 0.0, 1.0])
    loops = []
    for ring, count in enumerate(sizes):
        z = (ring - (len(sizes) - 1) / 2) * 1.8 * b
        for k in range(count):
            phi = 2 * np.pi * (k + 0.5 * (ring % 2)) / count
            radial = np.array([np.cos(phi), np.sin(phi), 0.0])
            tangent = np.array([-np.sin(phi), np.cos(phi), 0.0])
            centre = cylinder_radius_mm * radial + z * axial
            loops.append(centre + a * np.cos(t)[:, None] * tangent + b * np.sin(t)[:, None] * axial)
    return CoilArray(np.stack(loops), float(cylinder_radius_mm), float(a), b)


def biot_savart(vertices: np.ndarray, points_mm: np.ndarray, wire_radius_mm: float = WIRE_RADIUS_MM) -> np.ndarray:
    """Field of a unit current around one closed polygon ``vertices (M + 1, 3)`` at ``points (N, 3)``.

    Returns float ``(N, 3)`` in units of μ0 I / 4π per mm. Uses
    ``Σ w_m dl_m × (p - m_m) = (Σ w_m dl_m) × p - Σ w_m (dl_m × m_m)`` with
    ``w_m = (|p - m_m|² + ε²)^{-3/2}``, so the work is two ``(N, M) @ (M, 3)`` products.
    """
    dl = np.diff(vertices, axis=0)                       # (M, 3)
    mid = 0.5 * (vertices[1:] + vertices[:-1])           # (M, 3)
    points_mm = np.asarray(points_mm, float)
    d2 = (points_mm ** 2).sum(1)[:, None] + (mid ** 2).sum(1)[None] - 2 * points_mm @ mid.T
    d2 = np.maximum(d2, 0) + wire_radius_mm ** 2
    w = 1.0 / (d2 * np.sqrt(d2))                          # (N, M)
    return np.cross(w @ dl, points_mm) - w @ np.cross(dl, mid)


def receive_sensitivities(array: CoilArray, points_mm: np.ndarray, coil_phase: np.ndarray | None = None) -> np.ndarray:
    """Sensitivities ``B_x - i B_y`` of every loop at ``points (..., 3)`` → complex128 ``(coil, ...)``.

    Normalised so the root-sum-of-squares over coils is 1 at the isocentre; ``coil_phase``
    (radians, ``(coil,)``) multiplies coil ``c`` by ``exp(i coil_phase[c])``.
    """
    points_mm = np.asarray(points_mm, float)
    flat = np.concatenate([points_mm.reshape(-1, 3), np.zeros((1, 3))])
    maps = []
    for loop in array.vertices:
        b = biot_savart(loop, flat)
        maps.append(b[:, 0] - 1j * b[:, 1])
    maps = np.stack(maps)                                 # (coil, N + 1), last = isocentre
    maps = maps[:, :-1] / np.sqrt((np.abs(maps[:, -1]) ** 2).sum())
    if coil_phase is not None:
        maps = maps * np.exp(1j * np.asarray(coil_phase))[:, None]
    return maps.reshape((array.num_coils,) + points_mm.shape[:-1])


def cubic_interpolation_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Keys cubic convolution (a = -1/2) from samples at uniformly spaced ``src`` positions to
    ``dst`` positions (clipped into the ``src`` range): float32 ``(len(dst), len(src))``. Beyond
    the ends Keys' boundary rule ``f(-1) = 3 f(0) - 3 f(1) + f(2)`` keeps third-order accuracy."""
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    n = src.size
    if n < 3:
        raise ValueError(f"need at least 3 source samples, got {n}")
    t = np.clip((dst - src[0]) / (src[1] - src[0]), 0, n - 1)
    base = np.floor(t).astype(int)
    out = np.zeros((dst.size, n))
    rows = np.arange(dst.size)
    for offset in (-1, 0, 1, 2):
        idx = base + offset
        weight = _keys(t - idx)
        inside = (idx >= 0) & (idx < n)
        np.add.at(out, (rows[inside], idx[inside]), weight[inside])
        for ghost, (i0, i1, i2) in ((-1, (0, 1, 2)), (n, (n - 1, n - 2, n - 3))):
            hit = idx == ghost
            for col, factor in ((i0, 3.0), (i1, -3.0), (i2, 1.0)):
                np.add.at(out, (rows[hit], np.full(hit.sum(), col)), factor * weight[hit])
    return out.astype(np.float32)


def _keys(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def coarse_axis(fine_positions: np.ndarray, step_mm: float = 4.0, minimum: int = 8) -> np.ndarray:
    """Uniform coarse positions spanning ``fine_positions`` end to end, spacing about ``step_mm``."""
    lo, hi = float(fine_positions[0]), float(fine_positions[-1])
    n = max(minimum, int(np.ceil((hi - lo) / step_mm)) + 1)
    return np.linspace(lo, hi, n)


def upsample_maps(coarse: np.ndarray, row_matrix: np.ndarray, col_matrix: np.ndarray) -> np.ndarray:
    """``(coil, r, c)`` coarse maps → ``(coil, R, C)`` complex64 via ``A_r · M · A_cᵀ``."""
    coils, r, c = coarse.shape
    coarse = coarse.astype(np.complex64)
    a_r = row_matrix.astype(np.complex64)
    a_c = col_matrix.astype(np.complex64)
    tmp = (a_r @ coarse.transpose(1, 0, 2).reshape(r, coils * c))            # (R, coil·c)
    tmp = tmp.reshape(-1, coils, c).transpose(1, 0, 2).reshape(-1, c)       # (coil·R, c)
    return (tmp @ a_c.T).reshape(coils, -1, col_matrix.shape[0])


def noise_covariance(sensitivities: np.ndarray, rng: np.random.Generator, body_fraction: float = 0.5,
                     gain_range: tuple[float, float] = (0.85, 1.15)) -> np.ndarray:
    """Coil noise covariance from sensitivity overlap (see module docstring).

    ``sensitivities``: complex ``(coil, N)`` over object points. Returns complex128 ``(coil, coil)``,
    Hermitian positive definite, mean diagonal 1.
    """
    if not 0 <= body_fraction < 1:
        raise ValueError(f"body_fraction must be in [0, 1), got {body_fraction}")
    s = np.asarray(sensitivities).reshape(sensitivities.shape[0], -1)
    gram = s @ s.conj().T / s.shape[1]
    d = np.sqrt(np.real(np.diag(gram)))
    corr = gram / np.outer(d, d)
    cov = body_fraction * corr + (1 - body_fraction) * np.eye(len(d))
    gains = rng.uniform(*gain_range, size=len(d))
    cov = cov * np.outer(gains, gains)
    cov = 0.5 * (cov + cov.conj().T)
    return cov / np.mean(np.real(np.diag(cov)))


def head_array(num_coils: int, semi_axes_mm: tuple[float, float], length_mm: float, rng: np.random.Generator,
               segments: int = 32) -> CoilArray:
    """A receive array hugging a head: ``num_coils`` flat elliptic loops tangent to an elliptic
    cylinder of semi-axes ``semi_axes_mm`` (x, y) around the z axis, normals pointing at the axis.

    Layout drawn from ``rng`` (varied like commercial head arrays): 6–12 loops per ring (so 1–5
    rings), each ring turned by a random azimuth, every loop's azimuth jittered by up to 20 % of the
    spacing; loops as wide as the arc between neighbours (slight overlap, at most 70 mm) and tall
    enough that the rings cover ``length_mm`` along z. Wires stay on or outside the cylinder.
    """
    check_num_coils(num_coils)
    ax, ay = (float(v) for v in semi_axes_mm)
    if not (ax > 0 and ay > 0):
        raise ValueError(f"semi-axes must be > 0 mm, got {semi_axes_mm}")
    per_ring = int(rng.integers(6, 13))
    rings = max(1, math.ceil(num_coils / per_ring))
    base, extra = divmod(num_coils, rings)
    sizes = [base + (i < extra) for i in range(rings)]
    perimeter = np.pi * (3 * (ax + ay) - np.sqrt((3 * ax + ay) * (ax + 3 * ay)))  # Ramanujan
    height = float(np.clip(max(length_mm, 60.0) / (1.7 * rings), 25.0, 120.0))
    t = np.linspace(0, 2 * np.pi, segments + 1)
    axial = np.array([0.0, 0.0, 1.0])
    loops = []
    for ring, count in enumerate(sizes):
        z = (ring - (rings - 1) / 2) * 1.7 * height
        width = min(0.55 * perimeter / count, 70.0)
        offset = rng.uniform(0, 2 * np.pi)
        for k in range(count):
            phi = offset + 2 * np.pi * (k + rng.uniform(-0.2, 0.2)) / count
            centre = np.array([ax * np.cos(phi), ay * np.sin(phi), z])
            tangent = np.array([-ax * np.sin(phi), ay * np.cos(phi), 0.0])
            tangent /= np.linalg.norm(tangent)
            loops.append(centre + width * np.cos(t)[:, None] * tangent + height * np.sin(t)[:, None] * axial)
    return CoilArray(np.stack(loops), float(min(ax, ay)), float(width), height)
