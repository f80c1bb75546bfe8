"""The refinement as a stage after the network (:mod:`gadget.recon.refine` holds the solve itself).

The engine (:class:`gadget.recon.engine.Reconstructor`) returns the network's image and final k-space, and,
when asked (the doors ask whenever the stage refines), the final coil images its RSS was formed from, which
the refine's prior reads instead of transforming the k-space again; what is sent is decided after it:

    engine.run ─▶ Refiner (refine: pi | none | cs) ─▶ safety check ─▶ image sent

:class:`gadget.recon.pipeline.ScanReconstructor` holds a :class:`Refiner` built from its config
(:meth:`Refiner.for_config`), so every door gets the refine its config asks for from one shared engine.
The offline volume paths (``varnet infer``, ``varnet compare``, benches) wrap the engine and the stage in
a :class:`RefinedEngine`. The safety check's consistency and prediction figures read the network's
k-space (and its re-run, which is never refined); its departure figure the image sent.

Which mode a config's ``refine`` stands for (:func:`applied_refine`): ``auto`` → the checkpoint's recorded
refine (:func:`gadget.model.checkpoint.default_refine`, which :func:`gadget.recon.pipeline.build_engine`
keeps on the engine as ``checkpoint_refine``; ``pi``, :class:`RefineConfig`'s default, for an engine built
from a model without a checkpoint); a mode given explicitly always wins. The ``cs`` mode (an L1-wavelet
solve around the network's image, :mod:`gadget.recon.sparse`) is never a config's or checkpoint's: its
weights are chosen per scan, and per-scan adaptation (``adapt: solve | scan``,
:mod:`gadget.train.adapt_run`) hands the doors a :class:`Refiner` holding them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .refine import PositionCalibrations, RefineConfig, refine


def applied_refine(setting: str, checkpoint_refine: Optional[str]) -> str:
    """The refine mode ``setting`` (``auto`` | ``pi`` | ``none``) stands for with an engine whose checkpoint
    records ``checkpoint_refine`` (None: no checkpoint known; ``auto`` then means :class:`RefineConfig`'s
    default mode, ``pi``)."""
    if setting != "auto":
        return setting
    return checkpoint_refine or RefineConfig().mode


class Refiner:
    """The refine stage: ``refiner(image, final, kspace, mask, acs)`` → the image to send, float32 numpy
    ``(batch, readout, phase)``. ``image`` ``(batch, readout, phase)`` and ``final`` ``(batch, coil, readout,
    phase)`` are the engine's outputs (numpy, or tensors left on the device by
    :meth:`Reconstructor.run_tensors`), ``kspace`` the measured k-space the network was given (one slice or
    a batch), ``mask`` its ``(phase,)`` mask (or one row per slice), ``acs`` the ACS count(s) the network was
    given (None: detected from the mask). Runs :func:`gadget.recon.refine.refine` on ``device`` (the
    engine's), outside the engine's lock; stateless, so shared by any number of threads."""

    def __init__(self, config: RefineConfig = RefineConfig(), device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)

    @property
    def mode(self) -> str:
        return self.config.mode

    @classmethod
    def for_config(cls, config, engine) -> "Refiner":
        """The stage a :class:`~gadget.recon.config.ReconConfig` asks for with ``engine`` (its ``refine``
        through :func:`applied_refine`, its ``refine_lambda``), on the engine's device."""
        mode = applied_refine(config.refine, getattr(engine, "checkpoint_refine", None))
        return cls(RefineConfig(mode=mode, lam=config.refine_lambda), getattr(engine, "device", "cpu"))

    @torch.inference_mode()
    def __call__(self, image, final, kspace, mask, acs=None, positions=None,
                 calibrations: Optional[PositionCalibrations] = None, coil_images=None) -> np.ndarray:
        """``positions`` (one per slice) and a scan's ``calibrations``: ESPIRiT calibrated once per slice
        position (:class:`gadget.recon.refine.PositionCalibrations`); without them, per slice.
        ``coil_images``: the engine's final coil images (``run(..., coil_images=True)``), or None."""
        if self.config.mode == "none":
            return _numpy(image)
        k = torch.as_tensor(kspace)
        k = (k.unsqueeze(0) if k.ndim == 3 else k).to(self.device, torch.complex64)
        m = torch.as_tensor(np.asarray(mask, dtype=bool) if not isinstance(mask, torch.Tensor) else mask)
        coils = None if coil_images is None else torch.as_tensor(coil_images).to(self.device)
        out = refine(torch.as_tensor(image).to(self.device), torch.as_tensor(final).to(self.device), k,
                     m.to(self.device), self.config, acs, positions, calibrations, coils)
        return out.float().cpu().numpy()


def _numpy(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return image.float().cpu().numpy()
    return np.asarray(image, np.float32)


class RefinedEngine:
    """An engine and a :class:`Refiner` as one callable, for the offline volume paths (``varnet infer``,
    ``varnet compare``, benches): ``refined(kspace, mask, acs, sens_kspace=None)`` → the images sent,
    float32 ``(batch, readout, phase)``. With refine ``none`` it is the engine's plain forward."""

    def __init__(self, engine, refiner: Refiner):
        if refiner.mode != "none" and not hasattr(engine.model, "forward_with_kspace"):
            raise ValueError(f"refine '{refiner.mode}' needs the model's final k-space, which "
                             f"{type(engine.model).__name__} does not return: use refine 'none'")
        self.engine, self.refiner = engine, refiner

    @property
    def model(self):
        return self.engine.model

    @property
    def device(self):
        return self.engine.device

    @property
    def checkpoint_refine(self) -> Optional[str]:
        return getattr(self.engine, "checkpoint_refine", None)

    def with_model(self, model) -> "RefinedEngine":
        """The same stage around :meth:`Reconstructor.with_model` (an adapted model; gadget/train/adapt_run.py)."""
        return RefinedEngine(self.engine.with_model(model), self.refiner)

    def __call__(self, kspace, mask, num_low_frequencies=None, sens_kspace=None) -> np.ndarray:
        if self.refiner.mode == "none":
            return self.engine(kspace, mask, num_low_frequencies, sens_kspace)
        image, final, coils = self.engine.run_tensors(kspace, mask, num_low_frequencies, sens_kspace,
                                                      coil_images=True)
        return self.refiner(image, final, kspace, mask, num_low_frequencies, coil_images=coils)
