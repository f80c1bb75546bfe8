"""Training-step benchmark: peak memory and time of one optimizer step (forward, SSIM loss,
backward, Adam) with and without activation checkpointing, and with the U-Nets in reduced
precision, each variant in a fresh process, same weights and batch; the gradients are compared
with the plain step's. The case is the model benchmark's :class:`BenchCase` (``repeats``: timed
steps after one warm-up step).

Memory: on CPU the growth of the resident set from just before the first step to its peak; on
CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the first step
(weights and batch), so activations + gradients + optimizer state.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .fresh_process import MemoryProbe, device_name, memory_column, run_worker
from .model_bench import CONFIGS, BenchCase, write_case
from .table import markdown_table

VARIANTS = {  # name → (activation checkpointing, U-Net precision)
    "plain": (False, "fp32"),
    "checkpointing": (True, "fp32"),
    "checkpointing-bf16": (True, "bf16"),
    "checkpointing-fp16": (True, "fp16"),
}


def default_variants(device: str) -> tuple[str, ...]:
    """Reduced precision only on CUDA: on CPUs without bf16/fp16 units it is slower, not smaller."""
    return tuple(VARIANTS) if device.startswith("cuda") else ("plain", "checkpointing")


def worker(name: str, case: BenchCase, workdir: Path) -> None:
    import torch

    from gadget.model.varnet import VarNet
    from gadget.recon.allocator import keep_freed_memory
    from gadget.train.losses import ssim_loss
    from gadget.train.trainer import TrainingVarNet

    torch.set_num_threads(case.threads)
    if case.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(case.device)
    checkpointing, precision = VARIANTS[name]
    model = VarNet(**CONFIGS[case.config])
    model.load_state_dict(torch.load(workdir / "weights.pt", weights_only=True), strict=True)
    model.set_precision(precision).to(device).train()
    net = TrainingVarNet(model, activation_checkpointing=checkpointing)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    # as Trainer.train_step: fp16 gradients need loss scaling (SSIM's are far below fp16's smallest normal)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    kspace = torch.from_numpy(np.load(workdir / "kspace.npy")).to(device)
    mask = torch.from_numpy(np.load(workdir / "mask.npy")).to(device)
    target = torch.from_numpy(np.load(workdir / "target.npy")).to(device)
    max_value = target.amax().reshape(1)

    memory = MemoryProbe(case.device)
    times, grads = [], None
    for i in range(case.repeats + 1):  # first step is warm-up (and the one whose gradients are compared)
        memory.sync()
        t0 = time.perf_counter()
        loss = ssim_loss(net(kspace, mask, case.acs), target, max_value)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # true gradients, for the comparison and the step
        if grads is None:
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).float().cpu().numpy()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        memory.sync()
        if i:
            times.append(time.perf_counter() - t0)
    np.save(workdir / f"{name}.npy", grads)
    (workdir / f"{name}.json").write_text(json.dumps(
        {"median_s": statistics.median(times), "times": times, "peak_mb": memory.peak_growth_mb()}))


def run(case: BenchCase, variants=None) -> dict:
    """Each variant in a fresh process; gradients of the first step compared with ``plain``'s."""
    import torch

    from gadget.mri.coils import rss
    from gadget.mri.fft import ifft2c

    variants = tuple(variants or default_variants(case.device))
    results = {}
    with tempfile.TemporaryDirectory(prefix="varnet-train-bench-") as tmp:
        work = Path(tmp)
        _, kspace = write_case(case, work)
        # the target is the zero-filled RSS image: the step's cost does not depend on what it learns
        np.save(work / "target.npy", rss(ifft2c(torch.from_numpy(kspace)), dim=1).numpy())
        for name in variants:
            results[name] = run_worker("gadget.bench.train_bench", name, work, case.__dict__, case.threads)
            results[name]["grads"] = np.load(work / f"{name}.npy")
    base = "plain" if "plain" in results else variants[0]
    for name in variants:
        g, ref = results[name]["grads"], results[base]["grads"]
        results[name]["grad_rel_diff"] = float(np.linalg.norm(g - ref) / np.linalg.norm(ref))
        results[name]["time_vs"] = results[name]["median_s"] / results[base]["median_s"]
        results[name]["memory_vs"] = results[name]["peak_mb"] / results[base]["peak_mb"]
    results["base"] = base
    return results


def format_table(case: BenchCase, results: dict) -> str:
    base = results["base"]
    head = (f"training-step benchmark: config={case.config}, k-space 1x{case.coils}x{case.readout}x{case.phase}, "
            f"SSIM loss + Adam, median of {case.repeats} steps (after 1 warm-up), threads={case.threads}, "
            f"{time.strftime('%Y-%m-%d')}\ndevice: {device_name(case.device)}\n")
    rows = []
    for name in (n for n in VARIANTS if n in results):
        r = results[name]
        rows.append([name, f"{r['median_s']:.2f}", f"{r['peak_mb']:.0f}", f"{r['memory_vs']:.2f}",
                     f"{r['time_vs']:.2f}", f"{r['grad_rel_diff']:.1e}"])
    return head + markdown_table(["variant", "median s / step", memory_column(case.device), f"memory / {base}",
                                  f"time / {base}", f"gradient rel. L2 diff to {base}"], rows)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        name, workdir, case_json = sys.argv[2:]
        worker(name, BenchCase(**json.loads(case_json)), Path(workdir))
    else:
        raise SystemExit("use: varnet bench train")
