"""Whole-process inference benchmark: ``varnet infer`` against fastMRI's inference path, each a fresh
Python process on the same test-format file and the same weights, timed from start to exit.

What a user runs on both sides:

- **reference**: fastMRI's pretrained-VarNet inference (the ``fastmri`` package's ``SliceDataset`` with
  ``VarNetDataTransform``, ``fastmri.models.VarNet`` in eval mode under ``torch.no_grad``, each slice
  centre-cropped to the header's reconstruction size, ``fastmri.save_reconstructions``), written here
  against the package's API (:func:`reference_main`, run as ``python -m gadget.bench.infer_bench``);
- **ours**: ``varnet infer --checkpoint W --input D --output O`` (``python -m gadget.cli``).

The input is one simulated multicoil volume (``gadget.converters.simulate``: the phantom at ``readout/2 ×
phase`` with 2× readout oversampling, equispaced ``acceleration`` with ``acs`` centre lines), written
as a fastMRI test-format file; the weights are a random model of ``config``
(:data:`gadget.bench.model_bench.CONFIGS`) saved as a bare fastMRI state dict, which ``varnet infer``
runs without a refinement, as fastMRI does (the default for such files). Both processes run their model on
``device`` (``varnet infer --device``; the reference moves its model and each slice there) with ``threads``
OpenMP threads; ``repeats`` rounds alternate them. The table gives each side's median wall time, the ratio, and the
largest difference between the two reconstructions relative to the reference's maximum.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model_bench import CONFIGS, BenchCase, equispaced_mask
from .table import markdown_table

IMPLEMENTATIONS = ("reference", "ours")


@dataclass
class InferCase(BenchCase):
    """The model benchmark's case (architecture, shape, mask, threads, seed) over ``slices`` slices;
    ``repeats`` counts rounds of both whole processes."""

    slices: int = 4
    repeats: int = 1


@dataclass
class InferResult:
    case: InferCase
    seconds: dict = field(default_factory=dict)   # implementation → wall seconds per round
    max_rel_diff: float = float("nan")

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def prepare(case: InferCase, workdir: Path) -> tuple[Path, Path]:
    """``(data folder, weights file)`` for ``case`` under ``workdir``."""
    import torch

    from ..converters.simulate import simulate_volume, write_fastmri
    from ..model.varnet import VarNet
    if case.readout % 2:
        raise ValueError(f"readout must be even (2× oversampling of readout/2), got {case.readout}")
    vol = simulate_volume(num_slices=case.slices, num_coils=case.coils, recon_size=(case.readout // 2, case.phase),
                          seed=case.seed)
    mask = equispaced_mask(case)
    data = workdir / "data"
    data.mkdir(parents=True)
    write_fastmri(data / "scan.h5", vol, mask=mask, num_low_frequency=case.acs, acceleration=case.acceleration)
    torch.manual_seed(case.seed)
    weights = workdir / "weights.pt"
    torch.save(VarNet(**CONFIGS[case.config]).state_dict(), weights)
    return data, weights


def _command(name: str, case: InferCase, data: Path, weights: Path, out: Path) -> list[str]:
    if name == "reference":
        return [sys.executable, "-m", "gadget.bench.infer_bench", str(weights), str(data), str(out),
                json.dumps(CONFIGS[case.config]), case.device]
    return [sys.executable, "-m", "gadget.cli", "infer", "--checkpoint", str(weights), "--input", str(data),
            "--output", str(out), "--device", case.device]


def _reconstruction(out: Path) -> np.ndarray:
    import h5py

    with h5py.File(out / "scan.h5", "r") as f:
        return np.asarray(f["reconstruction"])


def run(case: InferCase, progress=None) -> InferResult:
    """Prepare the data and weights, then ``case.repeats`` rounds of both whole processes (each must exit
    0; a failure raises with its stderr's tail)."""
    result = InferResult(case, {name: [] for name in IMPLEMENTATIONS})
    env = {**os.environ, "OMP_NUM_THREADS": str(case.threads), "MKL_NUM_THREADS": str(case.threads)}
    with tempfile.TemporaryDirectory(prefix="varnet-bench-infer-") as tmp:
        data, weights = prepare(case, Path(tmp))
        for round_ in range(case.repeats):
            for name in IMPLEMENTATIONS:
                out = Path(tmp) / f"{name}-{round_}"
                start = time.perf_counter()
                done = subprocess.run(_command(name, case, data, weights, out), env=env, capture_output=True,
                                      text=True)
                seconds = time.perf_counter() - start
                if done.returncode:
                    raise RuntimeError(f"{name} inference failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
                result.seconds[name].append(seconds)
                if progress:
                    progress(f"round {round_ + 1}/{case.repeats}: {name} {seconds:.2f} s")
        ref, ours = (_reconstruction(Path(tmp) / f"{name}-{case.repeats - 1}") for name in IMPLEMENTATIONS)
        if ref.shape != ours.shape:
            raise RuntimeError(f"reconstructions differ in shape: reference {ref.shape}, ours {ours.shape}")
        result.max_rel_diff = float(np.abs(ours - ref).max() / np.abs(ref).max())
    return result


def format_table(result: InferResult) -> str:
    c = result.case
    ref = result.median("reference")
    rows = [(name, f"{result.median(name):.2f}", ", ".join(f"{s:.2f}" for s in result.seconds[name]),
             f"{result.median(name) / ref:.3f}", "0" if name == "reference" else f"{result.max_rel_diff:.1e}")
            for name in IMPLEMENTATIONS]
    header = ("implementation", "median s (whole process)", "runs (s)", "time / reference",
              "max rel. diff to reference")
    return (f"whole-process inference: config={c.config}, {c.slices} slices of {c.coils}×{c.readout}×{c.phase}, "
            f"{c.acceleration}× equispaced + {c.acs} ACS, device={c.device}, threads={c.threads}, {c.repeats} round(s) "
            "alternating\n"
            + markdown_table(header, rows)
            + "\n  reference: fastmri SliceDataset + VarNetDataTransform + fastmri.models.VarNet, crop, "
              "save_reconstructions\n  ours: varnet infer --checkpoint (the same weights as a fastMRI state dict)")


def reference_main(weights: str, data: str, out: str, config_json: str, device: str = "cpu") -> int:
    """fastMRI's inference path over every file in ``data`` (see the module docstring), the model on
    ``device``."""
    from collections import defaultdict

    import fastmri
    import torch
    from fastmri.data import SliceDataset
    from fastmri.data.transforms import VarNetDataTransform, center_crop
    from fastmri.models import VarNet

    model = VarNet(**json.loads(config_json))
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval().to(device)
    dataset = SliceDataset(root=Path(data), transform=VarNetDataTransform(), challenge="multicoil")
    slices = defaultdict(list)
    with torch.no_grad():
        for sample in torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=0):
            image = model(sample.masked_kspace.to(device), sample.mask.to(device), sample.num_low_frequencies).cpu()
            height, width = int(sample.crop_size[0]), int(sample.crop_size[1])
            if image.shape[-1] < width:  # fastMRI's rule for images narrower than the crop
                height = width = image.shape[-1]
            slices[sample.fname[0]].append((int(sample.slice_num[0]), center_crop(image, (height, width))[0]))
    Path(out).mkdir(parents=True, exist_ok=True)
    fastmri.save_reconstructions({name: np.stack([s.numpy() for _, s in sorted(parts, key=lambda p: p[0])])
                                  for name, parts in slices.items()}, Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(reference_main(*sys.argv[1:6]))
