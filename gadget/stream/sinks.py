"""Where built images go: ISMRMRD HDF5, PNG previews, DICOM files.

Images are ``ismrmrd.Image`` as :func:`gadget.stream.images.build_image` makes them: data
``(channels=1, z=1, y=phase, x=readout)``, meta ``WindowCenter``/``WindowWidth`` in stored units
and ``VarNetScale`` (``float_value = pixel / VarNetScale``).

HDF5 layout (what ``gadgetron_ismrmrd_client`` and ``ismrmrd.Dataset.append_image`` write)::

    /<group>/image_<series>/header      (N,) compound ismrmrd.hdf5.image_header_dtype
    /<group>/image_<series>/attributes  (N,) variable-length str, the meta XML
    /<group>/image_<series>/data        (N, channels, z, y, x) pixel type of the images
    /<group>/xml                        (1,) variable-length string, the scan's ISMRMRD header (optional)

where ``<series>`` is ``image_series_index``. Readable with
``ismrmrd.Dataset(path, group).read_image(f"image_{series}", i)`` and ``.read_xml_header()``;
``xml`` is stored as ``ismrmrd.Dataset.write_xml_header`` stores it (python-ismrmrd-server's
client writes the header that way).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import ismrmrd
import numpy as np
from ismrmrd.hdf5 import get_hdf5type, image_header_dtype

from .images import SCALE_KEY

__all__ = [
    "write_images_h5", "read_images_h5", "save_png_previews", "save_png_grid", "write_dicom",
    "window_to_uint8", "dicom_geometry", "DICOM_INSTALL_HINT",
]

DICOM_INSTALL_HINT = "install pydicom (pip install varnet-gadget[dicom])"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


# ----------------------------------------------------------------------------- HDF5

def _by_series(images: Iterable[ismrmrd.Image]) -> "OrderedDict[int, list[ismrmrd.Image]]":
    """Images grouped by ``image_series_index`` (first-seen order); shapes/types checked per series."""
    series: "OrderedDict[int, list[ismrmrd.Image]]" = OrderedDict()
    for n, img in enumerate(images):
        if not isinstance(img, ismrmrd.Image):
            raise TypeError(f"image {n}: expected ismrmrd.Image, got {type(img).__name__}")
        group = series.setdefault(int(img.image_series_index), [])
        if group:
            first = group[0]
            if img.data.shape != first.data.shape or img.data_type != first.data_type:
                raise ValueError(
                    f"series {img.image_series_index}: image {n} has data {img.data.shape} type "
                    f"{img.data_type}, the series' first image {first.data.shape} type {first.data_type}; "
                    "one HDF5 image dataset holds one shape and type (use another series index)")
        group.append(img)
    if not series:
        raise ValueError("no images to write")
    return series


def _header_record(img: ismrmrd.Image, attributes: bytes) -> np.ndarray:
    head = img.getHead()
    head.attribute_string_len = len(attributes)
    return np.frombuffer(bytes(head), dtype=image_header_dtype)[0]


def _write_series(grp: h5py.Group, images: list[ismrmrd.Image]) -> None:
    n = len(images)
    shape = images[0].data.shape
    dtype = get_hdf5type(images[0].data_type)
    attributes = [img.attribute_string for img in images]
    headers = np.array([_header_record(img, a.encode("utf-8")) for img, a in zip(images, attributes)],
                       dtype=image_header_dtype)
    grp.create_dataset("header", data=headers, maxshape=(None,))
    grp.create_dataset("attributes", data=np.array(attributes, dtype=object), maxshape=(None,),
                       dtype=h5py.special_dtype(vlen=str))
    data = grp.create_dataset("data", (n, *shape), maxshape=(None, *shape), dtype=dtype,
                              chunks=(1, *shape))
    for i, img in enumerate(images):
        data[i] = img.data.view(dtype)


def _write_header_xml(grp: h5py.Group, header_xml: str | bytes) -> None:
    """``/<group>/xml``: shape (1,), variable-length bytes (HDF5 string), as ismrmrd 1.15 writes it."""
    raw = header_xml.encode("utf-8") if isinstance(header_xml, str) else bytes(header_xml)
    raw = raw.rstrip(b"\0")
    if not raw.strip():
        raise ValueError("header_xml is empty; pass the scan's ISMRMRD XML header or None")
    grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))[0] = raw


def write_images_h5(path: str | os.PathLike, images: Iterable[ismrmrd.Image], group: str,
                    header_xml: str | bytes | None = None) -> dict[int, int]:
    """Write images under ``/<group>/image_<series>/`` (layout in the module docstring), and the
    scan's XML header at ``/<group>/xml`` when ``header_xml`` is given.

    Atomic: the result is written to a temporary file beside ``path`` and renamed over it, so
    ``path`` is either untouched or complete. An existing file keeps its other groups (it is
    copied first); an existing ``group`` is a ValueError. Returns ``{series: image count}``.
    """
    path = Path(path)
    if not group or "/" in group:
        raise ValueError(f"HDF5 group name must be non-empty and contain no '/', got {group!r}")
    series = _by_series(images)
    if path.exists():
        with h5py.File(path, "r") as existing:
            if group in existing:
                raise ValueError(f"{path}: group '{group}' already exists; choose another group name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if path.exists() else "w") as handle:
            root = handle.create_group(group)
            if header_xml is not None:
                _write_header_xml(root, header_xml)
            for index, imgs in series.items():
                _write_series(root.create_group(f"image_{index}"), imgs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {index: len(imgs) for index, imgs in series.items()}


def read_images_h5(path: str | os.PathLike) -> dict[str, list[ismrmrd.Image]]:
    """All image datasets in a file as ``{"<group>/image_<series>": [ismrmrd.Image, ...]}``.

    A dataset is any group holding ``header``, ``attributes`` and ``data``; ``group`` is its parent.
    """
    found: dict[str, list[ismrmrd.Image]] = {}
    with h5py.File(path, "r") as handle:
        for gname, grp in handle.items():
            if not isinstance(grp, h5py.Group):
                continue
            for iname, sub in grp.items():
                if isinstance(sub, h5py.Group) and {"header", "attributes", "data"} <= set(sub.keys()):
                    found[f"{gname}/{iname}"] = []
    for key in found:
        gname, iname = key.split("/", 1)
        dset = ismrmrd.Dataset(str(path), gname, mode="r")
        try:
            found[key] = [dset.read_image(iname, i) for i in range(dset.number_of_images(iname))]
        finally:
            dset.close()
    return found


# ----------------------------------------------------------------------------- PNG

def _plane(img: ismrmrd.Image, what: str) -> np.ndarray:
    """The stored ``(y, x)`` plane of a single-channel 2-D real image."""
    c, z = img.data.shape[:2]
    if c != 1 or z != 1:
        raise ValueError(f"{what}: only single-channel 2-D images are supported, data is {img.data.shape}")
    if np.iscomplexobj(img.data):
        raise ValueError(f"{what}: complex image; take the magnitude first")
    return np.asarray(img.data[0, 0], np.float64)


def _meta_float(img: ismrmrd.Image, key: str) -> float | None:
    value = img.meta.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"meta {key} = {value!r} is not a number") from None


def window_to_uint8(img: ismrmrd.Image) -> np.ndarray:
    """8-bit ``(y, x)`` display of the stored plane, windowed linearly from
    ``center - width/2`` (black) to ``center + width/2`` (white). Without WindowCenter/Width
    meta (display only), the window spans the image's min..max."""
    plane = _plane(img, f"image {img.image_index}")
    center, width = _meta_float(img, "WindowCenter"), _meta_float(img, "WindowWidth")
    if center is None or width is None:
        lo, hi = float(plane.min()), float(plane.max())
    else:
        lo, hi = center - width / 2, center + width / 2
    span = hi - lo if hi > lo else 1.0
    return np.rint(np.clip((plane - lo) / span, 0, 1) * 255).astype(np.uint8)


def _save_gray_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image as PILImage  # Pillow is a matplotlib dependency

    PILImage.fromarray(np.ascontiguousarray(pixels, np.uint8)).save(path, format="PNG")


def save_png_previews(images: Iterable[ismrmrd.Image], out_dir: str | os.PathLike,
                      prefix: str = "image") -> list[Path]:
    """One 8-bit grayscale PNG per image, ``<prefix>_s<series>_<index:04d>.png``; rows = stored y
    (phase), columns = stored x (readout), as a scanner displays them. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for img in images:
        path = out / f"{prefix}_s{img.image_series_index}_{img.image_index:04d}.png"
        _save_gray_png(window_to_uint8(img), path)
        paths.append(path)
    return paths


def save_png_grid(images: Iterable[ismrmrd.Image], path: str | os.PathLike, columns: int | None = None,
                  gap: int = 2) -> Path:
    """All images, each windowed by its own meta, tiled row-major into one grayscale PNG
    (``columns`` default ceil(sqrt(n)); tiles padded to the largest image; ``gap`` black pixels)."""
    tiles = [window_to_uint8(img) for img in images]
    if not tiles:
        raise ValueError("no images for the PNG grid")
    cols = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    canvas = np.zeros((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap), np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        y0, x0 = r * (th + gap), c * (tw + gap)
        canvas[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_gray_png(canvas, path)
    return path


# ----------------------------------------------------------------------------- DICOM

def _pydicom():
    try:
        import pydicom
        import pydicom.datadict  # noqa: F401
        import pydicom.uid  # noqa: F401
    except ImportError:
        raise ImportError(f"DICOM output needs pydicom: {DICOM_INSTALL_HINT}") from None
    return pydicom


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    for digits in range(10, 0, -1):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} cannot be written as a DICOM DS")


def dicom_geometry(img: ismrmrd.Image) -> dict[str, Any]:
    """Image-plane tags (floats) for a stored ``(y, x)`` image.

    Rows = y (phase), Columns = x (readout). ImageOrientationPatient = read_dir (along a row)
    then phase_dir (down a column). PixelSpacing = [fov_y / ny, fov_x / nx] (row spacing first).
    ImagePositionPatient is the centre of the first stored pixel: ISMRMRD ``position`` is the slice
    centre, which an FFT reconstruction puts at pixel (nx//2, ny//2), so
    IPP = position - (nx//2)·dx·read_dir - (ny//2)·dy·phase_dir.
    """
    nx, ny, _ = img.matrix_size
    fov = np.asarray(img.field_of_view, np.float64)
    dx, dy = fov[0] / nx, fov[1] / ny
    read, phase = np.asarray(img.read_dir, np.float64), np.asarray(img.phase_dir, np.float64)
    position = np.asarray(img.position, np.float64)
    corner = position - (nx // 2) * dx * read - (ny // 2) * dy * phase
    normal = np.cross(read, phase)
    return {
        "Rows": int(ny), "Columns": int(nx),
        "ImagePositionPatient": corner.tolist(),
        "ImageOrientationPatient": [*read.tolist(), *phase.tolist()],
        "PixelSpacing": [float(dy), float(dx)],
        "SliceThickness": float(fov[2]),
        "SliceLocation": float(position @ normal),
    }


def _dicom_pixels(img: ismrmrd.Image, max_value: int) -> tuple[np.ndarray, float]:
    """(uint16 ``(rows, cols)``, RescaleSlope) with ``float_value = pixel * slope``."""
    plane = _plane(img, f"image {img.image_index}")
    scale = _meta_float(img, SCALE_KEY) or 1.0
    if img.data.dtype == np.uint16:
        return np.ascontiguousarray(img.data[0, 0]), 1.0 / scale
    values = plane / scale
    if float(values.min()) < 0:
        raise ValueError(f"image {img.image_index}: negative values cannot be stored as "
                         "unsigned DICOM pixels")
    peak = float(values.max())
    dscale = max_value / peak if peak > 0 else 1.0
    pixels = np.clip(np.rint(values * dscale), 0, 65535).astype(np.uint16)
    return pixels, 1.0 / dscale


_IMAGE_OWNED = {
    "Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
    "SOPInstanceUID", "SOPClassUID",
}


def _check_header_info(pydicom, header_info: Mapping[str, Any]) -> None:
    for key in header_info:
        if pydicom.datadict.tag_for_keyword(key) is None:
            raise ValueError(f"header_info: {key!r} is not a DICOM keyword")
        if key in _IMAGE_OWNED:
            raise ValueError(f"header_info: {key} is set from the image and cannot be overridden")


def _dicom_dataset(pydicom, img: ismrmrd.Image, uids: dict[str, str], max_value: int):
    from pydicom.dataset import Dataset, FileMetaDataset

    sop_uid = pydicom.uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, key, "")  # type 2: present, may be empty; header_info fills them
    ds.Modality = "MR"
    ds.SeriesNumber = int(img.image_series_index)
    ds.InstanceNumber = int(img.image_index)
    ds.ImageType = ["DERIVED", "PRIMARY", "M"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "2D"
    ds.EchoTime, ds.EchoTrainLength = "", ""
    description = img.meta.get("SeriesDescription")
    if description:
        ds.SeriesDescription = str(description)
    comments = img.meta.get("ImageComments")
    if comments:
        ds.ImageComments = "; ".join(comments if isinstance(comments, list) else [comments])
    for key, value in dicom_geometry(img).items():
        setattr(ds, key, [_ds(v) for v in value] if isinstance(value, list)
                else value if isinstance(value, int) else _ds(value))
    pixels, slope = _dicom_pixels(img, max_value)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), "0", "US"
    center, width = _meta_float(img, "WindowCenter"), _meta_float(img, "WindowWidth")
    if center is not None and width is not None:  # meta is in stored ISMRMRD units → float units
        scale = _meta_float(img, SCALE_KEY) or 1.0
        ds.WindowCenter, ds.WindowWidth = _ds(center / scale), _ds(width / scale)
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _dcmwrite(pydicom, path: Path, ds) -> None:
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)


def write_dicom(images: Iterable[ismrmrd.Image], out_dir: str | os.PathLike,
                header_info: Mapping[str, Any] | None = None, *, max_value: int = 4095) -> list[Path]:
    """One MR Image Storage file per image, ``series<NNN>_image<NNNNN>.dcm``; returns the paths.

    Geometry as :func:`dicom_geometry`. Pixels are uint16: uint16 images as stored, float images
    scaled so their max maps to ``max_value``; RescaleSlope (intercept 0) gives the float values
    (``pixel / VarNetScale``), and WindowCenter/Width are converted to those units.
    ``header_info`` maps DICOM keywords to values (PatientName, StudyInstanceUID, StudyDate,
    Manufacturer, ...), applied last; image-derived tags cannot be overridden. Study and frame of
    reference UIDs are generated once per call unless given; each ``image_series_index`` gets one
    SeriesInstanceUID. Raises ImportError naming the extra when pydicom is missing.
    """
    pydicom = _pydicom()
    header_info = dict(header_info or {})
    _check_header_info(pydicom, header_info)
    if not 1 <= int(max_value) <= 65535:
        raise ValueError(f"max_value must be in 1..65535, got {max_value}")
    study = str(header_info.get("StudyInstanceUID") or pydicom.uid.generate_uid())
    frame = str(header_info.get("FrameOfReferenceUID") or pydicom.uid.generate_uid())
    series_uids: dict[int, str] = {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for img in images:
        series = int(img.image_series_index)
        path = out / f"series{series:03d}_image{int(img.image_index):05d}.dcm"
        if path in paths:
            raise ValueError(f"two images with series {series} and image_index {img.image_index}")
        uid = series_uids.setdefault(series, pydicom.uid.generate_uid())
        ds = _dicom_dataset(pydicom, img, {"study": study, "series": uid, "frame": frame}, max_value)
        for key, value in header_info.items():
            setattr(ds, key, value)
        _dcmwrite(pydicom, path, ds)
        paths.append(path)
    return paths
