"""Adaptation as the doors use it: per scan (``adapt: solve | scan`` in ``varnet infer`` / ``varnet replay``)
and per site (``varnet adapt`` → a checkpoint with its provenance)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from ..model.checkpoint import LoadedCheckpoint, default_refine, save_checkpoint
from ..model.varnet import VarNet
from ..recon.refine_stage import Refiner
from .adapt import AdaptConfig, AdaptResult, AdaptSlice, adapt, adapted_model
from .solve_calibration import CalibrationConfig, CalibrationResult, calibrate_solve

log = logging.getLogger(__name__)

PROVENANCE_KEY = "adaptation"


def scan_settings(steps: int, time_limit: float) -> AdaptConfig:
    """The per-scan adaptation's settings: the defaults of :class:`AdaptConfig` with the operator's
    ``adapt_steps`` and ``adapt_time_limit`` (seconds, 0 = none)."""
    return AdaptConfig(steps=steps, time_limit=time_limit)


def adapt_scan(model: VarNet, slices: Sequence[AdaptSlice], settings: AdaptConfig, source: str,
               device: str = "cpu", workers: int = 1) -> tuple[VarNet, AdaptResult]:
    """``model`` adapted on one scan's own slices (``workers``: :func:`adapt`'s), logged: steps, Γ loss
    before/after and time. When the Γ loss did not fall, the start weights come back (and the log says so)."""
    t0 = time.perf_counter()
    result = adapt(model, slices, settings, device=device, workers=workers,
                   on_score=lambda e: log.info("%s: adapt step %d: Γ loss %.5g (%.1f s)", source, e["step"],
                                               e["gamma"], e["seconds"]))
    log.info("%s: adapted on its own lines: %s; %.1f s in all", source, result.summary(),
             time.perf_counter() - t0)
    if not result.improved:
        log.warning("%s: adaptation did not lower the held-back (Γ) loss; the start weights are used", source)
        return model, result
    return adapted_model(model, result), result


def adapted_engine(engine, slices: Sequence[AdaptSlice], settings: AdaptConfig, source: str):
    """``(engine, result)``: an engine running ``engine``'s model adapted on ``slices`` (:func:`adapt_scan`)
    on the same device (:meth:`with_model`: the same refine stage where ``engine`` has one, the same
    checkpoint refine), the splits side by side on as many workers as the engine admits forwards;
    ``engine`` itself when the Γ loss did not fall."""
    model, result = adapt_scan(engine.model, slices, settings, source, device=engine.device,
                               workers=getattr(engine, "forwards", 1))
    if model is engine.model:
        return engine, result
    return engine.with_model(model), result


@dataclass
class ScanAdaptation:
    """What per-scan adaptation (``adapt: solve | scan``) made for one scan: ``network``, the engine to run
    (the start's, or one with weights adapted on the scan: ``weights``, None with ``solve``), and
    ``refiner``, the ``cs`` refine with weights chosen on the scan's own lines (``solve``)."""

    network: object
    refiner: Optional[Refiner] = None
    solve: Optional[CalibrationResult] = None
    weights: Optional[AdaptResult] = None

    def summary(self) -> str:
        parts = []
        if self.weights is not None:
            kept = "" if self.weights.improved else "; the start weights were kept"
            parts.append(f"weights: {self.weights.summary()}{kept}")
        if self.solve is not None:
            parts.append(f"cs refine: {self.solve.summary()}")
        return "; ".join(parts)


def adapt_to_scan(network, slices: Sequence[AdaptSlice], mode: str, settings: AdaptConfig,
                  calibration: Optional[CalibrationConfig], source: str) -> ScanAdaptation:
    """Per-scan adaptation of ``network`` (a :class:`gadget.recon.engine.Reconstructor`) on one scan's
    ``slices``: the ``cs`` refine's weights calibrated on the scan's lines (:func:`calibrate_solve`;
    ``calibration`` None: not; where it is not used, ``refiner`` is None and the door keeps its own
    refine). With ``mode`` ``scan`` the network's weights are adapted (:func:`adapt_scan`) where the cs
    refine is not used: the held-out lines validated the cs refine together with the loaded weights'
    image as its start and prior, not with weights adapted afterwards (which have been trained on the
    lines the folds held back), and an adapted prior under the chosen λ and μ lost several dB in-head on
    the real brain (docs/results/adaptation.md)."""
    if mode not in ("solve", "scan") or (mode == "solve" and calibration is None):
        raise ValueError(f"per-scan adaptation is solve (with a calibration) or scan, got {mode!r}")
    solve = refiner = None
    if calibration is not None:
        solve = calibrate_solve(network, slices, calibration,
                                on_fold=lambda done, total: log.info("%s: cs refine: fold %d of %d", source,
                                                                     done, total))
        log.info("%s: cs refine calibrated on its own lines: %s", source, solve.summary())
        if solve.used:
            refiner = Refiner(solve.refine_config(), network.device)
        else:
            log.warning("%s: neither the held-back lines nor the noise level favour the cs refine; the refine as "
                        "configured is kept", source)
    if mode == "solve" or refiner is not None:
        return ScanAdaptation(network, refiner, solve)
    if settings.time_limit and solve is not None:  # the limit is the whole adaptation's: the weights get the rest
        settings = replace(settings, time_limit=max(settings.time_limit - solve.seconds, 1.0))
    adapted, weights = adapted_engine(network, slices, settings, source)
    return ScanAdaptation(adapted, refiner, solve, weights)


def adapt_for_config(network, slices: Sequence[AdaptSlice], config, source: str) -> ScanAdaptation:
    """:func:`adapt_to_scan` as a :class:`gadget.recon.config.ReconConfig` asks for it: its ``adapt``,
    ``adapt_steps``, ``adapt_time_limit``, and the calibration only with ``refine: auto``."""
    calibration = CalibrationConfig() if config.calibrates_solve else None
    return adapt_to_scan(network, slices, config.adapt, scan_settings(config.adapt_steps, config.adapt_time_limit),
                         calibration, source)


def provenance(base: LoadedCheckpoint, inputs: Sequence[tuple[str, str]], settings: AdaptConfig,
               result: AdaptResult) -> dict:
    """What a checkpoint made by adaptation records: the start weights' hash, each input's name and
    sha256, the settings (splits included), the steps and the Γ-loss curve."""
    return {
        "base_checkpoint": Path(base.path).name,
        "base_sha256": base.sha256,
        "inputs": [{"name": name, "sha256": digest} for name, digest in inputs],
        "settings": settings.to_dict(),
        "slices": result.slices,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped": result.stopped,
        "seconds": round(result.seconds, 3),
        "gamma_start": result.gamma_start,
        "gamma_best": result.gamma_best,
        "gamma_curve": [dict(entry) for entry in result.curve],
    }


def save_adapted(path: Path, base: LoadedCheckpoint, model: VarNet, record: dict) -> None:
    """Write ``model`` in our format with the base's description, its refine (so the adapted weights are
    run as their base was: :func:`gadget.model.checkpoint.default_refine`) and ``record`` under
    :data:`PROVENANCE_KEY`."""
    description = dict(base.description)
    description["refine"] = default_refine(base)[0]
    description[PROVENANCE_KEY] = record
    save_checkpoint(path, model, description)


def read_provenance(loaded: LoadedCheckpoint) -> Optional[dict]:
    """The adaptation record of a loaded checkpoint (None for weights not made by ``varnet adapt``)."""
    return loaded.description.get(PROVENANCE_KEY)


def joint_term(dirs: Sequence[str], seed: int = 0):
    """The supervised proxy term (JSSL) for :func:`gadget.train.adapt.adapt`: each call draws one slice of
    the fully sampled fastMRI-layout files in ``dirs`` (fresh 4× or 8× equispaced-fraction mask, fastMRI's
    centre fractions 0.08 / 0.04) and returns the SSIM loss of the network's image against its target."""
    import numpy as np
    import torch

    from ..mri.masks import MaskSpec
    from .data import SliceDataset
    from .losses import TrainingLoss
    from .trainer import crop_pair

    dataset = SliceDataset(list(dirs), MaskSpec("equispaced_fraction", [0.08, 0.04], [4, 8]), seed=seed)
    loss_fn = TrainingLoss("ssim")
    rng = np.random.default_rng(seed)

    def term(model, step: int):
        sample = dataset[int(rng.integers(len(dataset)))]
        device = next(model.parameters()).device
        output = model(sample.masked_kspace[None].to(device), sample.mask.to(device),
                       int(sample.num_low_frequencies) or None)
        output, target = crop_pair(output, sample.target[None].to(device), sample.crop_size)
        return loss_fn(output, target, torch.tensor([sample.max_value], device=device))

    return term
