"""Run one benchmark variant in a fresh Python process (fair peak-memory figures: nothing from
another variant stays in the allocator), and the memory probes the workers use."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def run_worker(module: str, name: str, workdir: Path, case: dict, threads: int) -> dict:
    """``python -m module --worker name workdir case_json`` with ``threads`` OpenMP/MKL threads;
    the worker writes ``workdir/name.json``, returned here. Raises with the worker's stderr tail."""
    cmd = [sys.executable, "-m", module, "--worker", name, str(workdir), json.dumps(case)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} benchmark failed:\n{done.stderr[-2000:]}")
    return json.loads((workdir / f"{name}.json").read_text())


def rss_mb() -> float:
    """Resident set size of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Highest resident set size this process has had, MB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryProbe:
    """Peak memory growth from construction on: the resident set on CPU, or on CUDA what
    ``torch.cuda`` has allocated (live tensors, not the caching allocator's reserve). ``sync()``
    waits for queued GPU work (a no-op on CPU), so timings around it are complete."""

    def __init__(self, device: str):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.baseline = rss_mb()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def peak_growth_mb(self) -> float:
        import torch

        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else peak_rss_mb()
        return peak - self.baseline


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda})"
    return "cpu"


def memory_column(device: str) -> str:
    """The table heading for :meth:`MemoryProbe.peak_growth_mb` on ``device``."""
    return "peak GPU memory MB (allocated)" if device.startswith("cuda") else "peak memory MB (RSS growth)"
