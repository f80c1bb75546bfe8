"""Opening HDF5 inputs with errors that name the file (shared by the fastMRI and ISMRMRD readers)."""
from __future__ import annotations

from pathlib import Path

import h5py


def open_readonly(path: Path, error: type[Exception]) -> h5py.File:
    """``h5py.File(path, "r")``; a missing or unreadable file raises ``error`` naming it."""
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise error(f"{path}: not a readable HDF5 file ({exc})") from None
