"""Model benchmark: ours vs the fastMRI reference, same weights and input, in one run.

Each implementation runs in its own fresh process (fair peak-memory figures: peak RSS
minus the RSS before the first forward), with the same thread count; outputs are compared
in the parent. The input is a simulated phantom scan (structured data; on white noise the
random-weight network amplifies fp32 rounding and the comparison says little).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fresh_process import MemoryProbe, device_name, memory_column, run_worker
from .table import markdown_table

CONFIGS = {
    "default": dict(num_cascades=12, chans=18, pools=4, sens_chans=8, sens_pools=4),
    "small": dict(num_cascades=4, chans=8, pools=3, sens_chans=4, sens_pools=3),
    # the architecture of the shipped weights (gadget/weights/varnet_head_v3.pt); random weights
    "shipped": dict(num_cascades=6, chans=8, pools=4, sens_chans=4, sens_pools=4),
}


@dataclass
class BenchCase:
    config: str = "default"
    coils: int = 15
    readout: int = 640
    phase: int = 368
    acceleration: int = 4
    acs: int = 30
    repeats: int = 5
    threads: int = 2
    seed: int = 0
    keep_freed_memory: bool = True  # gadget.recon.allocator in every worker, as the engine does; False: glibc defaults
    device: str = "cpu"             # cpu | cuda[:N]: where every implementation runs (onnxruntime: CPU only)


def make_input(case: BenchCase) -> tuple[np.ndarray, np.ndarray]:
    """``(kspace (1, coil, readout, phase) complex64, mask (phase,) bool)``: equispaced, ACS in the middle."""
    from gadget.converters.simulate import simulate_volume

    vol = simulate_volume(num_slices=1, num_coils=case.coils, recon_size=(case.readout // 2, case.phase),
                          seed=case.seed)
    mask = equispaced_mask(case)
    return vol.kspace * mask, mask


def equispaced_mask(case: BenchCase) -> np.ndarray:
    """Bool ``(phase,)``: every ``acceleration``-th line and ``acs`` centre lines (fastMRI's placement)."""
    mask = np.zeros(case.phase, bool)
    mask[::case.acceleration] = True
    start = (case.phase - case.acs + 1) // 2
    mask[start:start + case.acs] = True
    return mask


IMPLEMENTATIONS = ("reference", "ours", "ours-static", "ours-bf16", "ours-fp16", "onnxruntime")
FP32_OURS = ("ours", "ours-static")          # held to the 1e-4 bound against the reference
REDUCED_OURS = {"ours-bf16": "bf16", "ours-fp16": "fp16"}  # our eager model, U-Nets in that precision (GPUs)


def default_implementations(device: str) -> tuple[str, ...]:
    """What ``bench all`` compares: on CPU the fp32 paths and ONNX; on CUDA also the reduced-precision U-Nets."""
    if device.startswith("cuda"):
        return ("reference", *FP32_OURS, *REDUCED_OURS)
    return ("reference", *FP32_OURS, "onnxruntime")
DESCRIPTIONS = {
    "reference": "fastmri.models.VarNet (fastmri 0.3.0), eager",
    "ours": "gadget VarNet, eager, complex tensors",
    "ours-static": "StaticVarNet (fixed ACS width, real layout), TorchScript frozen + optimize_for_inference",
    "ours-bf16": "gadget VarNet, eager, U-Nets under torch.autocast(bfloat16), FFTs and coil operators fp32",
    "ours-fp16": "gadget VarNet, eager, U-Nets under torch.autocast(float16), FFTs and coil operators fp32",
    "onnxruntime": "the exported ONNX file (opset 18, DFT) in onnxruntime, CPU provider",
}


def _build(impl: str, case: BenchCase, workdir: Path, kspace: np.ndarray, mask: np.ndarray):
    """``(callable, args)`` for one implementation; weights from ``workdir/weights.pt``."""
    import torch

    cfg = CONFIGS[case.config]
    state = torch.load(workdir / "weights.pt", weights_only=True)
    device = torch.device(case.device)
    k = torch.from_numpy(kspace).to(device)
    if impl == "onnxruntime":
        if device.type != "cpu":
            raise ValueError("the onnxruntime implementation runs on the CPU provider only")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = case.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(workdir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feeds = {"kspace": torch.view_as_real(k).numpy(), "mask": mask.astype(np.float32)}
        return (lambda feeds: torch.from_numpy(session.run(None, feeds)[0])), (feeds,)
    if impl == "reference":
        from fastmri.models import VarNet as RefVarNet

        model = RefVarNet(**cfg).eval()
        model.load_state_dict(state, strict=True)
        m = torch.from_numpy(mask).view(1, 1, 1, -1, 1).to(device)
        return model.to(device), (torch.view_as_real(k), m, case.acs)
    from gadget.model.varnet import VarNet

    model = VarNet(**cfg).eval()
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.set_precision(REDUCED_OURS.get(impl, "fp32"))
    if impl != "ours-static":
        return model, (k, torch.from_numpy(mask).to(device), case.acs)
    from gadget.model.export import trace_static

    traced = trace_static(model, case.coils, case.readout, case.phase, case.acs)
    fast = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    return fast, (torch.view_as_real(k).contiguous(), torch.from_numpy(mask).to(device, torch.float32))


def worker(impl: str, case: BenchCase, workdir: Path) -> None:
    import torch

    from gadget.recon.allocator import keep_freed_memory

    torch.set_num_threads(case.threads)
    if case.keep_freed_memory:
        keep_freed_memory()  # every implementation alike, as the engine does in the server
    torch.manual_seed(case.seed)
    kspace = np.load(workdir / "kspace.npy")
    mask = np.load(workdir / "mask.npy")
    model, args = _build(impl, case, workdir, kspace, mask)
    memory = MemoryProbe(case.device)
    times, faults = [], []
    with torch.inference_mode():
        for i in range(case.repeats + 1):  # first run is warm-up
            memory.sync()
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            out = model(*args)
            memory.sync()
            if i:
                times.append(time.perf_counter() - t0)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    np.save(workdir / f"{impl}.npy", out.float().cpu().numpy())
    (workdir / f"{impl}.json").write_text(json.dumps(
        {"median_s": statistics.median(times), "times": times, "peak_mb": memory.peak_growth_mb(),
         "page_faults": statistics.median(faults)}))


def write_case(case: BenchCase, work: Path):
    """The workers' inputs in ``work``: ``kspace.npy``, ``mask.npy`` (:func:`make_input`) and
    ``weights.pt`` (random weights, seeded). Returns ``(model, kspace)``."""
    import torch

    from gadget.model.varnet import VarNet

    kspace, mask = make_input(case)
    np.save(work / "kspace.npy", kspace)
    np.save(work / "mask.npy", mask)
    torch.manual_seed(case.seed)
    model = VarNet(**CONFIGS[case.config])
    torch.save(model.state_dict(), work / "weights.pt")
    return model, kspace


def run(case: BenchCase, implementations=("reference", "ours")) -> dict:
    """Run each implementation in a fresh process; outputs compared with the reference's (else ours)."""
    from gadget.model.varnet import count_parameters

    results = {}
    with tempfile.TemporaryDirectory(prefix="varnet-bench-") as tmp:
        work = Path(tmp)
        model, _ = write_case(case, work)
        params = count_parameters(model)
        if "onnxruntime" in implementations:
            from gadget.model.export import export_model

            export_model(model, work / "model.onnx", "onnx", case.coils, case.readout, case.phase, case.acs)
        for impl in implementations:
            results[impl] = run_worker("gadget.bench.model_bench", impl, work, case.__dict__, case.threads)
            results[impl]["output"] = np.load(work / f"{impl}.npy")
    base = "reference" if "reference" in results else implementations[0]
    ref = results[base]["output"]
    for impl in implementations:
        out = results[impl]["output"]
        results[impl]["max_rel_diff"] = float(np.abs(out - ref).max() / np.abs(ref).max())
        results[impl]["rel_l2_diff"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        results[impl]["vs"] = results[impl]["median_s"] / results[base]["median_s"]
    results["base"] = base
    results["parameters"] = params
    return results


ALLOCATOR = {True: "freed memory kept in the process (gadget/recon/allocator.py)",
             False: "glibc's default mmap/trim thresholds (--glibc-defaults)"}


def format_table(case: BenchCase, results: dict) -> str:
    import platform

    import torch

    head = (f"model benchmark: config={case.config}, k-space 1x{case.coils}x{case.readout}x{case.phase}, "
            f"{case.acceleration}x equispaced + {case.acs} ACS, {results['parameters']:,} parameters\n"
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"threads={case.threads}, torch {torch.__version__}, median of {case.repeats} runs "
            f"(after 1 warm-up), {time.strftime('%Y-%m-%d')}\n"
            f"device: {device_name(case.device)}\n"
            f"allocator: {ALLOCATOR[case.keep_freed_memory]}, every implementation\n")
    base = results["base"]
    cuda = case.device.startswith("cuda")
    unit, scale = ("ms", 1000.0) if cuda else ("s", 1.0)  # a GPU forward takes milliseconds
    done = [impl for impl in IMPLEMENTATIONS if impl in results]
    rows = []
    for impl in done:
        r = results[impl]
        rows.append([impl, f"{r['median_s'] * scale:.3f}", ", ".join(f"{t * scale:.2f}" for t in r["times"]),
                     f"{r['peak_mb']:.0f}", f"{r['page_faults']:,.0f}", f"{r['vs']:.3f}", f"{r['max_rel_diff']:.1e}"])
    table = markdown_table(["implementation", f"median {unit}", f"runs ({unit})", memory_column(case.device),
                            "page faults / run", f"time / {base}", f"max rel. diff to {base}"], rows)
    notes = "\n".join(f"  {impl}: {DESCRIPTIONS[impl]}" for impl in done)
    return head + table + "\n" + notes


def _worker_main(argv: list[str]) -> None:
    impl, workdir, case_json = argv
    worker(impl, BenchCase(**json.loads(case_json)), Path(workdir))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
    else:
        raise SystemExit("use: varnet bench model")
