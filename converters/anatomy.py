"""Anatomy sources for the simulator: real head/brain volumes and an analytic phantom.

Every source is an :class:`Anatomy`: a magnitude ``m(p) >= 0`` (dimensionless, about 1 for the
brightest tissue) at points ``p`` given in **object coordinates**: millimetres, RAS axes
(x → patient left-to-Right, y → posterior-to-Anterior, z → inferior-to-Superior), origin at the
centre of the object's bounding box. ``sample(points)`` takes an array ``(..., 3)`` and returns
float32 ``(...)``; outside the volume the magnitude is 0.

Sources:

* ``"mni"`` — the ICBM 2009a symmetric MNI152 template shipped inside the ``nilearn`` wheel
  (files :data:`MNI_FILES` under ``nilearn/datasets/data/``; 197×233×189 voxels, 1 mm,
  skull-stripped), read with nibabel from the package folder (``nilearn`` is never imported).
  Contrast comes from the tissue probability maps: grey matter (GM) and white matter (WM) maps,
  CSF = ``clip(1 - GM - WM, 0, 1)`` inside the brain mask (``T1 > 0``); the magnitude is
  ``Σ fraction × signal`` with the signals of :data:`TISSUE_SIGNAL` (``"t1w"`` or ``"pdw"``).
* ``"colin"`` — Colin27 (``ch2.nii.gz``, one real T1-weighted head with skull and scalp,
  181×217×181, 1 mm) from Debian's ``mricron-data`` package. Its own T1-weighted intensities are
  used, scaled so the 99th percentile inside the head is 1; background outside the head is set to
  0 (so only our simulated noise is present). Only ``"t1w"`` contrast.
* ``"phantom"`` — a 3-D modified Shepp-Logan phantom (analytic, no files; see :func:`shepp_logan`).

Volumes are loaded once per process (cached).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SOURCES = ("mni", "colin", "phantom")
CONTRASTS = ("t1w", "pdw")

#: nilearn version whose wheel carries the template files (the pin in pyproject.toml).
NILEARN_PIN = "0.14.1"
#: Template files inside ``nilearn/datasets/data/``.
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: Where Debian's ``mricron-data`` installs Colin27 (tests may point this elsewhere).
COLIN_PATHS = [Path("/usr/share/mricron/templates/ch2.nii.gz")]
COLIN_DEBIAN_PACKAGE = "mricron-data"

#: Relative signal of each tissue (dimensionless). T1-weighted (spin echo, short TR/TE at 3 T):
#: WM brightest, CSF dark. Proton-density weighted: signal follows water content
#: (WM 0.69, GM 0.80, CSF 1.0 — textbook relative proton densities).
TISSUE_SIGNAL = {
    "t1w": {"gm": 0.62, "wm": 1.0, "csf": 0.18},
    "pdw": {"gm": 0.80, "wm": 0.69, "csf": 1.0},
}

#: Default recon field of view (mm, along the image rows) per source: the object fits with margin.
DEFAULT_FOV_MM = {"mni": 220.0, "colin": 256.0, "phantom": 240.0, "inia": 220.0}  # inia: gadget.converters.tissue


class AnatomyUnavailable(ValueError):
    """The files of an anatomy source are not installed; the message says how to install them."""


@dataclass(frozen=True)
class Anatomy:
    """A magnitude in object coordinates (see module docstring).

    Attributes:
        name: upper-case tag used in file attributes (``"MNI"``, ``"COLIN"``, ``"PHANTOM"``).
        contrast: ``"t1w"`` or ``"pdw"``.
        extent_mm: float ``(3, 2)``: ``[min, max]`` of the object's support along x, y, z (mm).
        central_mm: float ``(3, 2)``: per axis, the 25th and 75th percentiles of the support's
            voxel positions — "the central part" of the object, where slices are taken.
        radius_mm: largest distance of the support from the z axis (mm) — loops of a receive
            array around the z axis placed farther out than this never touch the object.
        default_fov_mm: recon field of view along the image rows that holds the object.
        sampler: ``(N, 3)`` points (mm) → float32 ``(N,)`` magnitudes.
    """

    name: str
    contrast: str
    extent_mm: np.ndarray
    central_mm: np.ndarray
    radius_mm: float
    default_fov_mm: float
    sampler: Callable[[np.ndarray], np.ndarray]

    def sample(self, points_mm: np.ndarray) -> np.ndarray:
        """Magnitude at ``points_mm`` ``(..., 3)`` (object coordinates) → float32 ``(...)``."""
        points_mm = np.asarray(points_mm, dtype=np.float64)
        if points_mm.shape[-1:] != (3,):
            raise ValueError(f"points must have shape (..., 3), got {points_mm.shape}")
        flat = points_mm.reshape(-1, 3)
        return self.sampler(flat).astype(np.float32).reshape(points_mm.shape[:-1])


# ----------------------------------------------------------------------------- public entry


def load_anatomy(source: str, contrast: str = "t1w") -> Anatomy:
    """The anatomy for ``source`` in :data:`SOURCES` with ``contrast`` in :data:`CONTRASTS`.

    Raises ``ValueError`` for an unknown source/contrast, :class:`AnatomyUnavailable` when the
    files are not installed (with the install command in the message).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown anatomy source {source!r}; choose one of {', '.join(SOURCES)}")
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
    if source == "phantom":
        return phantom_anatomy(contrast)
    if source == "colin" and contrast != "t1w":
        raise ValueError(f"contrast {contrast!r} needs tissue maps; source 'colin' has only T1-weighted "
                         "intensities (use --contrast t1w or --source mni)")
    return _load_cached(source, contrast)


@functools.lru_cache(maxsize=4)
def _load_cached(source: str, contrast: str) -> Anatomy:
    if source == "mni":
        volume, affine = mni_magnitude(contrast)
    else:
        volume, affine = colin_magnitude()
    return voxel_anatomy(source.upper(), contrast, volume, affine)


# ----------------------------------------------------------------------------- file locations


def mni_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009 files inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    hint = f"install it with: pip install nilearn=={NILEARN_PIN}"
    if spec is None or not spec.origin:
        raise AnatomyUnavailable(f"the MNI152 template comes with the nilearn package, which is not installed; {hint}")
    data = Path(spec.origin).parent / "datasets" / "data"
    paths = {key: data / name for key, name in MNI_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise AnatomyUnavailable(f"nilearn at {data.parent.parent} lacks {', '.join(missing)}; {hint}")
    return paths


def colin_path() -> Path:
    """Path of Colin27 ``ch2.nii.gz`` from Debian ``mricron-data``."""
    for path in COLIN_PATHS:
        if Path(path).is_file():
            return Path(path)
    raise AnatomyUnavailable(f"Colin27 template ch2.nii.gz not found (looked in "
                             f"{', '.join(str(p) for p in COLIN_PATHS)}); install it with: "
                             f"apt-get install {COLIN_DEBIAN_PACKAGE}")


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data float32 (I, J, K), affine 4×4 voxel → RAS mm)``."""
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=np.float64)


# ----------------------------------------------------------------------------- contrast


def tissue_magnitude(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, contrast: str) -> np.ndarray:
    """Magnitude from tissue fractions: GM/WM probabilities in [0, 1], CSF the rest of the brain mask.

    ``m = f_GM S_GM + f_WM S_WM + f_CSF S_CSF`` with ``S`` from :data:`TISSUE_SIGNAL[contrast]`;
    0 outside ``brain`` (bool). All arrays share one shape; returns float32.
    """
    signal = TISSUE_SIGNAL[contrast]
    gm = np.where(brain, np.clip(gm, 0, 1), 0).astype(np.float32)
    wm = np.where(brain, np.clip(wm, 0, 1), 0).astype(np.float32)
    csf = np.where(brain, np.clip(1 - gm - wm, 0, 1), 0).astype(np.float32)
    return signal["gm"] * gm + signal["wm"] * wm + signal["csf"] * csf


def mni_magnitude(contrast: str) -> tuple[np.ndarray, np.ndarray]:
    """MNI152 2009 magnitude volume (float32, voxel grid of the template) and its affine."""
    paths = mni_paths()
    t1, affine = _read_nifti(paths["t1"])
    gm, _ = _read_nifti(paths["gm"])
    wm, _ = _read_nifti(paths["wm"])
    return tissue_magnitude(gm / 255.0, wm / 255.0, t1 > 0, contrast), affine


def colin_magnitude() -> tuple[np.ndarray, np.ndarray]:
    """Colin27 T1-weighted magnitude: head (largest connected bright region, holes filled, dilated
    by 2 voxels) kept, background set to 0, scaled so the head's 99th percentile is 1."""
    from scipy import ndimage

    data, affine = _read_nifti(colin_path())
    level = np.percentile(data[data > 0], 99)
    head = _largest_component(data > 0.1 * level)
    head = ndimage.binary_dilation(ndimage.binary_fill_holes(head), iterations=2)
    scale = np.percentile(data[head], 99)
    return np.where(head, data / scale, 0).astype(np.float32), affine


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        raise ValueError("anatomy volume has no voxel above the background threshold")
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


# ----------------------------------------------------------------------------- voxel anatomy


def voxel_anatomy(name: str, contrast: str, volume: np.ndarray, affine: np.ndarray) -> Anatomy:
    """Wrap a magnitude volume ``(I, J, K)`` with its voxel → RAS mm ``affine``.

    Object coordinates are RAS mm shifted so the bounding box of the support (magnitude > 2 % of
    the maximum) is centred on the origin; the support also gives ``central_mm`` and ``radius_mm``.
    Sampling is trilinear (``map_coordinates`` order 1).
    """
    from scipy import ndimage

    volume = np.ascontiguousarray(volume, dtype=np.float32)
    support = np.argwhere(volume > 0.02 * float(volume.max()))
    ras = support @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = ras.min(0), ras.max(0)
    centre = (lo + hi) / 2
    radius = float(np.sqrt(((ras[:, :2] - centre[:2]) ** 2).sum(1)).max())
    inverse = np.linalg.inv(affine)
    to_voxel = inverse[:3, :3]
    offset = inverse[:3, :3] @ centre + inverse[:3, 3]

    def sampler(points: np.ndarray) -> np.ndarray:
        coords = to_voxel @ points.T          # (3, N), contiguous as map_coordinates wants
        coords += offset[:, None]
        return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, prefilter=False)

    extent = np.stack([lo - centre, hi - centre], axis=1)
    central = np.percentile(ras - centre, [25, 75], axis=0).T
    return Anatomy(name, contrast, extent, central, radius, DEFAULT_FOV_MM[name.lower()], sampler)


# ----------------------------------------------------------------------------- phantom

# Modified Shepp-Logan (Toft 1996): intensity, semi-axes a (along x), b (along y), centre x0, y0,
# rotation (deg); unit: half the object size.
_ELLIPSES = np.array([
    [1.0, .69, .92, 0, 0, 0], [-.8, .6624, .874, 0, -.0184, 0],
    [-.2, .11, .31, .22, 0, -18], [-.2, .16, .41, -.22, 0, 18],
    [.1, .21, .25, 0, .35, 0], [.1, .046, .046, 0, .1, 0], [.1, .046, .046, 0, -.1, 0],
    [.1, .046, .023, -.08, -.605, 0], [.1, .023, .023, 0, -.606, 0], [.1, .023, .046, .06, -.605, 0],
])
#: Phantom half-size (mm): the outer ellipse spans ±0.69·S (x), ±0.92·S (y), ±S (z).
PHANTOM_HALF_SIZE_MM = 90.0


def shepp_logan(u: np.ndarray, v: np.ndarray, w: np.ndarray | float = 0.0) -> np.ndarray:
    """Modified Shepp-Logan intensity at normalised ``(u, v, w)`` (object within [-1, 1]³).

    The 2-D ellipses shrink by ``sqrt(1 - 0.6 w²)`` as ``|w|`` grows, like slices of ellipsoids
    moving off centre; 0 for ``|w| > 1``. Arrays broadcast; returns float64.
    """
    u, v, w = np.broadcast_arrays(np.asarray(u, float), np.asarray(v, float), np.asarray(w, float))
    scale = np.sqrt(np.maximum(1.0 - 0.6 * w * w, 0.05))
    out = np.zeros(u.shape)
    for amp, a, b, x0, y0, deg in _ELLIPSES:
        t = np.deg2rad(deg)
        du, dv = u - x0 * scale, v - y0 * scale
        ru = (du * np.cos(t) + dv * np.sin(t)) / (a * scale)
        rv = (-du * np.sin(t) + dv * np.cos(t)) / (b * scale)
        out += amp * (ru * ru + rv * rv <= 1.0)
    return np.where(np.abs(w) <= 1.0, out, 0.0)


def phantom_anatomy(contrast: str = "t1w") -> Anatomy:
    """The 3-D Shepp-Logan phantom of half-size :data:`PHANTOM_HALF_SIZE_MM` (``contrast`` only labels it)."""
    s = PHANTOM_HALF_SIZE_MM

    def sampler(points: np.ndarray) -> np.ndarray:
        return shepp_logan(points[:, 0] / s, points[:, 1] / s, points[:, 2] / s)

    extent = np.array([[-0.69 * s, 0.69 * s], [-0.92 * s, 0.92 * s], [-s, s]])
    return Anatomy("PHANTOM", contrast, extent, 0.5 * extent, 0.92 * s, DEFAULT_FOV_MM["phantom"], sampler)
