"""Refinement benchmark: the network and the parallel-imaging refinement (gadget.recon.refine) that finishes
it, per slice, with the shipped weights, in one run and one process, beside fastMRI's reference network with
the same weights.

For each shape the three are timed interleaved, ``repeats`` times after one warm-up each, on the same input
and device: the reference network (``fastmri.models.VarNet`` with the shipped weights, as the model
benchmark runs it), our network (``Reconstructor.run_tensors``, as the pipeline runs it) and the refine
stage on our network's outputs (``Refiner``, as the pipeline runs it after the network). Interleaving puts
the three under the same load on a shared machine; the table gives medians and the ratios of the medians.
A fourth timing is the refine stage on a slice whose position the scan has calibrated already (a repetition
or cardiac phase of it: ESPIRiT's calibration reused, :class:`gadget.recon.refine.PositionCalibrations`).
The input is the model benchmark's simulated phantom scan (:func:`model_bench.make_input`, 2× readout
oversampling, 4× equispaced with 30 ACS lines). CUDA times include the copy of the images back to the host.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .fresh_process import MemoryProbe
from .model_bench import BenchCase, make_input
from .table import markdown_table


#: The shapes ``varnet bench refine`` and ``varnet bench all`` time by default, ``(coils, readout, phase)``: the
#: model benchmark's sizes and the demo's scan (12×346×119: 2× readout oversampling, awkward FFT lengths).
DEFAULT_SHAPES = ((10, 256, 256), (10, 512, 256), (16, 640, 320), (12, 346, 119))


@dataclass
class RefineTimes:
    shape: tuple[int, int, int]
    network_s: float                       # ours, median
    refinement_s: float                    # the refine stage alone, median
    reference_s: Optional[float] = None    # fastMRI's VarNet with the same weights, median (None: not run)
    max_rel_diff: Optional[float] = None   # our network's image against the reference's
    times: dict = field(default_factory=dict)
    # the refine stage on a slice whose position a scan has calibrated already (a repetition), median
    repeat_s: Optional[float] = None

    @property
    def refined_s(self) -> float:
        return self.network_s + self.refinement_s

    @property
    def refine_ratio(self) -> float:
        return self.refinement_s / self.network_s

    @property
    def reference_ratio(self) -> Optional[float]:
        return None if self.reference_s is None else self.network_s / self.reference_s


def _reference_model(model, device: torch.device):
    """fastMRI's VarNet with ``model``'s architecture and weights, or None (fastmri missing, other variant)."""
    try:
        from fastmri.models import VarNet as RefVarNet
    except ImportError:
        return None
    cfg = model.config
    if cfg.variant != "e2e" or cfg.output != "rss":
        return None
    ref = RefVarNet(num_cascades=cfg.num_cascades, chans=cfg.chans, pools=cfg.pools, sens_chans=cfg.sens_chans,
                    sens_pools=cfg.sens_pools, mask_center=cfg.mask_center).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.to(device)


def run(shapes, repeats: int = 5, device: str = "cpu", threads: int = 2, checkpoint=None,
        reference: bool = True) -> list[RefineTimes]:
    """Time the reference network, ours and the refine stage interleaved for each ``(coils, readout, phase)``."""
    from ..model.checkpoint import load_checkpoint
    from ..model.shipped import resolve_checkpoint
    from ..recon.allocator import keep_freed_memory
    from ..recon.engine import Reconstructor
    from ..recon.refine import PositionCalibrations
    from ..recon.refine_stage import Refiner

    torch.set_num_threads(threads)
    keep_freed_memory()
    engine = Reconstructor(load_checkpoint(resolve_checkpoint(checkpoint)).model, device=device)
    refiner = Refiner(device=engine.device)  # the default refinement (pi)
    ref = _reference_model(engine.model, engine.device) if reference else None
    sync = MemoryProbe(str(engine.device)).sync  # CUDA: wait for the device around each timing
    results = []
    for coils, readout, phase in shapes:
        kspace, mask = make_input(BenchCase(coils=coils, readout=readout, phase=phase))
        k = torch.from_numpy(kspace).to(engine.device)
        m = torch.from_numpy(mask).to(engine.device)
        outputs = {}

        def network():  # the coil images too, as the pipeline asks for them when it refines
            image, final, coils = engine.run_tensors(kspace, mask, coil_images=True)
            outputs["ours"] = (image, final, coils)
            return image

        def refine():
            image, final, coils = outputs["ours"]
            return refiner(image, final, kspace, mask, coil_images=coils)

        calibrations = PositionCalibrations()

        def repeat():  # the warm-up round calibrates the position; the timed rounds reuse it
            image, final, coils = outputs["ours"]
            return refiner(image, final, kspace, mask, None, [0], calibrations, coils)

        def reference_network():
            with torch.inference_mode():
                outputs["reference"] = ref(torch.view_as_real(k), m.view(1, 1, 1, -1, 1), None)
            return outputs["reference"]

        steps = {"reference": reference_network} if ref is not None else {}
        steps.update(network=network, refine=refine, repeat=repeat)
        times = {name: [] for name in steps}
        for i in range(repeats + 1):  # the first round is the warm-up: kernels, FFT plans, packed weights
            for name, fn in steps.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if i:
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        diff = None
        if ref is not None:
            a, b = outputs["reference"].float().cpu(), outputs["ours"][0].float().cpu()
            diff = float((a - b).abs().max() / a.abs().max())
        results.append(RefineTimes((coils, readout, phase), medians["network"], medians["refine"],
                                   medians.get("reference"), diff, times, medians["repeat"]))
    return results


def format_table(results: list[RefineTimes], device: str) -> str:
    """One row per shape: reference network, ours, ours/reference, refine, refine/network (medians)."""
    def ms(seconds: Optional[float]) -> str:
        return "—" if seconds is None else f"{seconds * 1e3:.1f}"

    rows = []
    for r in results:
        c, h, w = r.shape
        rows.append((f"{c} × {h} × {w}", ms(r.reference_s), ms(r.network_s),
                     "—" if r.reference_ratio is None else f"{r.reference_ratio:.2f}",
                     "—" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}",
                     ms(r.refinement_s), f"{r.refine_ratio:.2f}", ms(r.refined_s), ms(r.repeat_s),
                     "—" if r.repeat_s is None else f"{r.repeat_s / r.network_s:.2f}"))
    header = ("coils × readout × phase", "reference network ms", "our network ms", "ours / reference",
              "max rel. diff", "refine ms", "refine / our network", "ours + refine ms",
              "refine, position calibrated ms", "that / our network")
    n = len(results[0].times.get("network", ())) if results else 0
    return (f"network and refinement per slice on {device} (shipped weights; reference: fastmri.models.VarNet with "
            f"the same weights; interleaved, median of {n} after a warm-up, threads={torch.get_num_threads()})\n"
            + markdown_table(header, rows))


def summary(results: list[RefineTimes]) -> dict:
    """The worst refine/network ratio and the worst ours/reference ratio over the shapes (for the targets table)."""
    ref = [r.reference_ratio for r in results if r.reference_ratio is not None]
    return {"refine_ratio": max(r.refine_ratio for r in results),
            "reference_ratio": max(ref) if ref else None,
            "max_rel_diff": max((r.max_rel_diff for r in results if r.max_rel_diff is not None), default=None)}


__all__ = ["DEFAULT_SHAPES", "RefineTimes", "run", "format_table", "summary"]
