"""Whole heads as tissue-class fraction volumes, and random contrasts over them.

A :class:`TissueVolume` holds, on one voxel grid, the fraction ``f_k(v) ∈ [0, 1]`` of every class
``k`` of :data:`CLASSES` (``Σ_k f_k ≤ 1``; the rest is air). A contrast is one signal value per
class; the magnitude is ``m(v) = Σ_k f_k(v) s_k`` (partial volume comes for free from fractions).

Sources (each its own function; facts about the files in :mod:`gadget.converters.anatomy`):

* :func:`mni_tissues` — the skull-stripped MNI152 2009 template: GM/WM probability maps, CSF the
  rest of the brain mask; everything outside the brain is *derived* (:func:`head_layers`).
* :func:`colin_tissues` — Colin27, a real head: brain classes from the brain-extracted
  ``ch2bet.nii.gz`` by intensity, and outside the brain the real scalp, fat, muscle, skull and eyes
  of ``ch2.nii.gz`` split into dark (bone, air, fluid of the eyes on T1w), intermediate (muscle,
  skin) and bright (fat, marrow) classes by intensity (:func:`intensity_memberships`).
* :func:`inia_tissues` — INIA19, a rhesus macaque brain template (``inia19-t1-brain.nii.gz``,
  0.5 mm, Debian ``mricron-data``), scaled to human size; brain classes by intensity, head
  derived. Anatomy no human template has: kept for held-out evaluation.

Derived head (:func:`head_layers`), outward from the brain surface, each layer's thickness drawn
per volume and modulated smoothly around the head (textbook adult ranges, mm): CSF/dura 1–3,
inner table of the skull 1–2.5, diploë (fatty marrow) 1.5–4, outer table 1–2.5, muscle/galea
0.5–3, subcutaneous fat 2–6, skin 1–2.5. Edges are 1 mm linear ramps (partial volume).

Contrasts (:data:`CONTRAST_SIGNALS`, :func:`random_signals`): typical relative signals of T1w,
T2w, PD-weighted and FLAIR scans at 1.5–3 T (fat bright on T1w and on fast-spin-echo T2w, CSF
dark on T1w and FLAIR, cortical bone dark everywhere), each value jittered per volume; with
probability ``p_random`` every class gets a uniform random value instead (domain randomisation).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .anatomy import AnatomyUnavailable, _largest_component, _read_nifti, colin_path, mni_paths

#: Tissue classes, in a fixed order (the first axis of :attr:`TissueVolume.fractions`).
CLASSES = ("gm", "wm", "csf", "bone", "marrow", "muscle", "fat", "skin")
BRAIN_CLASSES = ("gm", "wm", "csf")
CONTRASTS = ("t1w", "t2w", "pdw", "flair")

#: Relative signal per class and contrast (dimensionless, brightest tissue about 1).
CONTRAST_SIGNALS = {
    #        gm    wm    csf   bone  marrow muscle fat   skin
    "t1w":   (0.62, 0.85, 0.15, 0.03, 0.80, 0.45, 1.00, 0.55),
    "t2w":   (0.55, 0.40, 1.00, 0.03, 0.55, 0.25, 0.75, 0.45),
    "pdw":   (0.85, 0.70, 0.95, 0.05, 0.80, 0.55, 1.00, 0.70),
    "flair": (0.80, 0.55, 0.06, 0.03, 0.55, 0.30, 0.70, 0.45),
}

#: Layer order and thickness ranges (mm) of :func:`head_layers`.
LAYERS = (("csf", (1.0, 3.0)), ("bone", (1.0, 2.5)), ("marrow", (1.5, 4.0)), ("bone", (1.0, 2.5)),
          ("muscle", (0.5, 3.0)), ("fat", (2.0, 6.0)), ("skin", (1.0, 2.5)))
#: Room (mm) kept around a brain so the derived head fits in the grid.
LAYER_MARGIN_MM = 28.0

INIA_FILE = "inia19-t1-brain.nii.gz"
#: Macaque → human size (brain volume ≈ 90 vs ≈ 1200 cm³, a linear ratio of about 2.3).
INIA_SCALE = 2.2


@dataclass(frozen=True)
class TissueVolume:
    """``fractions`` float32 ``(class, I, J, K)`` in the order of :data:`CLASSES`; ``affine``
    4×4 voxel → RAS mm; ``name`` an upper-case tag (``"MNI"``, ``"COLIN"``, ``"INIA"``)."""

    name: str
    fractions: np.ndarray
    affine: np.ndarray

    def magnitude(self, signals) -> np.ndarray:
        """``Σ_k f_k s_k`` → float32 ``(I, J, K)`` for ``signals`` ``(class,)``."""
        s = np.asarray(signals, np.float32)
        if s.shape != (len(CLASSES),):
            raise ValueError(f"signals must have one value per class {CLASSES}, got shape {s.shape}")
        return np.tensordot(s, self.fractions, axes=1).astype(np.float32)


# ----------------------------------------------------------------------------- contrasts


def random_signals(rng: np.random.Generator, contrast: Optional[str] = None, jitter: float = 0.25,
                   p_random: float = 0.15) -> tuple[str, np.ndarray]:
    """``(contrast name, signals (class,))``: a contrast of :data:`CONTRASTS` (drawn when None),
    each class value times ``U(1 - jitter, 1 + jitter)``; with probability ``p_random`` all values
    ``U(0.03, 1)`` instead (name ``"random"``). Scaled so the largest value is 1."""
    if contrast is not None and contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
    if contrast is None and rng.uniform() < p_random:
        values, name = rng.uniform(0.03, 1.0, len(CLASSES)), "random"
    else:
        name = contrast or CONTRASTS[int(rng.integers(len(CONTRASTS)))]
        values = np.array(CONTRAST_SIGNALS[name]) * rng.uniform(1 - jitter, 1 + jitter, len(CLASSES))
    return name, (values / values.max()).astype(np.float32)


def brain_only_signals(signals: np.ndarray) -> np.ndarray:
    """``signals`` with every class outside :data:`BRAIN_CLASSES` set to 0: a skull-stripped image,
    as many public brain datasets are (empty background around the brain)."""
    keep = np.array([c in BRAIN_CLASSES for c in CLASSES])
    return np.where(keep, np.asarray(signals), 0).astype(np.float32)


# ----------------------------------------------------------------------------- memberships


def intensity_memberships(values: np.ndarray, centres) -> np.ndarray:
    """Soft classes by intensity: piecewise-linear "tent" memberships around sorted ``centres``
    (the first and last saturate outward); rows sum to 1. ``values`` ``(...)`` → ``(len(centres), ...)``."""
    c = np.sort(np.asarray(centres, float))
    v = np.asarray(values, float)
    out = np.zeros((len(c),) + v.shape, np.float32)
    for k in range(len(c)):
        up = np.ones_like(v) if k == 0 else np.clip((v - c[k - 1]) / (c[k] - c[k - 1]), 0, 1)
        down = np.ones_like(v) if k == len(c) - 1 else np.clip((c[k + 1] - v) / (c[k + 1] - c[k]), 0, 1)
        out[k] = np.minimum(up, down)
    return out


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> np.ndarray:
    """Sorted cluster centres of 1-D ``values`` (Lloyd's algorithm from quantile starts)."""
    v = np.asarray(values, float).ravel()
    centres = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        label = np.argmin(np.abs(v[:, None] - centres[None]), axis=1)
        centres = np.array([v[label == j].mean() if np.any(label == j) else centres[j] for j in range(k)])
    return np.sort(centres)


# ----------------------------------------------------------------------------- derived head


def smooth_field(shape, voxel_mm: float, rng: np.random.Generator, terms: int = 4,
                 period_mm: float = 120.0) -> np.ndarray:
    """A smooth random field over a grid, values roughly in [-1, 1]: the sum of ``terms`` random
    3-D cosines with periods about ``period_mm``, divided by ``sqrt(terms)`` → float32 ``shape``."""
    axes = [np.arange(n, dtype=np.float32) * voxel_mm for n in shape]
    out = np.zeros(shape, np.float32)
    for _ in range(terms):
        f = rng.normal(0, 1 / period_mm, 3)
        ph = rng.uniform(0, 2 * np.pi)
        a, b, c = (np.float32(2 * np.pi * f[i]) * axes[i] for i in range(3))
        out += np.cos(a[:, None, None] + b[None, :, None] + c[None, None, :] + np.float32(ph))
    return out / np.float32(np.sqrt(terms))


def distance_outside(brain: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Distance (mm) of every voxel outside the ``brain`` mask to the mask (0 inside) → float32."""
    from scipy import ndimage

    return (ndimage.distance_transform_edt(~brain) * voxel_mm).astype(np.float32)


def head_layers(distance_mm: np.ndarray, rng: np.random.Generator, modulation: Optional[np.ndarray] = None,
                ramp_mm: float = 1.0) -> dict[str, np.ndarray]:
    """Fractions of the derived head layers (:data:`LAYERS`) from ``distance_mm`` outside the brain.

    Thicknesses are drawn uniformly in their ranges; ``modulation`` (same shape, about [-1, 1])
    scales every thickness by ``1 + 0.3 · modulation`` (thicker and thinner places around the
    head). With ``B_k(d) = clip((b_k - d) / ramp + 1/2, 0, 1)`` (1 well inside the outer boundary
    ``b_k`` of layer ``k``), layer ``k`` has fraction ``B_k - B_{k-1}`` (``B_{-1} = 0``): fractions
    sum to ``B_last`` ≤ 1, air beyond. Returns class name → float32 (both skull tables in
    ``"bone"``); 0 inside the brain (``distance_mm <= 0``).
    """
    scale = 1.0 if modulation is None else 1.0 + 0.3 * np.clip(modulation, -1, 1)
    d = np.asarray(distance_mm, np.float32) / np.asarray(scale, np.float32)
    outside = distance_mm > 0
    out: dict[str, np.ndarray] = {}
    edge, below_previous = 0.0, np.zeros_like(d)
    for name, (lo, hi) in LAYERS:
        edge += rng.uniform(lo, hi)
        below = np.clip((np.float32(edge) - d) / np.float32(ramp_mm) + np.float32(0.5), 0, 1)
        out[name] = out.get(name, 0) + np.where(outside, below - below_previous, 0).astype(np.float32)
        below_previous = below
    return out


# ----------------------------------------------------------------------------- sources


def _pad(volume: np.ndarray, affine: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    padded = np.pad(volume, pad)
    shifted = affine.copy()
    shifted[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    return padded, shifted


@functools.lru_cache(maxsize=2)
def _mni_brain() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    paths = mni_paths()
    t1, affine = _read_nifti(paths["t1"])
    gm, _ = _read_nifti(paths["gm"])
    wm, _ = _read_nifti(paths["wm"])
    brain = t1 > 0
    gm = np.where(brain, np.clip(gm / 255.0, 0, 1), 0).astype(np.float32)
    wm = np.where(brain, np.clip(wm / 255.0, 0, 1), 0).astype(np.float32)
    pad = int(np.ceil(LAYER_MARGIN_MM))
    (gm, _), (wm, _), (brain, affine) = _pad(gm, affine, pad), _pad(wm, affine, pad), _pad(brain, affine, pad)
    return gm, wm, brain, affine


@functools.lru_cache(maxsize=3)
def _brain_distance(name: str) -> np.ndarray:
    brain = {"mni": lambda: _mni_brain()[2], "inia": lambda: _inia_brain()[1]}[name]()
    return distance_outside(brain, 1.0)


def mni_tissues(rng: np.random.Generator) -> TissueVolume:
    """MNI152 2009 brain + a derived head with per-volume layer thicknesses (see module doc)."""
    gm, wm, brain, affine = _mni_brain()
    csf = np.where(brain, np.clip(1 - gm - wm, 0, 1), 0).astype(np.float32)
    return _with_layers("MNI", {"gm": gm, "wm": wm, "csf": csf}, _brain_distance("mni"), affine, rng)


def _with_layers(name: str, brain_classes: dict, distance: np.ndarray, affine: np.ndarray,
                 rng: np.random.Generator) -> TissueVolume:
    layers = head_layers(distance, rng, smooth_field(distance.shape, 1.0, rng))
    fractions = np.zeros((len(CLASSES),) + distance.shape, np.float32)
    for k, cls in enumerate(CLASSES):
        if cls in brain_classes:
            fractions[k] += brain_classes[cls]
        if cls in layers:
            fractions[k] += layers[cls]
    return TissueVolume(name, fractions, affine)


def inia_path() -> Path:
    path = colin_path().parent / INIA_FILE
    if not path.is_file():
        raise AnatomyUnavailable(f"INIA19 template {INIA_FILE} not found next to ch2.nii.gz; "
                                 "install it with: apt-get install mricron-data")
    return path


@functools.lru_cache(maxsize=1)
def _inia_brain() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INIA19 resampled to 1 mm after scaling by :data:`INIA_SCALE`: ``(memberships (3, ...) of
    CSF/GM/WM, brain mask, affine)``."""
    from scipy import ndimage

    data, affine = _read_nifti(inia_path())
    voxel = float(abs(affine[0, 0])) * INIA_SCALE            # mm per source voxel after scaling
    data = ndimage.zoom(data, voxel, order=1)                # → 1 mm voxels
    brain = ndimage.binary_fill_holes(data > 0.05 * np.percentile(data[data > 0], 99))
    brain = _largest_component(brain)
    centres = kmeans_1d(data[brain][::7], 3)
    member = intensity_memberships(np.where(brain, data, 0), centres) * brain
    new_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    pad = int(np.ceil(LAYER_MARGIN_MM))
    member = np.pad(member, ((0, 0), (pad, pad), (pad, pad), (pad, pad)))
    brain, new_affine = _pad(brain, new_affine, pad)
    return member.astype(np.float32), brain, new_affine


def inia_tissues(rng: np.random.Generator) -> TissueVolume:
    """INIA19 macaque brain at human size + a derived head (see module doc)."""
    member, brain, affine = _inia_brain()
    classes = {"csf": member[0], "gm": member[1], "wm": member[2]}
    return _with_layers("INIA", classes, _brain_distance("inia"), affine, rng)


@functools.lru_cache(maxsize=1)
def colin_tissues() -> TissueVolume:
    """Colin27's real head (see module doc). Brain: CSF/GM/WM memberships from the k-means
    centres of ``ch2bet`` intensities. Rest of the head (largest bright component of ``ch2``,
    holes filled): dark/intermediate/bright memberships at the k-means centres of its intensities,
    mapped to bone / muscle (half skin) / fat (half marrow)."""
    from scipy import ndimage

    head_data, affine = _read_nifti(colin_path())
    bet_path = colin_path().parent / "ch2bet.nii.gz"
    if not bet_path.is_file():
        raise AnatomyUnavailable(f"{bet_path} not found; install it with: apt-get install mricron-data")
    bet, _ = _read_nifti(bet_path)
    brain = ndimage.binary_fill_holes(bet > 0)
    level = np.percentile(head_data[head_data > 0], 99)
    head = ndimage.binary_fill_holes(_largest_component(head_data > 0.08 * level))
    head = ndimage.binary_closing(head, iterations=3) | brain
    brain_member = intensity_memberships(np.where(brain, bet, 0), kmeans_1d(bet[brain][::5], 3)) * brain
    rest = head & ~brain
    rest_member = intensity_memberships(np.where(rest, head_data, 0), kmeans_1d(head_data[rest][::3], 3)) * rest
    fractions = np.zeros((len(CLASSES),) + head_data.shape, np.float32)
    index = {c: k for k, c in enumerate(CLASSES)}
    fractions[index["csf"]], fractions[index["gm"]], fractions[index["wm"]] = brain_member
    fractions[index["bone"]] = rest_member[0]
    fractions[index["muscle"]] = 0.5 * rest_member[1]
    fractions[index["skin"]] = 0.5 * rest_member[1]
    fractions[index["fat"]] = 0.5 * rest_member[2]
    fractions[index["marrow"]] = 0.5 * rest_member[2]
    return TissueVolume("COLIN", fractions, affine)


#: Sources of whole heads; ``inia`` is meant for held-out evaluation.
HEAD_SOURCES = ("mni", "colin", "inia")


def head_tissues(source: str, rng: np.random.Generator) -> TissueVolume:
    """The :class:`TissueVolume` of ``source`` in :data:`HEAD_SOURCES` (derived layers drawn from ``rng``)."""
    if source == "mni":
        return mni_tissues(rng)
    if source == "colin":
        return colin_tissues()
    if source == "inia":
        return inia_tissues(rng)
    raise ValueError(f"unknown head source {source!r}; choose one of {', '.join(HEAD_SOURCES)}")
