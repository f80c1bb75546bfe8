"""Refinement benchmark: what the parallel-imaging refinement (gadget.recon.refine) adds per slice to the
network it finishes, both measured in the same run, on the same input and device, with the shipped weights.

The input is the model benchmark's simulated phantom scan (:func:`model_bench.make_input`); timings are
medians over ``repeats`` after one warm-up, with the device synchronised around each (CUDA times include
the copy of the images back to the host, as every door pays it).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .fresh_process import MemoryProbe
from .model_bench import BenchCase, make_input
from .table import markdown_table


@dataclass
class RefineTimes:
    shape: tuple[int, int, int]
    network_s: float
    refined_s: float

    @property
    def refinement_s(self) -> float:
        return self.refined_s - self.network_s


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    sync = MemoryProbe(str(device)).sync  # CUDA: wait for the device around each timing
    fn()  # warm-up: kernels, FFT plans, allocator
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(shapes, repeats: int = 5, device: str = "cpu", threads: int = 2, checkpoint=None) -> list[RefineTimes]:
    """Time ``Reconstructor.run`` alone and followed by the refine stage (as the pipeline runs them) for each
    ``(coils, readout, phase)``."""
    from ..model.checkpoint import load_checkpoint
    from ..model.shipped import resolve_checkpoint
    from ..recon.engine import Reconstructor
    from ..recon.refine_stage import Refiner

    torch.set_num_threads(threads)
    engine = Reconstructor(load_checkpoint(resolve_checkpoint(checkpoint)).model, device=device)
    refiner = Refiner(device=engine.device)  # the default refinement (pi)

    def refined(kspace, mask):
        return refiner(*engine.run(kspace, mask), kspace, mask)
    results = []
    for coils, readout, phase in shapes:
        kspace, mask = make_input(BenchCase(coils=coils, readout=readout, phase=phase))
        times = [_median_seconds(lambda f=f: f(kspace, mask), repeats, engine.device) for f in (engine.run, refined)]
        results.append(RefineTimes((coils, readout, phase), *times))
    return results


def format_table(results: list[RefineTimes], device: str) -> str:
    rows = [(f"{c} × {h} × {w}", f"{r.network_s * 1e3:.1f}", f"{r.refined_s * 1e3:.1f}",
             f"{r.refinement_s * 1e3:.1f}", f"{r.refinement_s / r.network_s:.2f}")
            for r in results for c, h, w in [r.shape]]
    header = ("coils × readout × phase", "network ms", "network + refine ms", "refine ms", "refine / network")
    return f"refinement cost per slice on {device} (shipped weights, median)\n" + markdown_table(header, rows)
