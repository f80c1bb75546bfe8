"""The shared streaming pipeline, as generator stages over ``(header, items)``:

    items ─▶ as_lines ─▶ prewhiten ─▶ assemble slices ─▶ reconstruct (batched) ─▶ images

and per network image (``reconstruct``): the engine's forward ─▶ refine (:class:`Refiner`) ─▶ safety check.
With ``workers`` > 1 those three run for that many batches side by side (each on its share of the CPU
threads, :func:`gadget.mri.parallel.in_workers`); the images are built on the calling thread, in stream order.

``items`` may hold ``AcqLine``s, ``ismrmrd.Acquisition``s (converted) and anything else
(waveforms, images from upstream gadgets), which passes through unchanged. Every door
(Gadgetron external gadget, MRD server, file replay) is: a source of items + header, this
pipeline, a sink.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ..data.mrd_header import EncodingInfo, parse_encoding
from ..mri.masks import AcsLinesError, acs_lines
from ..mri.metrics import center_crop_at_most
from ..mri.parallel import in_workers
from ..stream.assemble import SliceAssembler, SliceData
from ..stream.budget import MemoryBudget
from ..stream.images import ImageOptions, SeriesScale, build_image
from ..stream.noise import prewhiten, receiver_noise_bandwidth
from ..stream.types import AcqLine
from .coil_compression import CompressionError, compress
from .config import ConfigError, ReconConfig
from .engine import Reconstructor
from .refine import PositionCalibrations
from .refine_stage import Refiner
from .safety import safety_figures, sense_image, zero_filled_rss

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
    model_seconds: float = 0.0    # the network's forwards and the refine stage
    passthrough: int = 0
    first_image_at: Optional[float] = None
    acs_counts: set = field(default_factory=set)
    flagged: int = 0              # network images the safety check flagged
    safety_seconds: float = 0.0   # safety checks and fallbacks, without the check's network re-run (in model_seconds)


class ScanReconstructor:
    """Reconstructs one scan (one connection / one file). The engine (model) is shared and
    loaded once per process; this object holds only per-scan state, and the stages after the network:
    the refinement (``refiner``; None: the one ``config`` asks for, :meth:`Refiner.for_config`) and the
    safety check."""

    def __init__(self, header_xml: str, config: ReconConfig, engine: Optional[Reconstructor] = None,
                 source: str = "scan", model_id: str = "none", budget: Optional[MemoryBudget] = None,
                 encoding: Optional[EncodingInfo] = None, refiner: Optional[Refiner] = None):
        if config.mode == "varnet" and engine is None:
            raise ValueError("mode 'varnet' needs a loaded model (engine)")
        # ``encoding``: the header already parsed by the door (it is parsed here otherwise)
        self.encoding: EncodingInfo = encoding or parse_encoding(header_xml, source=source)
        self.config, self.engine, self.source = config, engine, source
        self.refiner = refiner if refiner is not None or engine is None else Refiner.for_config(config, engine)
        self.calibrations = PositionCalibrations()  # the refine's ESPIRiT, once per slice position of this scan
        self.series = _output_series(config)
        self.stats = ScanStats()
        # relative receiver noise bandwidth: the header's, else the config's (gadget/stream/noise.py)
        self.noise_bandwidth, _ = receiver_noise_bandwidth(header_xml, config.noise_bandwidth_ratio, source)
        # a door's reader may land samples in its rows; ``budget`` bounds the k-space all scans hold
        self.assembler = SliceAssembler(self.encoding, budget=budget, owner=source)
        self.notes: list[str] = []  # warnings for the peer (doors send them as TEXT where allowed)
        self._logged_series = False
        self._stats_lock = threading.Lock()  # the workers' stages add to ``stats`` side by side
        self.reader_thread = None  # set by gadget/recon/overlap.py when the per-line half runs on its own thread
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
        for item in prewhiten(as_lines(items), self.config.prewhiten, self.noise_bandwidth,
                              self.config.noise_units):
            if isinstance(item, AcqLine):
                yield from assembler.add(item)
            else:
                self.stats.passthrough += 1
                yield item
        leftovers = assembler.flush()
        if leftovers and not self.config.reconstruct_incomplete:
            self.note(f"{len(leftovers)} slices never marked complete were dropped (reconstruct_incomplete=false)")
            return
        if leftovers:
            self.note(f"{len(leftovers)} slices were never marked complete (no LAST_IN_SLICE flag); "
                       "reconstructed at end of stream")
        if assembler.seen == 0:
            self.note("the scan contained no imaging acquisitions; nothing to reconstruct")
        yield from leftovers

    def reconstruct(self, stream: Iterable[Any]) -> Iterator[Any]:
        """The per-slice half: :class:`SliceData` → images in batches of ``batch_size``; other items
        pass through, in stream order. ``config.workers`` batches are reconstructed side by side (the
        network, refine and safety check: :meth:`_computed`); their images are built here."""
        for unit, computed in in_workers(self._computed, self._units(stream), self.config.workers):
            if computed is None:
                yield unit
                continue
            yield from self._built(computed)
            for sl in unit:  # their images are built: the assembler may reuse the k-space memory
                self.assembler.recycle(sl)

    def _units(self, stream: Iterable[Any]) -> Iterator[Any]:
        """The stream as units of work: a batch (list) of prepared slices, or a pass-through item."""
        pending: list[SliceData] = []
        compressed_log: list[str] = []  # coil compression is logged once per scan
        for item in stream:
            if not isinstance(item, SliceData):
                yield item
                continue
            pending.append(self.prepared(item, compressed_log))
            if len(pending) >= self.config.batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    def prepared(self, sl: SliceData, logged: Optional[list[str]] = None) -> SliceData:
        """``sl`` as the network receives it: with ``coil_compression`` virtual coils when that is set and
        the slice has more coils; else ``sl`` itself."""
        if 0 < self.config.coil_compression < sl.kspace.shape[0]:
            return self._compressed(sl, [] if logged is None else logged)
        return sl

    def _compressed(self, sl: SliceData, logged: list[str]) -> SliceData:
        """``sl`` with ``coil_compression`` virtual coils (gadget/recon/coil_compression.py; the matrix from
        the slice's own centre run of sampled lines). The original k-space goes back to the assembler at
        once; the compressed one owns its memory and is never recycled."""
        try:
            out, matrix, energy = compress(sl, self.config.coil_compression)
        except CompressionError as exc:
            raise ReconError(f"{self.source}: slice {sl.key_dict()}: coil compression: {exc}") from None
        self.assembler.recycle(sl)
        text = f"coil compression {matrix.shape[1]} -> {matrix.shape[0]} coils, energy kept {100 * energy:.2f}%"
        if not logged:
            logged.append(text)
            log.info("%s: %s (slice %s; per slice from its calibration region)", self.source, text, sl.key_dict())
        else:
            log.debug("%s: slice %s: %s", self.source, sl.key_dict(), text)
        return out

    def note(self, text: str) -> None:
        """A warning for the log and the peer (doors send ``notes`` as TEXT where the dialect allows)."""
        log.warning("%s: %s", self.source, text)
        self.notes.append(text)

    # ------------------------------------------------------------------ stages

    def _computed(self, unit: Any) -> tuple[Any, Optional[list["_Slice"]]]:
        """``(unit, its slices' results and safety checks)`` for a batch, ``(unit, None)`` for a
        pass-through item. Safe to run for several units at once."""
        if not isinstance(unit, list):
            return unit, None
        out = []
        for group in _same_shape_groups(unit):
            for sl, result in zip(group, self._reconstruct(group)):
                comments = [f"E2E-VarNet ({self.config.mode})", f"lines {int(sl.mask.sum())}/{sl.mask.size}"]
                checked = self._checked(sl, result, comments) if result.method == "varnet" else None
                out.append(_Slice(sl, result, comments, checked))
        return unit, out

    def _built(self, computed: list["_Slice"]) -> Iterator[Any]:
        """The images (and ``also_send``'s) of slices through :meth:`_computed`, in their order."""
        for done in computed:
            yield self._image(done)
            if self.config.also_send != "none":
                yield self._conventional_image(done.data, done.result)

    def _reconstruct(self, group: list[SliceData]) -> list["_Result"]:
        """One :class:`_Result` per slice (magnitudes ``(readout, phase)`` float32, uncropped): the
        network for undersampled slices (one forward per distinct mask and ACS count), its image finished
        by the refine stage (``final_kspace`` stays the network's), the RSS coil
        combination for fully sampled ones and in zero-filled mode. A slice with a separate reference
        (``calibration_kspace``) is batched only with others that have one, and the network's sensitivity
        module reads the stacked references instead of the imaging k-space."""
        t0 = time.perf_counter()
        results: list[Optional[_Result]] = [None] * len(group)
        batches: dict[tuple, list[int]] = {}
        accels = [self.acceleration(sl) for sl in group]
        for i, (sl, accel) in enumerate(zip(group, accels)):
            if self.config.mode == "zero-filled":
                results[i] = _Result(zero_filled_rss(sl.kspace), "zero-filled", accel)
            elif accel < self.config.fully_sampled_below:
                results[i] = _Result(zero_filled_rss(sl.kspace), "fully-sampled", accel)
                log.info("%s: slice %s sampled at acceleration %.2f (< %g): sent as the RSS coil combination of "
                         "its data, not the network's", self.source, sl.key_dict(), accel,
                         self.config.fully_sampled_below)
            else:
                separate = sl.calibration_kspace is not None
                batches.setdefault((sl.mask.tobytes(), self.acs_count(sl), separate), []).append(i)
        for (_, acs, separate), members in batches.items():
            kspace = np.stack([group[i].kspace for i in members])
            extra = {"sens_kspace": np.stack([group[i].calibration_kspace for i in members])} if separate else {}
            mask = group[members[0]].mask
            coils = self.refiner.mode != "none"  # the refine's prior reads the network's final coil images
            if coils:
                extra["coil_images"] = True
            images, finals, *rest = self.engine.run(kspace, mask, acs, **extra)
            images = self.refiner(images, finals, kspace, mask, acs, [group[i].position for i in members],
                                  self.calibrations, rest[0] if coils else None)
            for j, i in enumerate(members):
                results[i] = _Result(images[j], "varnet", accels[i], acs, finals[j])
        dt = time.perf_counter() - t0
        with self._stats_lock:
            self.stats.model_seconds += dt
            self._log_series(group[0], results[0], dt / len(group))
        return results

    def acceleration(self, sl: SliceData) -> float:
        """Lines in the header's acquired phase range over the lines measured there (inf: none). Imaging
        lines only: a separate reference is not in ``sl.mask``."""
        left, right = self.encoding.padding
        left, right = max(left, 0), min(right, sl.mask.size)
        acquired = sl.mask[left:right] if right > left else sl.mask
        n = int(acquired.sum())
        return acquired.size / n if n else float("inf")

    def acs_count(self, sl: SliceData) -> int:
        """ACS lines for the sensitivity network, always explicit: the calibration-flagged lines; where
        none are flagged (or ``acs_source: mask``) the run of sampled columns containing the k-space
        centre column (fastMRI's ``2*min(left, right)`` detection gives 1 for a full mask and under-counts
        odd or asymmetric blocks). With a separate reference (``calibration_kspace``) always the reference's
        line count (whatever ``acs_source``: the sensitivities come from the reference, not the mask). The
        rule is :func:`gadget.mri.masks.acs_lines`; its errors come back naming the scan and the slice."""
        separate = sl.calibration_kspace is not None
        given = sl.num_calibration if separate or self.config.acs_source == "flags" else None
        try:
            return acs_lines(sl.mask, given, required=separate, fallback="run")
        except AcsLinesError as exc:
            if exc.reason == "missing":
                raise ReconError(f"{self.source}: slice {sl.key_dict()}: the separate reference lines do not "
                                 "cover the k-space centre column; no calibration (ACS) lines for the "
                                 "sensitivities") from None
            raise ReconError(f"{self.source}: slice {sl.key_dict()} has no calibration (ACS) lines: no line is "
                             "flagged as calibration and the k-space centre line was not acquired") from None

    def _image(self, done: "_Slice"):
        sl, result, comments = done.data, done.result, list(done.comments)
        processing: tuple[str, ...] = ("ZEROFILLED",)
        magnitude, output, extra = result.magnitude, "zero-filled RSS", {}
        if result.method == "fully-sampled":
            processing, output = ("RSS",), "RSS coil combination (fully sampled)"
            comments.append(f"fully sampled (acceleration {result.acceleration:.2f}): RSS coil combination of the "
                            "measured data, not the network")
        elif result.method == "varnet":
            magnitude, output, processing, extra = done.checked
        extra["VarNetOutput"] = output
        if sl.incomplete:
            self.stats.incomplete += 1
            comments.append("reconstructed at end of stream: slice was never marked complete")
        img = self._build(self.series[0], sl, magnitude, comments, processing, extra)
        self.stats.slices += 1
        if self.stats.first_image_at is None:
            self.stats.first_image_at = time.perf_counter()
        return img

    def _conventional_image(self, sl: SliceData, result: "_Result"):
        """The ``also_send`` series' image of a slice: zero-filled RSS, or ESPIRiT + CG-SENSE."""
        kind = self.config.also_send
        comments = [f"conventional reconstruction ({kind}) for side-by-side reading",
                    f"lines {int(sl.mask.sum())}/{sl.mask.size}"]
        if kind == "sense":
            try:
                image = sense_image(sl.kspace, sl.mask, result.acs or self.acs_count(sl), sl.calibration_kspace)
                return self._build(self.series[1], sl, image, comments, ("CGSENSE",),
                                   {"VarNetOutput": "CG-SENSE (ESPIRiT)"})
            except ValueError as exc:  # ESPIRiT needs >= 2 centre lines
                self.note(f"slice {sl.key_dict()}: CG-SENSE image impossible ({exc}); zero-filled sent in its series")
                comments.append(f"CG-SENSE impossible ({exc}): zero-filled RSS instead")
        return self._build(self.series[1], sl, zero_filled_rss(sl.kspace), comments, ("ZEROFILLED",),
                           {"VarNetOutput": "zero-filled RSS"})

    def _build(self, series: "_Series", sl: SliceData, magnitude: np.ndarray, comments: list[str],
               processing: tuple[str, ...], extra: dict):
        """An image of ``series``, cropped to the recon matrix, with the series' scale and window."""
        crop = np.ascontiguousarray(center_crop_at_most(magnitude, self.encoding.recon_size), dtype=np.float32)
        clipped_before = series.scale.clipped
        img = build_image(crop, sl.reference, self.encoding, series.next_index, series.options, comments=comments,
                          processing=processing, extra_meta=extra, series=series.scale)
        series.next_index += 1
        if series.scale.clipped > clipped_before and not clipped_before:
            self.note(f"series {series.options.image_series_index}: slice {sl.key_dict()} is brighter than the "
                      f"series' uint16 scale allows; {series.scale.clipped - clipped_before} pixels clip at "
                      f"{series.options.uint16_max} (later slices may clip too; set uint16_scale to choose the scale)")
        return img

    def _checked(self, sl: SliceData, result: "_Result", comments: list[str]):
        """The safety check of one network image (gadget/recon/safety.py): ``(magnitude to send, what it
        is, ImageProcessingHistory, extra meta)``; a flagged slice gets the configured fallback."""
        cfg = self.config
        t0 = time.perf_counter()
        forward_seconds = 0.0

        reference = {} if sl.calibration_kspace is None else {"sens_kspace": sl.calibration_kspace[None]}

        def run(*args, **kwargs):  # the check's own network forward counts as model time, not check time
            nonlocal forward_seconds
            start = time.perf_counter()
            try:
                return self.engine.run(*args, **reference, **kwargs)
            finally:
                forward_seconds = time.perf_counter() - start
                with self._stats_lock:
                    self.stats.model_seconds += forward_seconds

        figures = safety_figures(sl.kspace, sl.mask, result.acs, result.magnitude, result.final_kspace,
                                 self.encoding.recon_size, run=run)
        extra = {"VarNetConsistency": f"{figures.consistency:.6g}", "VarNetDeparture": f"{figures.departure:.6g}",
                 "VarNetPrediction": "n/a" if figures.prediction is None else f"{figures.prediction:.6g}"}
        exceeded = figures.exceeds(cfg.safety_consistency_max, cfg.safety_departure_max, cfg.safety_prediction_max)
        log.info("%s: slice %s safety: prediction %s (max %g), consistency %.4f (max %g), departure %.4f (max %g)%s",
                 self.source, sl.key_dict(), extra["VarNetPrediction"], cfg.safety_prediction_max,
                 figures.consistency, cfg.safety_consistency_max, figures.departure, cfg.safety_departure_max,
                 ": FLAGGED" if exceeded else "")
        magnitude, output, processing = result.magnitude, "E2E-VarNet", ("VARNET",)
        if not exceeded:
            extra["VarNetSafety"] = "pass"
            comments.append(f"safety check passed (prediction {extra['VarNetPrediction']}, consistency "
                            f"{figures.consistency:.3f}, departure {figures.departure:.3f})")
            with self._stats_lock:
                self.stats.safety_seconds += time.perf_counter() - t0 - forward_seconds
            return magnitude, output, processing, extra
        with self._stats_lock:
            self.stats.flagged += 1
        extra["VarNetSafety"] = "flagged"
        fallback = cfg.fallback
        if fallback == "sense":
            try:
                magnitude = sense_image(sl.kspace, sl.mask, result.acs, sl.calibration_kspace)
                output, processing = "CG-SENSE (ESPIRiT) fallback", ("VARNET", "SAFETYFLAG", "CGSENSE")
            except ValueError as exc:  # ESPIRiT needs >= 2 centre lines
                log.warning("%s: slice %s: CG-SENSE fallback impossible (%s); zero-filled sent", self.source,
                            sl.key_dict(), exc)
                fallback = "zero-filled"
        if fallback == "zero-filled":
            magnitude, output, processing = zero_filled_rss(sl.kspace), "zero-filled RSS fallback", \
                ("VARNET", "SAFETYFLAG", "ZEROFILLED")
        elif fallback == "none":
            output, processing = "E2E-VarNet (flagged)", ("VARNET", "SAFETYFLAG")
        flag = (f"SAFETY FLAG: the network image departs from the measured data ({'; '.join(exceeded)}); "
                f"sent: {output}")
        comments.append(flag)
        self.note(f"slice {sl.key_dict()}: {flag}")
        with self._stats_lock:
            self.stats.safety_seconds += time.perf_counter() - t0 - forward_seconds
        return magnitude, output, processing, extra

    def _log_series(self, sl: SliceData, result: "_Result", seconds_per_slice: float) -> None:
        """Once per scan the series' setup, later each slice's time (under ``_stats_lock``)."""
        acs = result.acs
        self.stats.acs_counts.add(acs)
        if self._logged_series:
            log.debug("%s: slice %s reconstructed in %.3f s", self.source, sl.key_dict(), seconds_per_slice)
            return
        self._logged_series = True
        device = self.engine.device if self.engine else "cpu"
        if sl.calibration_kspace is not None:
            source = "separate reference lines"
        elif self.config.acs_source == "flags" and sl.num_calibration:
            source = "calibration flags"
        else:
            source = "centre run of the mask"
        log.info("%s: series %d, mode %s, model %s, refine %s, device %s, k-space %s, acceleration %.2f, "
                 "ACS %s, %.3f s/slice", self.source, self.config.image_series_index, self.config.mode,
                 self.model_id, self.refiner.mode if self.refiner else "none", device, tuple(sl.kspace.shape),
                 result.acceleration,
                 f"{acs} ({source})" if acs else "none (no network)", seconds_per_slice)


UINT16_HEADROOM = 2.0  # a uint16 series' scale maps the first slice's maximum to uint16_max / 2


@dataclass
class _Series:
    """One output series: how its images are encoded, its shared scale and window, its image counter."""
    options: ImageOptions
    scale: SeriesScale
    next_index: int = 1


def _output_series(config: ReconConfig) -> list[_Series]:
    """The network's series (``image_series_index``) and, with ``also_send``, the conventional one
    (``image_series_index + 1``): each with one intensity scale and window (gadget/stream/images.py)."""
    kinds = [("", "")] + ([(f" ({config.also_send})", "ZF" if config.also_send == "zero-filled" else "SENSE")]
                          if config.also_send != "none" else [])
    out = []
    for n, (description, suffix) in enumerate(kinds):
        options = ImageOptions(dtype=config.image_dtype, uint16_max=config.uint16_max,
                               dither_sigma=config.dither_sigma,
                               series_description=config.series_description + description,
                               sequence_description_additional="_".join(
                                   p for p in (config.sequence_description_additional, suffix) if p),
                               image_series_index=config.image_series_index + n)
        out.append(_Series(options, SeriesScale(config.uint16_scale, UINT16_HEADROOM)))
    return out


@dataclass
class _Result:
    magnitude: np.ndarray                      # float32 (readout, phase), uncropped
    method: str                                # varnet | fully-sampled | zero-filled
    acceleration: float
    acs: Optional[int] = None                  # ACS lines given to the network
    final_kspace: Optional[np.ndarray] = None  # the network's final k-space (coil, readout, phase)


@dataclass
class _Slice:
    """A slice through the workers' stages: its result, the image comments so far, and the safety check's
    ``(magnitude, output, processing, extra)`` (network images only)."""
    data: SliceData
    result: _Result
    comments: list
    checked: Optional[tuple] = None


def _same_shape_groups(slices: list[SliceData]) -> list[list[SliceData]]:
    groups: dict[tuple, list[SliceData]] = {}
    for s in slices:
        groups.setdefault(s.kspace.shape, []).append(s)
    return list(groups.values())


def build_engine(config: ReconConfig, offline: bool = False) -> tuple[Optional[Reconstructor], str]:
    """Load the model once per process: ``(engine, description for logs)``; no engine in zero-filled mode.
    The engine keeps the refine the checkpoint records (``checkpoint_refine``), which a scan's refine stage
    takes for ``refine: auto`` (:meth:`Refiner.for_config`); ``config.refine`` as this checkpoint resolves it
    is logged here once (:func:`gadget.model.checkpoint.resolve_refine`). ``offline``: the door reads a
    whole scan before reconstructing it (replay), which per-scan adaptation (``adapt: solve | scan``) needs; the
    streaming doors refuse that setting here."""
    if config.adapt != "none" and not offline:
        raise ConfigError(f"adapt '{config.adapt}' needs the whole scan before its first image: it is for the "
                          "offline doors (varnet replay, varnet infer), not for streaming servers or Gadgetron chains")
    if config.adapt != "none" and config.mode != "varnet":
        raise ConfigError(f"adapt '{config.adapt}' adapts the network: it needs mode 'varnet', not '{config.mode}'")
    if config.adapt == "solve" and not config.calibrates_solve:
        raise ConfigError(f"adapt 'solve' chooses the cs refine's weights on each scan: it needs refine 'auto', "
                          f"not '{config.refine}'")
    if config.mode == "zero-filled":
        return None, "none (zero-filled)"
    from ..model.checkpoint import default_refine, load_checkpoint, resolve_refine
    from ..model.shipped import resolve_checkpoint
    from .allocator import keep_freed_memory

    keep_freed_memory()  # before the load starts torch's threads: a thread keeps the malloc arena it first gets
    loaded = load_checkpoint(resolve_checkpoint(config.checkpoint))  # none given: the shipped weights
    resolve_refine(config.refine, loaded)  # logged once; each scan's stage applies it (Refiner.for_config)
    engine = Reconstructor(loaded.model, config.device, config.precision,
                           checkpoint_refine=default_refine(loaded)[0], forwards=config.workers)
    return engine, f"{loaded.path} ({loaded.kind}, sha256 {loaded.sha256[:12]}, U-Nets in {config.precision})"
