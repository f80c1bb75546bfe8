"""The undersampled slices adaptation learns from, read from the files a site has.

* fastMRI files as acquired (test layout: ``kspace`` + ``mask`` + ``ismrmrd_header``): every slice, the
  mask restricted to the header's acquired range, the ACS count by the rule of ``varnet infer``
  (:func:`gadget.recon.fastmri_infer.acs_count`).
* ISMRMRD raw files: the acquisitions through the streaming pipeline's own per-line half (noise
  prewhitening, slice assembly, separate references; :class:`gadget.recon.pipeline.ScanReconstructor`),
  with the pipeline's ACS rule and coil compression, so the slices are exactly what the network sees
  when the file is replayed. Slices the pipeline sends as a coil combination (fully sampled) are left out.

Layouts: :class:`gadget.train.adapt.AdaptSlice`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from ..data.fastmri_file import open_volume
from ..data.mrd_file import read_header_xml
from ..recon.config import ReconConfig
from ..recon.fastmri_infer import acquired_mask, acs_count
from ..recon.pipeline import ScanReconstructor
from ..stream.assemble import SliceData
from ..stream.types import AcqLine
from .adapt import AdaptError, AdaptSlice

log = logging.getLogger(__name__)


def file_kind(path: Path) -> str:
    """``fastmri`` (a ``kspace`` dataset) or ``ismrmrd`` (``/<group>/data``); anything else is an error."""
    if not path.is_file():
        raise AdaptError(f"{path}: not a file")
    if not h5py.is_hdf5(path):
        raise AdaptError(f"{path}: not an HDF5 file (fastMRI or ISMRMRD expected; convert twix with "
                         "varnet convert twix-to-ismrmrd or pass it to varnet replay)")
    with h5py.File(path, "r") as f:
        if "kspace" in f:
            return "fastmri"
        if any(isinstance(f[name], h5py.Group) and "data" in f[name] for name in f):
            return "ismrmrd"
    raise AdaptError(f"{path}: neither a fastMRI file (no 'kspace' dataset) nor an ISMRMRD file (no '/<group>/data')")


def fastmri_slices(path: Path) -> list[AdaptSlice]:
    """Every slice of a fastMRI file as acquired (module docstring)."""
    with open_volume(path) as volume:
        mask = acquired_mask(volume)
        acs = acs_count(volume, mask, "auto")
        kspace = np.asarray(volume.kspace[()], np.complex64) * mask
    return [AdaptSlice(kspace[s], mask.copy(), acs, f"{path.name}/{s}") for s in range(kspace.shape[0])]


def ismrmrd_slices(path: Path, config: ReconConfig, lines: Iterable[AcqLine], group: str = "dataset"
                   ) -> list[AdaptSlice]:
    """The slices the pipeline would give the network for the raw file ``path`` (module docstring);
    ``lines``: its acquisitions (:func:`gadget.replay.file_lines`)."""
    scan = ScanReconstructor(read_header_xml(path, group), dataclasses.replace(config, mode="zero-filled"),
                             source=path.name)
    out = []
    for item in scan.assembled(lines):
        if not isinstance(item, SliceData):
            continue
        sl = scan.prepared(item)
        if scan.acceleration(sl) < config.fully_sampled_below:
            continue
        sens = None if sl.calibration_kspace is None else np.array(sl.calibration_kspace)
        out.append(AdaptSlice(np.array(sl.kspace, np.complex64), sl.mask.copy(), scan.acs_count(sl),
                              f"{path.name}/{'.'.join(f'{k}{v}' for k, v in sl.key_dict().items() if v)}",
                              sens_kspace=sens))
    return out

