"""Slice geometry of the simulated scan: orientations, subject pose, slice planes and pixel grids.

Two frames, both in millimetres with RAS axes (x → Right, y → Anterior, z → Superior):

* **scanner** coordinates: B0 along +z; the receive array sits on a cylinder around the z axis;
  slices are planes in this frame.
* **object** coordinates (see :mod:`gadget.converters.anatomy`): the anatomy's own frame. A
  :class:`Pose` maps one to the other — the subject is scaled, turned about the slice normal and
  shifted in the slice plane, which varies the anatomy between simulated volumes.

Image layout (radiological, as scanners display it): rows run along the readout direction,
columns along the phase-encode direction; :data:`ORIENTATIONS` gives, per orientation, the unit
vectors of increasing row index, increasing column index, and the slice normal:

* axial: rows anterior → posterior, columns right → left, normal +z;
* coronal: rows superior → inferior, columns right → left, normal +y;
* sagittal: rows superior → inferior, columns anterior → posterior, normal +x.

Pixel ``k`` of an axis of ``n`` pixels with spacing ``d`` sits at ``(k - n // 2) · d`` from the
plane centre — the centre convention of the centred FFT (DC at index ``n // 2``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_X, _Y, _Z = np.eye(3)
#: orientation → (row direction, column direction, slice normal), unit vectors in scanner RAS.
ORIENTATIONS = {
    "axial": (-_Y, -_X, _Z),
    "coronal": (-_Z, -_X, _Y),
    "sagittal": (-_Z, -_Y, _X),
}
#: index of the RAS axis each orientation's normal lies on.
NORMAL_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


def check_orientation(orientation: str) -> str:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; choose one of {', '.join(ORIENTATIONS)}")
    return orientation


def rotation_about(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """3×3 rotation by ``angle_rad`` (right-handed) about the unit vector ``axis`` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * cross + (1 - np.cos(angle_rad)) * cross @ cross


@dataclass(frozen=True)
class Pose:
    """Subject placement: ``p_scanner = scale · R(angle about normal) · q_object + shift``.

    ``shift_mm`` (3,) lies in the slice plane; ``normal`` is the slice normal (unit, scanner RAS).
    """

    scale: float = 1.0
    angle_rad: float = 0.0
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    normal: tuple[float, float, float] = (0.0, 0.0, 1.0)

    @property
    def rotation(self) -> np.ndarray:
        return rotation_about(np.asarray(self.normal), self.angle_rad)

    def to_object(self, points_mm: np.ndarray) -> np.ndarray:
        """Scanner points ``(..., 3)`` → object coordinates ``(..., 3)``."""
        # q = R^T (p - t) / s; for row vectors: (p - t) @ R / s
        return (np.asarray(points_mm) - np.asarray(self.shift_mm)) @ self.rotation / self.scale

    def radius_bound_mm(self, anatomy_radius_mm: float, anatomy_extent_mm: np.ndarray) -> float:
        """An upper bound of the placed object's distance from the scanner z axis (mm)."""
        tilt = 0.0 if abs(self.normal[2]) > 0.999 else abs(np.sin(self.angle_rad)) * np.abs(anatomy_extent_mm[2]).max()
        return self.scale * (anatomy_radius_mm + tilt) + float(np.hypot(*self.shift_mm[:2]))


def random_pose(rng: np.random.Generator, orientation: str, max_angle_deg: float = 8.0,
                scale_range: tuple[float, float] = (0.93, 1.07), max_shift_mm: float = 4.0) -> Pose:
    """A pose drawn uniformly: angle in ±``max_angle_deg``, scale in ``scale_range``, in-plane shift
    of each in-plane component in ±``max_shift_mm``."""
    rows, cols, normal = ORIENTATIONS[check_orientation(orientation)]
    scale = rng.uniform(*scale_range)
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    du, dv = rng.uniform(-max_shift_mm, max_shift_mm, size=2)
    return Pose(float(scale), float(angle), tuple(du * rows + dv * cols), tuple(normal))


@dataclass(frozen=True)
class SlicePlane:
    """A slice: centre (scanner mm) plus the row, column and normal unit vectors."""

    centre_mm: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    normal: tuple[float, float, float]

    def grid(self, shape: tuple[int, int], spacing_mm: tuple[float, float]) -> np.ndarray:
        """Scanner coordinates ``(rows, cols, 3)`` of the pixel centres of a ``shape`` grid."""
        return self.points(axis_positions(shape[0], spacing_mm[0]), axis_positions(shape[1], spacing_mm[1]))

    def points(self, row_mm: np.ndarray, col_mm: np.ndarray) -> np.ndarray:
        """Scanner coordinates ``(len(row_mm), len(col_mm), 3)`` at in-plane offsets (mm)."""
        r = np.asarray(row_mm, float)[:, None, None] * np.asarray(self.row_dir)
        c = np.asarray(col_mm, float)[None, :, None] * np.asarray(self.col_dir)
        return r + c + np.asarray(self.centre_mm)


def axis_positions(n: int, spacing_mm: float) -> np.ndarray:
    """Offsets (mm) of ``n`` pixel centres: ``(k - n // 2) · spacing``."""
    return (np.arange(n) - n // 2) * float(spacing_mm)


def slice_planes(orientation: str, positions_mm: np.ndarray) -> list[SlicePlane]:
    """Planes of ``orientation`` at scanner ``positions_mm`` along the slice normal."""
    rows, cols, normal = ORIENTATIONS[check_orientation(orientation)]
    return [SlicePlane(tuple(float(p) * normal), tuple(rows), tuple(cols), tuple(normal)) for p in positions_mm]


def central_slice_positions(central_mm, num_slices: int, rng: np.random.Generator | None = None,
                            max_spacing_mm: float = 5.0) -> tuple[np.ndarray, float]:
    """Slice positions (object mm along the normal) inside the central range ``[lo, hi]``.

    The slab of ``num_slices`` slices with spacing ``min(max_spacing_mm, (hi - lo) / (num_slices - 1))``
    lies inside ``[lo, hi]``; its centre is drawn uniformly where it still fits (the middle when
    ``rng`` is None). Returns ``(positions (num_slices,), spacing_mm)``.
    """
    if num_slices < 1:
        raise ValueError(f"number of slices must be >= 1, got {num_slices}")
    lo, hi = float(central_mm[0]), float(central_mm[1])
    if not hi > lo:
        raise ValueError(f"central range must have hi > lo, got [{lo}, {hi}]")
    spacing = max_spacing_mm if num_slices == 1 else min(max_spacing_mm, (hi - lo) / (num_slices - 1))
    room = max(hi - lo - spacing * (num_slices - 1), 0.0) / 2
    centre = (lo + hi) / 2 + (rng.uniform(-room, room) if rng is not None else 0.0)
    return centre + (np.arange(num_slices) - (num_slices - 1) / 2) * spacing, float(spacing)
