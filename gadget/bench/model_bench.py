"""Model benchmark: ours vs the fastMRI reference, same weights and input, in one run.

Each implementation runs in its own fresh process (fair peak-memory figures: peak RSS
minus the RSS before the first forward), with the same thread count; outputs are compared
in the parent. The input is a simulated phantom scan (structured data; on white noise the
random-weight network amplifies fp32 rounding and the comparison says little).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIGS = {
    "default": dict(num_cascades=12, chans=18, pools=4, sens_chans=8, sens_pools=4),
    "small": dict(num_cascades=4, chans=8, pools=3, sens_chans=4, sens_pools=3),
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


def make_input(case: BenchCase) -> tuple[np.ndarray, np.ndarray]:
    """``(kspace (1, coil, readout, phase) complex64, mask (phase,) bool)``: equispaced, ACS in the middle."""
    from converters.simulate import simulate_volume

    vol = simulate_volume(num_slices=1, num_coils=case.coils, recon_size=(case.readout // 2, case.phase),
                          seed=case.seed)
    mask = np.zeros(case.phase, bool)
    mask[::case.acceleration] = True
    start = (case.phase - case.acs + 1) // 2
    mask[start:start + case.acs] = True
    return vol.kspace * mask, mask


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(impl: str, case: BenchCase, workdir: Path) -> None:
    import torch

    torch.set_num_threads(case.threads)
    torch.manual_seed(case.seed)
    kspace = np.load(workdir / "kspace.npy")
    mask = np.load(workdir / "mask.npy")
    state = torch.load(workdir / "weights.pt", weights_only=True)
    cfg = CONFIGS[case.config]
    k = torch.from_numpy(kspace)
    if impl == "reference":
        from fastmri.models import VarNet as RefVarNet

        model = RefVarNet(**cfg).eval()
        args = (torch.view_as_real(k), torch.from_numpy(mask).view(1, 1, 1, -1, 1), case.acs)
    else:
        from gadget.model.varnet import VarNet

        model = VarNet(**cfg).eval()
        args = (k, torch.from_numpy(mask), case.acs)
    model.load_state_dict(state, strict=True)
    baseline = _rss_mb()
    times = []
    with torch.inference_mode():
        for i in range(case.repeats + 1):  # first run is warm-up
            t0 = time.perf_counter()
            out = model(*args)
            if i:
                times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(workdir / f"{impl}.npy", out.numpy())
    (workdir / f"{impl}.json").write_text(json.dumps(
        {"median_s": statistics.median(times), "times": times, "peak_mb": peak - baseline}))


def run(case: BenchCase, implementations=("reference", "ours")) -> dict:
    import torch

    from gadget.model.varnet import VarNet, count_parameters

    results = {}
    with tempfile.TemporaryDirectory(prefix="varnet-bench-") as tmp:
        work = Path(tmp)
        kspace, mask = make_input(case)
        np.save(work / "kspace.npy", kspace)
        np.save(work / "mask.npy", mask)
        torch.manual_seed(case.seed)
        model = VarNet(**CONFIGS[case.config])
        torch.save(model.state_dict(), work / "weights.pt")
        params = count_parameters(model)
        for impl in implementations:
            cmd = [sys.executable, "-m", "gadget.bench.model_bench", "--worker", impl, str(work),
                   json.dumps(case.__dict__)]
            env = {**os.environ, "OMP_NUM_THREADS": str(case.threads), "MKL_NUM_THREADS": str(case.threads)}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{impl} benchmark failed:\n{done.stderr[-2000:]}")
            results[impl] = json.loads((work / f"{impl}.json").read_text())
            results[impl]["output"] = np.load(work / f"{impl}.npy")
    if "reference" in results and "ours" in results:
        ref, ours = results["reference"]["output"], results["ours"]["output"]
        results["max_rel_diff"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
        results["rel_l2_diff"] = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    results["parameters"] = params
    return results


def format_table(case: BenchCase, results: dict) -> str:
    import platform

    import torch

    head = (f"model benchmark: config={case.config}, k-space 1x{case.coils}x{case.readout}x{case.phase}, "
            f"{case.acceleration}x equispaced + {case.acs} ACS, {results['parameters']:,} parameters\n"
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"threads={case.threads}, torch {torch.__version__}, median of {case.repeats} runs "
            f"(after 1 warm-up), {time.strftime('%Y-%m-%d')}\n")
    rows = ["| implementation | median s | runs (s) | peak memory MB |", "|---|---|---|---|"]
    for impl in ("reference", "ours"):
        if impl in results:
            r = results[impl]
            rows.append(f"| {impl} | {r['median_s']:.3f} | {', '.join(f'{t:.2f}' for t in r['times'])} "
                        f"| {r['peak_mb']:.0f} |")
    tail = ""
    if "max_rel_diff" in results:
        ratio = results["ours"]["median_s"] / results["reference"]["median_s"]
        tail = (f"\nours / reference wall time: {ratio:.3f}\n"
                f"max |ours - ref| / max |ref| = {results['max_rel_diff']:.2e}; "
                f"||ours - ref|| / ||ref|| = {results['rel_l2_diff']:.2e}")
    return head + "\n".join(rows) + tail


def _worker_main(argv: list[str]) -> None:
    impl, workdir, case_json = argv
    worker(impl, BenchCase(**json.loads(case_json)), Path(workdir))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
    else:
        raise SystemExit("use: varnet bench model")
