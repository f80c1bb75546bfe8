"""The shared streaming pipeline, as generator stages over ``(header, items)``:

    items ─▶ as_lines ─▶ prewhiten ─▶ assemble slices ─▶ reconstruct (batched) ─▶ images

``items`` may hold ``AcqLine``s, ``ismrmrd.Acquisition``s (converted) and anything else
(waveforms, images from upstream gadgets), which passes through unchanged. Every door
(Gadgetron external gadget, MRD server, file replay) is: a source of items + header, this
pipeline, a sink.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from ..data.mrd_header import EncodingInfo, parse_encoding
from ..mri.coils import rss
from ..mri.fft import ifft2c
from ..mri.metrics import center_crop_at_most
from ..stream.assemble import SliceAssembler, SliceData
from ..stream.images import ImageOptions, build_image
from ..stream.noise import prewhiten
from ..stream.types import AcqLine
from .config import ReconConfig
from .engine import Reconstructor

log = logging.getLogger(__name__)


def as_lines(items: Iterable[Any]) -> Iterator[Any]:
    """``ismrmrd.Acquisition`` → :class:`AcqLine`; everything else unchanged."""
    for item in items:
        if not isinstance(item, AcqLine) and type(item).__name__ == "Acquisition" and hasattr(item, "getHead"):
            item = AcqLine.from_ismrmrd(item)
        yield item


class ReconError(ValueError):
    """A slice cannot be reconstructed; the message names the scan and the slice."""


@dataclass
class ScanStats:
    slices: int = 0
    incomplete: int = 0
    model_seconds: float = 0.0
    passthrough: int = 0
    first_image_at: Optional[float] = None
    acs_counts: set = field(default_factory=set)


class ScanReconstructor:
    """Reconstructs one scan (one connection / one file). The engine (model) is shared and
    loaded once per process; this object holds only per-scan state."""

    def __init__(self, header_xml: str, config: ReconConfig, engine: Optional[Reconstructor] = None,
                 source: str = "scan", model_id: str = "none"):
        if config.mode == "varnet" and engine is None:
            raise ValueError("mode 'varnet' needs a loaded model (engine)")
        self.encoding: EncodingInfo = parse_encoding(header_xml, source=source)
        self.config, self.engine, self.source = config, engine, source
        self.options = ImageOptions(dtype=config.image_dtype, uint16_max=config.uint16_max,
                                    dither_sigma=config.dither_sigma,
                                    series_description=config.series_description,
                                    image_series_index=config.image_series_index)
        self.stats = ScanStats()
        self.assembler = SliceAssembler(self.encoding)  # a door's reader may land samples in its rows
        self.notes: list[str] = []  # warnings for the peer (doors send them as TEXT where allowed)
        self._next_index = 1
        self._logged_series = False
        self.model_id = model_id

    def run(self, items: Iterable[Any]) -> Iterator[Any]:
        """The pipeline on one thread: yields images (and pass-through items) as slices complete.
        :func:`gadget.recon.overlap.overlapped` runs the same two halves on two threads."""
        yield from self.reconstruct(self.assembled(items))

    def assembled(self, items: Iterable[Any]) -> Iterator[Any]:
        """The per-line half: items → :class:`SliceData` as slices complete, pass-through items as they
        come. At the end of the stream, slices never marked complete follow (flagged ``incomplete``)
        unless ``reconstruct_incomplete`` is off."""
        assembler = self.assembler
        for item in prewhiten(as_lines(items), self.config.prewhiten):
            if isinstance(item, AcqLine):
                yield from assembler.add(item)
            else:
                self.stats.passthrough += 1
                yield item
        leftovers = assembler.flush()
        if leftovers and not self.config.reconstruct_incomplete:
            self._note(f"{len(leftovers)} slices never marked complete were dropped (reconstruct_incomplete=false)")
            return
        if leftovers:
            self._note(f"{len(leftovers)} slices were never marked complete (no LAST_IN_SLICE flag); "
                       "reconstructed at end of stream")
        if assembler.seen == 0:
            self._note("the scan contained no imaging acquisitions; nothing to reconstruct")
        yield from leftovers

    def reconstruct(self, stream: Iterable[Any]) -> Iterator[Any]:
        """The per-slice half: :class:`SliceData` → images in batches of ``batch_size``; other items
        pass through."""
        pending: list[SliceData] = []
        for item in stream:
            if not isinstance(item, SliceData):
                yield item
                continue
            pending.append(item)
            if len(pending) >= self.config.batch_size:
                yield from self._images_then_recycle(pending)
                pending = []
        if pending:
            yield from self._images_then_recycle(pending)

    def _images_then_recycle(self, slices: list[SliceData]) -> Iterator[Any]:
        yield from self._images(slices)
        for sl in slices:  # their images are built: the assembler may reuse the k-space memory
            self.assembler.recycle(sl)

    def _note(self, text: str) -> None:
        log.warning("%s: %s", self.source, text)
        self.notes.append(text)

    # ------------------------------------------------------------------ stages

    def _images(self, slices: list[SliceData]) -> Iterator[Any]:
        for group in _same_shape_groups(slices):
            magnitudes = self._reconstruct(group)
            for sl, mag in zip(group, magnitudes):
                yield self._image(sl, mag)

    def _reconstruct(self, group: list[SliceData]) -> np.ndarray:
        """``(batch, readout, phase)`` float32 magnitudes, uncropped."""
        kspace = np.stack([s.kspace for s in group])
        t0 = time.perf_counter()
        if self.config.mode == "zero-filled":
            out = rss(ifft2c(torch.from_numpy(kspace)), dim=1).numpy()
        else:
            masks = {s.mask.tobytes() for s in group}
            if len(masks) == 1:
                acs = self._acs(group[0])
                out = self.engine(kspace, group[0].mask, acs)
            else:  # different masks in one batch: one forward per slice
                out = np.concatenate([self.engine(s.kspace[None], s.mask, self._acs(s)) for s in group])
        dt = time.perf_counter() - t0
        self.stats.model_seconds += dt
        self._log_series(group[0], dt / len(group))
        return out

    def _acs(self, sl: SliceData) -> Optional[int]:
        if self.config.acs_source == "flags" and sl.num_calibration:
            return sl.num_calibration
        if not sl.mask[sl.mask.size // 2]:
            raise ReconError(f"{self.source}: slice {sl.key_dict()} has no calibration (ACS) lines: no line is "
                             "flagged as calibration and the k-space centre line was not acquired")
        return None  # the model detects it from the mask (fastMRI's rule)

    def _image(self, sl: SliceData, magnitude: np.ndarray):
        crop = np.ascontiguousarray(center_crop_at_most(magnitude, self.encoding.recon_size), dtype=np.float32)
        comments = [f"E2E-VarNet ({self.config.mode})", f"lines {int(sl.mask.sum())}/{sl.mask.size}"]
        if sl.incomplete:
            self.stats.incomplete += 1
            comments.append("reconstructed at end of stream: slice was never marked complete")
        img = build_image(crop, sl.reference, self.encoding, self._next_index, self.options, comments=comments,
                          processing=("VARNET",) if self.config.mode == "varnet" else ("ZEROFILLED",))
        self._next_index += 1
        self.stats.slices += 1
        if self.stats.first_image_at is None:
            self.stats.first_image_at = time.perf_counter()
        return img

    def _log_series(self, sl: SliceData, seconds_per_slice: float) -> None:
        acs = sl.num_calibration if self.config.acs_source == "flags" else None
        self.stats.acs_counts.add(acs)
        if self._logged_series:
            log.debug("%s: slice %s reconstructed in %.3f s", self.source, sl.key_dict(), seconds_per_slice)
            return
        self._logged_series = True
        device = self.engine.device if self.engine else "cpu"
        accel = sl.mask.size / max(int(sl.mask.sum()), 1)
        log.info("%s: series %d, mode %s, model %s, device %s, k-space %s, acceleration %.2f, ACS %s, "
                 "%.3f s/slice", self.source, self.config.image_series_index, self.config.mode, self.model_id,
                 device, tuple(sl.kspace.shape), accel, acs if acs else "detected from mask", seconds_per_slice)


def _same_shape_groups(slices: list[SliceData]) -> list[list[SliceData]]:
    groups: dict[tuple, list[SliceData]] = {}
    for s in slices:
        groups.setdefault(s.kspace.shape, []).append(s)
    return list(groups.values())


def build_engine(config: ReconConfig) -> tuple[Optional[Reconstructor], str]:
    """Load the model once per process: ``(engine, description for logs)``; no engine in zero-filled mode."""
    if config.mode == "zero-filled":
        return None, "none (zero-filled)"
    from ..model.checkpoint import load_checkpoint
    from ..model.shipped import resolve_checkpoint

    loaded = load_checkpoint(resolve_checkpoint(config.checkpoint))  # none given: the shipped weights
    engine = Reconstructor(loaded.model, config.device, config.precision)
    return engine, f"{loaded.path} ({loaded.kind}, sha256 {loaded.sha256[:12]}, U-Nets in {config.precision})"
