"""Replay door: an ISMRMRD raw file through the streaming pipeline, images to HDF5.

Source: acquisitions read in bulk from ``/<group>/data`` (see ``gadget.data.mrd_file``), the
header from ``/<group>/xml``. Sink: ``/<out_group>/image_<series>/`` as Gadgetron's client
writes it, plus optional PNG previews and DICOM files.
"""
from __future__ import annotations

import logging
import time
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
    scan = ScanReconstructor(xml, config, engine, source=in_path.name, model_id=model_id)
    t0 = time.perf_counter()
    images = [item for item in overlapped(scan, file_lines(in_path, group, progress)) if _is_image(item)]
    return ReplayResult(images, time.perf_counter() - t0, scan.stats.model_seconds,
                        count_acquisitions(in_path, group), scan.stats.incomplete, scan.stats.flagged)


def _is_image(item) -> bool:
    return type(item).__name__ == "Image"
