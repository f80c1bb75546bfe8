"""fastMRI multicoil HDF5 files: reading (train/val/test layouts) and writing.

Layout (facts from the fastMRI dataset description):

* ``kspace``: complex64 ``(slice, coil, readout, phase)``, readout 2× oversampled;
* ``mask`` (test files only): ``(phase,)`` 0/1, the acquired columns;
* ``reconstruction_rss`` (train/val): float32 ``(slice, H, W)`` cropped to the recon size;
* ``ismrmrd_header``: XML bytes; attrs ``max``, ``norm``, ``acquisition``, ``patient_id``;
  test files add ``acceleration`` and ``num_low_frequency``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from .h5 import open_readonly
from .mrd_header import EncodingInfo, HeaderError, parse_encoding


class FastMRIFileError(ValueError):
    """A fastMRI file is missing, unreadable, or has the wrong layout; the message names the file."""


@dataclass
class FastMRIVolume:
    """An open fastMRI file. ``kspace`` is the lazy h5py dataset ``(slice, coil, readout, phase)``."""

    path: Path
    handle: h5py.File
    kspace: h5py.Dataset
    encoding: EncodingInfo
    mask: Optional[np.ndarray]  # bool (phase,) for test files, else None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def num_low_frequency(self) -> Optional[int]:
        value = self.attrs.get("num_low_frequency")
        return int(value) if value is not None and int(value) > 0 else None

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "FastMRIVolume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_volume(path: str | os.PathLike) -> FastMRIVolume:
    """Open and validate a fastMRI multicoil file (raises :class:`FastMRIFileError`)."""
    path = Path(path)
    handle = open_readonly(path, FastMRIFileError)
    try:
        return _validate(path, handle)
    except Exception:
        handle.close()
        raise


def _validate(path: Path, handle: h5py.File) -> FastMRIVolume:
    for name in ("kspace", "ismrmrd_header"):
        if name not in handle:
            raise FastMRIFileError(f"{path}: missing dataset '{name}'")
    kspace = handle["kspace"]
    if kspace.ndim != 4:
        raise FastMRIFileError(f"{path}: 'kspace' must be (slice, coil, readout, phase) multicoil, "
                               f"got rank {kspace.ndim} shape {kspace.shape}")
    if not np.issubdtype(kspace.dtype, np.complexfloating):
        raise FastMRIFileError(f"{path}: 'kspace' must be complex, got {kspace.dtype}")
    if 0 in kspace.shape:
        raise FastMRIFileError(f"{path}: 'kspace' is empty, shape {kspace.shape}")
    try:
        encoding = parse_encoding(handle["ismrmrd_header"][()], source=str(path))
    except HeaderError as exc:
        raise FastMRIFileError(str(exc)) from None
    mask = None
    if "mask" in handle:
        mask = np.asarray(handle["mask"][()]).reshape(-1)
        if mask.shape[0] != kspace.shape[-1]:
            raise FastMRIFileError(f"{path}: 'mask' has {mask.shape[0]} entries for {kspace.shape[-1]} phase columns")
        mask = mask.astype(bool)
    return FastMRIVolume(path=path, handle=handle, kspace=kspace, encoding=encoding, mask=mask,
                         attrs=dict(handle.attrs))


def write_atomic_h5(path: str | os.PathLike, datasets: dict[str, Any], attrs: Optional[dict] = None) -> None:
    """Write an HDF5 file under a temporary name and rename it, so a failure never leaves a
    file that looks complete. Values that are ``str`` become fixed-length byte strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with h5py.File(tmp, "w") as f:
            for name, value in datasets.items():
                f.create_dataset(name, data=np.bytes_(value) if isinstance(value, str) else value)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_reconstruction(path: str | os.PathLike, reconstruction: np.ndarray, **attrs: Any) -> None:
    """fastMRI submission layout: ``reconstruction`` float32 ``(slice, H, W)``."""
    write_atomic_h5(path, {"reconstruction": np.asarray(reconstruction, dtype=np.float32)}, attrs)
