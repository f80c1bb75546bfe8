"""Replay door: an ISMRMRD raw file through the streaming pipeline, images to HDF5.

Source: acquisitions read in bulk from ``/<group>/data`` (see ``gadget.data.mrd_file``), the
header from ``/<group>/xml``; a Siemens twix file (``meas.dat``) is first converted to a temporary
ISMRMRD file (:func:`ismrmrd_source`, ``converters/twix.py``). Sink: ``/<out_group>/image_<series>/``
as Gadgetron's client writes it, plus optional PNG previews and DICOM files.
"""
from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from .data.mrd_file import count_acquisitions, iter_acquisitions, read_header_xml
from .recon.config import ReconConfig
from .recon.engine import Reconstructor
from .recon.overlap import overlapped
from .recon.pipeline import ScanReconstructor
from .stream.types import AcqLine

log = logging.getLogger(__name__)


@dataclass
class ReplayResult:
    images: list
    seconds: float
    model_seconds: float
    acquisitions: int
    incomplete: int
    flagged: int = 0  # network images the safety check flagged (their fallback was written)
    adaptation: Optional[object] = None  # gadget.train.adapt_run.ScanAdaptation with adapt: solve | scan


@contextmanager
def ismrmrd_source(path, group: str = "dataset") -> Iterator[tuple[Path, str]]:
    """``(ISMRMRD file, group)`` holding the acquisitions of ``path``: the file itself when it is HDF5
    (or anything else that is not twix: the ISMRMRD reader reports it), else a Siemens twix file
    converted into a temporary ISMRMRD file that is removed afterwards. A non-HDF5 ``.dat`` file that
    is not twix, or a twix scan that is not Cartesian, raises :class:`gadget.converters.twix.TwixError` naming it."""
    import h5py

    path = Path(path)
    if not path.is_file() or h5py.is_hdf5(path):
        yield path, group
        return
    from gadget.converters.twix import TwixError, convert_twix_to_ismrmrd, sniff_twix

    if path.suffix.lower() != ".dat":
        try:
            sniff_twix(path)
        except TwixError:
            yield path, group  # neither HDF5 nor twix: the ISMRMRD reader's error names the file
            return
    with tempfile.TemporaryDirectory(prefix="varnet-twix-") as tmp:
        converted = Path(tmp) / f"{path.stem}.h5"
        report = convert_twix_to_ismrmrd(path, converted)
        log.info("%s: %s", path, report.summary())
        if report.trajectory != "cartesian":
            raise TwixError(f"{path}: {report.trajectory} trajectory; the pipeline reconstructs Cartesian scans only "
                            "(varnet convert twix-to-ismrmrd converts it for other tools)")
        yield converted, "dataset"


def file_lines(path: Path, group: str = "dataset", progress: Optional[Callable[[int], None]] = None
               ) -> Iterator[AcqLine]:
    for chunk in iter_acquisitions(path, group):
        for head, data in zip(chunk.heads, chunk.data):
            yield AcqLine(head, data)
        if progress:
            progress(len(chunk.data))


def replay_file(in_path, config: ReconConfig, engine: Optional[Reconstructor], group: str = "dataset",
                model_id: str = "none", progress: Optional[Callable[[int], None]] = None) -> ReplayResult:
    in_path = Path(in_path)
    xml = read_header_xml(in_path, group)
    adaptation = refiner = None
    if config.adapt != "none" and engine is not None:
        adaptation = _adapted_to_scan(in_path, config, engine, group)
        if adaptation is not None:
            engine, refiner = adaptation.network, adaptation.refiner
    scan = ScanReconstructor(xml, config, engine, source=in_path.name, model_id=model_id, refiner=refiner)
    t0 = time.perf_counter()
    images = [item for item in overlapped(scan, file_lines(in_path, group, progress)) if _is_image(item)]
    return ReplayResult(images, time.perf_counter() - t0, scan.stats.model_seconds,
                        count_acquisitions(in_path, group), scan.stats.incomplete, scan.stats.flagged, adaptation)


def _adapted_to_scan(in_path: Path, config: ReconConfig, engine: Reconstructor, group: str):
    """The :class:`gadget.train.adapt_run.ScanAdaptation` of this file's own undersampled slices (a first
    pass over the file; ``adapt: solve | scan``), or None when it has none."""
    from .train.adapt import AdaptError
    from .train.adapt_inputs import ismrmrd_slices
    from .train.adapt_run import adapt_for_config

    slices = ismrmrd_slices(in_path, config, file_lines(in_path, group), group)
    if not slices:
        log.warning("%s: adapt %s: no undersampled slice to adapt on; the weights are used as they are",
                    in_path.name, config.adapt)
        return None
    try:
        return adapt_for_config(engine, slices, config, in_path.name)
    except AdaptError as exc:  # not a fallback to the loaded weights: adaptation was asked for
        raise AdaptError(f"{in_path.name}: adapt {config.adapt}: {exc}") from None


def _is_image(item) -> bool:
    return type(item).__name__ == "Image"
