"""Side-by-side comparison of reconstruction methods on the same undersampled data.

Methods (:data:`METHODS`):

* ``zero-filled`` — RSS of the inverse FFT of the undersampled k-space (fastMRI's baseline);
* ``sense`` — CG-SENSE (:mod:`gadget.baselines.sense`) with ESPIRiT maps (:mod:`gadget.baselines.espirit`);
* ``bart`` — BART ``ecalib`` + ``pics`` L1-wavelet (:mod:`gadget.baselines.bart`), when installed;
* ``varnet`` — E2E-VarNet from a checkpoint, via :func:`gadget.recon.fastmri_infer.reconstruct_volume`.

Inputs are fastMRI-layout files: test layout (undersampled ``kspace`` + ``mask``; ``varnet synth
--acceleration`` keeps the targets) or fully sampled files undersampled here with a fastMRI mask
seeded by the file name (as fastMRI's data transforms do). Every method sees the same k-space;
images are cropped to the header's recon size as in ``varnet infer`` and scored as in
:mod:`gadget.evaluation.scoring` (fastMRI semantics, mean over volumes). Timing: wall seconds per
slice, ESPIRiT included in ``sense``, BART's own calibration included in ``bart``.

Each input is a *source* (:mod:`gadget.evaluation.sources`): scores are reported per source and
pooled over all volumes (``all``). Several checkpoints give one ``varnet:NAME`` row each, all
scored on the same masks.
"""
from __future__ import annotations

import dataclasses

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..baselines.bart import BartConfig, BartError, INSTALL_HINT, find_bart, pics_l1
from ..baselines.espirit import EspiritConfig
from ..baselines.sense import SenseConfig
from ..data.fastmri_file import FastMRIVolume, open_volume
from ..data.mrd_header import EncodingInfo
from ..mri.masks import MaskSampler, MaskSpec, contiguous_center_lines
from ..mri.metrics import center_crop
from ..recon.fastmri_infer import acquired_mask, crop_size_for
from ..recon.refine import RefineConfig
from ..recon.safety import sense_image, zero_filled_rss
from .scoring import EvaluationError, fastmri_eval_crop, mean_std, resolve_target_key, score_volume
from .sources import POOLED, parse_checkpoints, parse_sources

log = logging.getLogger(__name__)

METHODS = ("zero-filled", "sense", "bart", "varnet")
_ALIASES = {"zero_filled": "zero-filled", "zf": "zero-filled", "cg-sense": "sense", "espirit": "sense"}


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"zero-filled,sense"`` or a list → validated canonical names, order kept, no duplicates."""
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    out = []
    for item in items:
        name = _ALIASES.get(item.strip().lower(), item.strip().lower())
        if name not in METHODS:
            raise ValueError(f"unknown method {item!r}; choose from {', '.join(METHODS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no methods given")
    return out


@dataclass(frozen=True)
class Undersample:
    """Undersample fully sampled files here: fastMRI mask ``kind`` with one ``acceleration`` and
    ``center_fraction``, seeded per file with ``tuple(map(ord, file_name))``."""

    acceleration: float
    center_fraction: float = 0.08
    kind: str = "equispaced-fraction"

    def sample(self, num_cols: int, name: str) -> tuple[np.ndarray, int]:
        spec = MaskSpec(self.kind, [self.center_fraction], [self.acceleration])
        return MaskSampler(spec)(num_cols, seed=tuple(map(ord, name)))


@dataclass
class Case:
    """One file prepared for every method. ``kspace`` complex64 ``(slice, coil, readout, phase)``
    with unsampled columns zeroed; ``mask`` bool ``(phase,)``; ``target`` float32 ``(slice, H, W)``."""

    path: Path
    kspace: np.ndarray
    mask: np.ndarray
    num_low: int
    target: np.ndarray
    target_key: str
    encoding: EncodingInfo
    attrs: dict
    slices: list[int]
    mask_source: str

    @property
    def name(self) -> str:
        return self.path.name

    def as_volume(self) -> FastMRIVolume:
        """An in-memory test-layout view for :func:`reconstruct_volume` (no file handle)."""
        attrs = dict(self.attrs, num_low_frequency=self.num_low)
        return FastMRIVolume(path=self.path, handle=None, kspace=self.kspace, encoding=self.encoding,
                             mask=self.mask, attrs=attrs)


def select_slices(num_slices: int, max_slices: Optional[int]) -> list[int]:
    """The middle ``max_slices`` slices (all when ``None``)."""
    if max_slices is None or max_slices >= num_slices:
        return list(range(num_slices))
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    start = (num_slices - max_slices) // 2
    return list(range(start, start + max_slices))


def load_case(path: str | Path, target_key: str = "auto", max_slices: Optional[int] = None,
              undersample: Optional[Undersample] = None) -> Case:
    """Read the selected slices, the target and the mask of one file (see the module docstring)."""
    path = Path(path)
    with open_volume(path) as vol:
        key = resolve_target_key(vol.handle, target_key, str(path))
        slices = select_slices(vol.num_slices, max_slices)
        sel = slice(slices[0], slices[-1] + 1)
        kspace = np.asarray(vol.kspace[sel], dtype=np.complex64)
        target = np.asarray(vol.handle[key][sel], dtype=np.float32)
        attrs = {k: v for k, v in vol.attrs.items()}
        if vol.mask is not None:
            if undersample is not None:
                raise EvaluationError(f"{path}: already undersampled (has 'mask'); drop the undersampling options")
            mask, source = acquired_mask(vol), "file"
            num_low = vol.num_low_frequency or contiguous_center_lines(mask)
        else:
            if undersample is None:
                raise EvaluationError(f"{path}: fully sampled (no 'mask'); give an acceleration (--acceleration) to undersample it")
            drawn, num_low = undersample.sample(kspace.shape[-1], path.name)
            probe = FastMRIVolume(path=path, handle=None, kspace=vol.kspace, encoding=vol.encoding, mask=drawn)
            mask = acquired_mask(probe)
            source = f"{undersample.kind} R={undersample.acceleration:g} cf={undersample.center_fraction:g}"
        encoding = vol.encoding
    kspace *= mask.astype(np.float32)
    return Case(path=path, kspace=kspace, mask=mask, num_low=int(num_low), target=target, target_key=key,
                encoding=encoding, attrs=attrs, slices=slices, mask_source=source)


# ----------------------------------------------------------------------------- methods


def _crop(images: np.ndarray, case: Case) -> np.ndarray:
    return np.ascontiguousarray(center_crop(images, crop_size_for(images.shape[-2:], case.encoding.recon_size)))


def zero_filled(case: Case) -> np.ndarray:
    """RSS of the zero-filled coil images (:func:`gadget.recon.safety.zero_filled_rss`), cropped → float32
    ``(slice, H, W)``."""
    return _crop(zero_filled_rss(case.kspace), case).astype(np.float32)


def sense(case: Case, espirit: EspiritConfig = EspiritConfig(), config: SenseConfig = SenseConfig()) -> np.ndarray:
    """ESPIRiT + CG-SENSE per slice (:func:`gadget.recon.safety.sense_image`), ``|x|`` cropped → float32
    ``(slice, H, W)``."""
    images = np.stack([sense_image(k, case.mask, case.num_low, espirit=espirit, config=config) for k in case.kspace])
    return _crop(images, case).astype(np.float32)


def bart(case: Case, config: BartConfig = BartConfig()) -> np.ndarray:
    """BART ESPIRiT + pics L1-wavelet per slice, ``|x|`` cropped → float32 ``(slice, H, W)``."""
    return _crop(np.stack([np.abs(pics_l1(k, config, case.num_low)) for k in case.kspace]), case).astype(np.float32)


def varnet(case: Case, engine, batch_size: int = 1) -> np.ndarray:
    """E2E-VarNet through the ``varnet infer`` path → float32 ``(slice, H, W)`` (already cropped)."""
    from ..recon.fastmri_infer import reconstruct_volume

    return reconstruct_volume(engine, case.as_volume(), batch_size)


# ----------------------------------------------------------------------------- driver

_SCORES = ("ssim", "psnr", "nmse")


@dataclass
class MethodResult:
    """Accumulates one method's scores over the volumes of one source."""

    method: str
    source: str = POOLED
    per_volume: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    slices: int = 0
    status: str = "ok"
    note: str = ""

    def row(self) -> dict:
        """Means over volumes (NaN for all three when the method failed: a partial mean would mislead)."""
        means = {m: mean_std(v[m] for v in self.per_volume)[0] if self.per_volume and self.status != "failed"
                 else math.nan for m in _SCORES}
        targets = ", ".join(sorted({v["target"] for v in self.per_volume}))
        return {"source": self.source, "method": self.method, **means,
                "seconds_per_slice": self.seconds / self.slices if self.slices else math.nan,
                "target": targets, "volumes": len(self.per_volume), "slices": self.slices,
                "status": self.status, "note": self.note, "per_volume": list(self.per_volume)}


def pooled(method: str, parts: Sequence[MethodResult]) -> MethodResult:
    """One method over every source: all volumes together (the mean is over volumes, not sources);
    failed when it failed on any source, skipped when skipped on all."""
    out = MethodResult(method, POOLED)
    for part in parts:
        out.per_volume += part.per_volume
        out.seconds += part.seconds
        out.slices += part.slices
    failed = [p for p in parts if p.status == "failed"]
    if failed:
        out.status = "failed"
        out.note = "; ".join(f"{p.source}: {p.note}" for p in failed) if len(parts) > 1 else failed[0].note
    elif parts and all(p.status == "skipped" for p in parts):
        out.status, out.note = "skipped", parts[0].note
    else:
        out.note = next((p.note for p in parts if p.status == "ok"), "")
    return out


def _load_engine(checkpoint, device: str, precision: Optional[str] = None, refine: RefineConfig = RefineConfig(),
                 refine_from_checkpoint: bool = False):
    """A :class:`Reconstructor` from a checkpoint path or a VarNet module (its mode is restored
    by the caller), followed by the refine stage (:class:`RefinedEngine`). Returns ``(engine, description,
    module_or_None, was_training)``. ``refine_from_checkpoint``: a checkpoint file's own refine mode replaces
    ``refine.mode``."""
    from ..recon.engine import Reconstructor
    from ..recon.refine_stage import RefinedEngine, Refiner

    if isinstance(checkpoint, torch.nn.Module):
        was_training = checkpoint.training
        if device == "auto":  # stay where the caller keeps the model (e.g. its training GPU)
            device = next(checkpoint.parameters()).device
        engine, desc, module = Reconstructor(checkpoint, device, precision), "model passed in", checkpoint
    else:
        from ..model.checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint)
        if refine_from_checkpoint:
            from ..model.checkpoint import resolve_refine

            refine = dataclasses.replace(refine, mode=resolve_refine("auto", loaded)[0])
        engine, module, was_training = Reconstructor(loaded.model, device, precision), None, False
        desc = f"{Path(loaded.path).name} (sha256 {loaded.sha256[:12]})"
    if engine.model.precision != "fp32":
        desc += f", U-Nets in {engine.model.precision}"
    if refine.mode == "none":
        desc += ", no refine"
    return RefinedEngine(engine, Refiner(refine, engine.device)), desc, module, was_training


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their ``*.h5`` files (sorted); ``NAME=PATH`` accepted."""
    return [f for src in parse_sources(inputs) for f in src.files]


def compare_methods(files, methods: str | Sequence[str] = METHODS, checkpoint=None, *,
                    out_dir: Optional[str | Path] = None, max_slices: Optional[int] = None,
                    undersample: Optional[Undersample] = None, target_key: str = "auto",
                    espirit: EspiritConfig = EspiritConfig(), sense_config: SenseConfig = SenseConfig(),
                    bart_config: BartConfig = BartConfig(), device: str = "auto", batch_size: int = 1,
                    precision: Optional[str] = None, refine: RefineConfig = RefineConfig(),
                    refine_from_checkpoint: bool = False,
                    progress: Optional[Callable[[str, str], None]] = None) -> list[dict]:
    """Run ``methods`` on every file of every source and score them, per source and pooled.

    Args:
        files: the sources (:func:`gadget.evaluation.sources.parse_sources`): fastMRI-layout ``.h5``
            files or directories of them, each one source named by its directory name or file stem;
            ``"NAME=PATH"`` or ``(name, path)`` names it; a mapping ``{name: path(s)}`` too.
        methods: names from :data:`METHODS` (list or comma-separated string).
        checkpoint: E2E-VarNet checkpoint path, or a VarNet ``nn.Module`` (e.g. from a training
            loop; its train/eval mode is restored afterwards) → row ``varnet``; or several, as a
            mapping ``{name: path or module}`` or a list of ``"NAME=PATH"`` → rows ``varnet:NAME``
            (:func:`gadget.evaluation.sources.parse_checkpoints`). ``None`` skips ``varnet``.
        out_dir: when given, write ``results.md``, ``results.csv`` and ``figure.png`` there.
        max_slices: score only the middle ``max_slices`` slices of each file.
        undersample: mask for fully sampled files (test-layout files use their own mask).
        target_key: ``auto`` (noise-free target when present, else ``reconstruction_rss``) or a key.
        device, batch_size: for E2E-VarNet (``auto`` with a module: the module's own device).
        precision: the U-Nets' arithmetic for E2E-VarNet (``None``: the model's, fp32 when loaded).
        refine: the refinement of E2E-VarNet's images (:mod:`gadget.recon.refine`; default on).
        refine_from_checkpoint: each checkpoint file's own refine mode
            (:func:`gadget.model.checkpoint.default_refine`) replaces ``refine.mode`` (``--refine auto``);
            a module passed in keeps ``refine``.
        progress: called as ``progress(method, file_name)`` before each reconstruction.

    Returns:
        One dict per method row (``varnet`` expanded per checkpoint), pooled over all sources:
        ``source`` (``"all"``), ``method``, ``ssim``, ``psnr``, ``nmse`` (means over volumes; NaN
        when not run or failed), ``seconds_per_slice``, ``target`` (dataset(s) scored against),
        ``volumes``, ``slices``, ``status`` (``ok`` | ``skipped`` | ``failed``), ``note`` (why),
        ``per_volume`` (list of ``{source, file, ssim, psnr, nmse, target}``) and ``by_source``
        (the same dicts, without ``by_source``, for each source in order). A method that fails
        on a file is not run on the rest of that source, but is on the other sources.
    """
    methods = parse_methods(methods)
    sources = parse_sources(files)
    models = parse_checkpoints(checkpoint) if "varnet" in methods else []
    row_names: list[str] = []
    for m in methods:
        row_names += [name for name, _ in models] if m == "varnet" and models else [m]
    results = {row: {s.name: MethodResult(row, s.name) for s in sources} for row in row_names}

    def mark(row: str, status: str, note: str) -> None:
        for res in results[row].values():
            res.status, res.note = status, note

    runners: dict[str, Callable[[Case], np.ndarray]] = {
        "zero-filled": zero_filled,
        "sense": lambda c: sense(c, espirit, sense_config),
        "bart": lambda c: bart(c, bart_config),
    }
    if "bart" in results and find_bart(bart_config.binary) is None:
        mark("bart", "skipped", f"'{bart_config.binary}' not found on PATH; {INSTALL_HINT}")
    if "varnet" in methods and not models:
        mark("varnet", "skipped", "no checkpoint given (--checkpoint)")
    restore = []
    figure = None
    try:
        for row, ckpt in models:
            engine, desc, module, was_training = _load_engine(ckpt, device, precision, refine, refine_from_checkpoint)
            if module is not None:
                restore.append((module, was_training))
            runners[row] = lambda c, engine=engine: varnet(c, engine, batch_size)
            mark(row, "ok", desc)
        for src in sources:
            for path in src.files:
                case = load_case(path, target_key, max_slices, undersample)
                log.info("%s/%s: slices %d-%d, %d of %d lines (%s), ACS %d, target %s", src.name, case.name,
                         case.slices[0], case.slices[-1], int(case.mask.sum()), case.mask.size, case.mask_source,
                         case.num_low, case.target_key)
                images = {}
                for name in row_names:
                    res = results[name][src.name]
                    if res.status != "ok":
                        continue
                    if progress:
                        progress(name, case.name)
                    start = time.perf_counter()
                    try:
                        recon = runners[name](case)
                    except (BartError, ValueError, RuntimeError) as exc:
                        log.error("%s failed on %s/%s: %s", name, src.name, case.name, exc)
                        res.status, res.note = "failed", f"{case.name}: {exc}"
                        continue
                    res.seconds += time.perf_counter() - start
                    res.slices += len(case.slices)
                    res.per_volume.append({"source": src.name, "file": case.name, "target": case.target_key,
                                           **score_volume(case.target, recon)})
                    images[name] = recon
                if figure is None and images:
                    figure = _figure_data(case, images)
    finally:
        for module, was_training in restore:
            module.train(was_training)
    rows = []
    for name in row_names:
        parts = [results[name][s.name] for s in sources]
        rows.append(dict(pooled(name, parts).row(), by_source=[p.row() for p in parts]))
    if out_dir is not None:
        from .report import write_report

        mask_note = ("each file's own mask" if undersample is None else
                     f"{undersample.kind} mask, R={undersample.acceleration:g}, center fraction "
                     f"{undersample.center_fraction:g}, seeded by file name")
        write_report(out_dir, rows, figure, sources={s.name: [p.name for p in s.files] for s in sources},
                     mask_note=mask_note)
    return rows


def _figure_data(case: Case, images: dict[str, np.ndarray]) -> dict:
    """The middle selected slice of ``case``: truth and each method, cropped as for scoring."""
    mid = len(case.slices) // 2
    truth = case.target[mid:mid + 1]
    return {"file": case.name, "slice": case.slices[mid], "target_key": case.target_key,
            "truth": fastmri_eval_crop(truth, truth)[0][0],
            "images": {n: fastmri_eval_crop(truth, im[mid:mid + 1])[1][0] for n, im in images.items()}}
