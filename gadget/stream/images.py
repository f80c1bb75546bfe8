"""Reconstructed slices → ``ismrmrd.Image`` with the header and meta attributes scanners use.

Layouts and conventions
-----------------------
- Input magnitude: real ``(readout, phase)`` = ``(x, y)``, the fastMRI image layout, in the
  reconstruction's own units (float, ≥ 0).
- ISMRMRD image storage: ``Image.data`` is ``(channels, z, y, x)`` in C order and
  ``matrix_size = (x, y, z)``. So the magnitude is stored **transposed**:
  ``img.data[0, 0, j, i] == magnitude[i, j]`` and ``matrix_size = (n_readout, n_phase, 1)``.
  A stored row runs along x (readout): ``ImageRowDir = read_dir``; a stored column runs along
  y (phase): ``ImageColumnDir = phase_dir`` (as Gadgetron and python-ismrmrd-server set them).
- ``field_of_view`` (mm) is the reconSpace FOV, scaled by ``shape / recon_matrix`` when the image
  is not the recon matrix size, so that the pixel spacing stays ``recon_fov / recon_matrix``.
- ``position`` (mm, patient coordinates) is the centre of the slice as the reference acquisition
  gives it; the directions are unit vectors in the same (DICOM LPS) patient coordinates.
- Stored values: float32 as given (``VarNetScale`` = 1), or uint16 with one scale per series
  (:class:`SeriesScale`; a lone image: its max maps to ``uint16_max``); in both cases
  ``float_value = pixel / VarNetScale``. int16 is never produced (Gadgetron has no reader for it).
  ``WindowCenter``/``WindowWidth`` are in stored units, one window per series.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import ismrmrd
import numpy as np

from ..data.mrd_header import EncodingInfo
from .types import AcqLine

__all__ = [
    "ImageOptions", "Geometry", "SeriesScale", "build_image", "geometry_defaults", "dither_noise", "local_median",
    "SCALE_KEY", "DEFAULT_READ_DIR", "DEFAULT_PHASE_DIR", "DEFAULT_SLICE_DIR",
]

SCALE_KEY = "VarNetScale"  # meta: the factor the float image was multiplied by (pixel / scale = float)
DEFAULT_READ_DIR = (1.0, 0.0, 0.0)
DEFAULT_PHASE_DIR = (0.0, 1.0, 0.0)
DEFAULT_SLICE_DIR = (0.0, 0.0, 1.0)
DITHER_WINDOW = 11  # side of the square window of the local median that shapes the dither noise
_UINT16_MAX = 65535
_DIR_FMT = "{:.18f}"  # the format scanners' tools write ImageRowDir / ImageColumnDir in


@dataclass
class ImageOptions:
    """How images are encoded. One source of defaults for the CLI and the gadget.

    dtype: ``"float32"`` (stored as given) or ``"uint16"`` (scaled, see :class:`SeriesScale`). Never int16.
    uint16_max: the largest stored value for uint16 (1..65535; 4095 = 12 bit).
    dither_sigma: std of added noise relative to the image max, shaped by the square root of
        the 11×11 local median of the max-normalised image; 0 disables. Seeded per image index.
    series_description, sequence_description_additional (omitted when empty), image_series_index,
    keep_image_geometry: written to header / meta.
    """

    dtype: str = "float32"
    uint16_max: int = 4095
    dither_sigma: float = 0.0
    series_description: str = "E2E-VarNet"
    sequence_description_additional: str = ""
    image_series_index: int = 1
    keep_image_geometry: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "uint16"):
            raise ValueError(f"ImageOptions.dtype must be 'float32' or 'uint16', not {self.dtype!r} "
                             "(int16 images cannot be read back by Gadgetron)")
        if not 1 <= int(self.uint16_max) <= _UINT16_MAX:
            raise ValueError(f"ImageOptions.uint16_max must be in 1..65535, not {self.uint16_max}")
        if not (math.isfinite(self.dither_sigma) and self.dither_sigma >= 0):
            raise ValueError(f"ImageOptions.dither_sigma must be finite and >= 0, not {self.dither_sigma}")
        if not 0 <= int(self.image_series_index) <= _UINT16_MAX:
            raise ValueError("ImageOptions.image_series_index must be in 0..65535, "
                             f"not {self.image_series_index}")


class Geometry(NamedTuple):
    """Unit direction vectors (float64, shape (3,)) in patient coordinates."""

    read: np.ndarray
    phase: np.ndarray
    slice: np.ndarray


def _unit(vec: Any) -> np.ndarray | None:
    """``vec`` normalised to length 1, or None when it is zero or not finite."""
    v = np.asarray(vec, np.float64).reshape(3)
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm < 1e-6:
        return None
    return v / norm


def geometry_defaults(head: np.void) -> Geometry:
    """Read/phase/slice directions of an acquisition header, normalised and fixed up.

    - read or phase missing (all-zero or non-finite): the file carries no usable geometry, all
      three take the defaults read=(1,0,0), phase=(0,1,0), slice=(0,0,1);
    - only slice missing: slice = read × phase;
    - otherwise each vector is normalised.
    """
    read, phase, slc = (_unit(head[name]) for name in ("read_dir", "phase_dir", "slice_dir"))
    if read is None or phase is None:
        return Geometry(*(np.array(d, np.float64) for d in (DEFAULT_READ_DIR, DEFAULT_PHASE_DIR,
                                                             DEFAULT_SLICE_DIR)))
    if slc is None:
        slc = np.cross(read, phase)
        slc = _unit(slc)
        if slc is None:
            raise ValueError("acquisition header: read_dir and phase_dir are parallel; no slice direction")
    return Geometry(read, phase, slc)


def _check_magnitude(magnitude: Any) -> np.ndarray:
    """``magnitude`` as float32 ``(readout, phase)``; ValueError naming what is wrong."""
    arr = np.asarray(magnitude)
    if arr.ndim != 2:
        raise ValueError(f"magnitude must be 2-D (readout, phase), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"magnitude is empty (shape {arr.shape})")
    if any(n > _UINT16_MAX for n in arr.shape):
        raise ValueError(f"magnitude shape {arr.shape} exceeds the ISMRMRD matrix limit 65535")
    if np.iscomplexobj(arr):
        raise ValueError("magnitude must be real; take np.abs of complex images first")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise ValueError(f"magnitude must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        raise ValueError(f"magnitude has {int(bad.sum())} non-finite values ({n_nan} NaN, "
                         f"{int(bad.sum()) - n_nan} Inf); refusing to build an image")
    if float(arr.min()) < 0:
        raise ValueError(f"magnitude has negative values (min {float(arr.min()):.4g}); expected |image| >= 0")
    return arr


def local_median(image: np.ndarray, size: int = DITHER_WINDOW, rows_per_chunk: int = 64) -> np.ndarray:
    """Median over a ``size``×``size`` window centred on each pixel (edges mirrored as in
    ``scipy.ndimage.median_filter(mode='reflect')``). float32, same shape; memory is bounded by
    processing ``rows_per_chunk`` rows at a time."""
    if size % 2 != 1:
        raise ValueError(f"median window must be odd, got {size}")
    half = size // 2
    padded = np.pad(np.asarray(image, np.float32), half, mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    out = np.empty(image.shape, np.float32)
    for start in range(0, image.shape[0], rows_per_chunk):
        block = windows[start:start + rows_per_chunk].reshape(-1, image.shape[1], size * size)
        out[start:start + rows_per_chunk] = np.median(block, axis=-1)
    return out


def dither_noise(magnitude: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Noise to add to a magnitude image: ``N(0,1) × sigma × max × sqrt(local_median(mag / max))``.

    ``sigma`` is relative to the image max; the RNG is seeded from ``seed`` (the image index), so
    the same slice always gets the same noise. Zero images get zero noise."""
    peak = float(magnitude.max())
    if sigma == 0 or peak == 0:
        return np.zeros_like(magnitude, dtype=np.float32)
    rng = np.random.default_rng([0x5A7E_D17E, int(seed)])
    shape = np.sqrt(local_median(magnitude / peak))
    return (rng.standard_normal(magnitude.shape) * (sigma * peak) * shape).astype(np.float32)


@dataclass
class SeriesScale:
    """One intensity scale and one window for every image of a series: a uint16 series scaled per
    slice flickers between slices (docs/guide/pipeline.md, "Scanner-ready series"). Mutable: the first image fixes what is not given.

    scale: uint16 only; > 0 is used as given (stored = float · scale); 0 = set by the first image so that
        its maximum maps to ``uint16_max / headroom``. Later pixels brighter than ``uint16_max / scale``
        clip at ``uint16_max``; ``clipped`` counts them. float32 images are stored as given (scale 1).
    headroom: ≥ 1; 2 lets slices up to twice as bright as the first keep their peaks.
    window: (centre, width) in stored units, the first image's (centre = its peak / 2, width = its peak).
    """
    scale: float = 0.0
    headroom: float = 1.0
    window: Optional[tuple[Any, Any]] = None
    clipped: int = 0

    def encode(self, values: np.ndarray, options: ImageOptions) -> tuple[np.ndarray, float, tuple[Any, Any]]:
        """Float image → ``(stored array, scale, window)`` with ``stored / scale == values`` (to rounding,
        below the clip)."""
        if options.dtype == "float32":
            stored, scale = values.astype(np.float32), 1.0
        else:
            if self.scale <= 0:
                peak = float(values.max())
                self.scale = float(options.uint16_max) / (peak * self.headroom) if peak > 0 else 0.0
            scale = self.scale or 1.0  # an all-zero first image leaves the scale to the next one
            scaled = np.rint(values.astype(np.float64) * scale)
            self.clipped += int(np.count_nonzero(scaled > options.uint16_max))
            stored = np.clip(scaled, 0, options.uint16_max).astype(np.uint16)
        if self.window is None and float(stored.max()) > 0:
            self.window = _window(stored, options)
        return stored, scale, self.window or _window(stored, options)


def _window(stored: np.ndarray, options: ImageOptions) -> tuple[Any, Any]:
    """(center, width) in stored units: center = max / 2, width = max (1 when the image is 0)."""
    peak = float(stored.max())
    if options.dtype == "uint16":
        width = max(int(round(peak)), 1)
        return int(round(width / 2)), width
    width = peak if peak > 0 else 1.0
    return width / 2, width


def _reference_head(reference: Any) -> np.void:
    head = reference.head if isinstance(reference, AcqLine) else reference
    names = getattr(getattr(head, "dtype", None), "names", None)
    if not names or "read_dir" not in names:
        raise TypeError("reference must be an AcqLine or an acquisition header, "
                        f"got {type(reference).__name__}")
    return head


def _field_of_view(shape: tuple[int, int], encoding: EncodingInfo) -> tuple[float, float, float]:
    fov = encoding.recon_fov_mm
    mat = encoding.recon_matrix
    return (fov[0] * shape[0] / mat[0], fov[1] * shape[1] / mat[1], encoding.partition_thickness_mm)


def _header(reference: np.void, geometry: Geometry, fov: Sequence[float], image_index: int,
            options: ImageOptions) -> ismrmrd.ImageHeader:
    idx = reference["idx"]
    head = ismrmrd.ImageHeader()
    head.version = 1
    head.measurement_uid = int(reference["measurement_uid"])
    head.field_of_view[:] = [float(v) for v in fov]
    head.position[:] = [float(v) for v in reference["position"]]
    head.read_dir[:] = geometry.read.tolist()
    head.phase_dir[:] = geometry.phase.tolist()
    head.slice_dir[:] = geometry.slice.tolist()
    head.patient_table_position[:] = [float(v) for v in reference["patient_table_position"]]
    for name in ("average", "slice", "contrast", "phase", "repetition", "set"):
        setattr(head, name, int(idx[name]))
    head.acquisition_time_stamp = int(reference["acquisition_time_stamp"])
    head.physiology_time_stamp[:] = [int(v) for v in reference["physiology_time_stamp"]]
    head.image_type = ismrmrd.IMTYPE_MAGNITUDE
    head.image_index = int(image_index)
    head.image_series_index = int(options.image_series_index)
    return head


def _meta(head: ismrmrd.ImageHeader, window: tuple[Any, Any], scale: float, options: ImageOptions,
          comments: Sequence[str], processing: Sequence[str], data_role: str,
          extra: Mapping[str, Any] = {}) -> ismrmrd.Meta:
    meta = ismrmrd.Meta()
    meta["DataRole"] = data_role
    meta["ImageProcessingHistory"] = [str(p) for p in processing]
    meta["WindowCenter"], meta["WindowWidth"] = window
    meta["SeriesDescription"] = options.series_description
    if comments:
        meta["ImageComments"] = [str(c) for c in comments]
    if options.sequence_description_additional:
        meta["SequenceDescriptionAdditional"] = options.sequence_description_additional
    if options.keep_image_geometry:
        meta["Keep_image_geometry"] = 1
    meta["ImageRowDir"] = [_DIR_FMT.format(v) for v in head.read_dir]
    meta["ImageColumnDir"] = [_DIR_FMT.format(v) for v in head.phase_dir]
    meta[SCALE_KEY] = repr(float(scale))
    for key, value in extra.items():
        if key in meta.keys():
            raise ValueError(f"extra meta attribute '{key}' would replace one build_image sets")
        meta[key] = value
    return meta


def build_image(magnitude: np.ndarray, reference: AcqLine | np.void, encoding: EncodingInfo,
                image_index: int, options: ImageOptions | None = None, comments: Sequence[str] = (),
                processing: Sequence[str] = ("VARNET",), data_role: str = "Image",
                extra_meta: Mapping[str, Any] = {}, series: SeriesScale | None = None) -> ismrmrd.Image:
    """One reconstructed slice as an ``ismrmrd.Image`` (magnitude, 1 channel, 1 partition).

    magnitude: real ``(readout, phase)`` float image, finite and ≥ 0 (else ValueError).
    reference: the acquisition nearest the k-space centre (``AcqLine`` or its header), giving
        position, directions, table position, idx counters, measurement uid and timestamps.
    encoding: supplies the reconSpace FOV (mm) and matrix.
    image_index: 0..65535, also seeds the dither noise.
    extra_meta: further meta attributes (e.g. the pipeline's safety figures), names not set here.
    series: the series' shared scale and window (:class:`SeriesScale`); None = a series of this image.
    Returns an image with ``data`` ``(1, 1, phase, readout)`` (float32 or uint16) and the meta
    attributes listed in the module docstring.
    """
    options = options or ImageOptions()
    if not 0 <= int(image_index) <= _UINT16_MAX:
        raise ValueError(f"image_index must be in 0..65535, got {image_index}")
    values = _check_magnitude(magnitude)
    head_in = _reference_head(reference)
    if options.dither_sigma > 0:
        values = np.maximum(values + dither_noise(values, options.dither_sigma, image_index), 0)
    stored, scale, window = (series or SeriesScale()).encode(values, options)
    head = _header(head_in, geometry_defaults(head_in), _field_of_view(values.shape, encoding),
                   image_index, options)
    data = np.ascontiguousarray(stored.T)[np.newaxis, np.newaxis]  # (1, 1, y=phase, x=readout)
    meta = _meta(head, window, scale, options, comments, processing, data_role, extra_meta)
    return ismrmrd.Image(head=head, data=data, meta=meta)


def image_magnitude(image: ismrmrd.Image) -> np.ndarray:
    """Inverse of :func:`build_image`'s storage: float32 ``(readout, phase)`` in the units of the
    magnitude given (uint16 pixels divided by the recorded ``VarNetScale``)."""
    scale = float(image.meta[SCALE_KEY]) if SCALE_KEY in image.meta.keys() else 1.0
    return np.asarray(image.data, np.float32)[0, 0].T / scale
