"""Pipeline overhead benchmark: a 16-slice simulated scan streamed over loopback TCP into the MRD
server; overhead = (first byte sent → last image received) − model time (measured in the server).
The model runs while later slices still stream in, so overhead counts only what is not hidden.

The model has random weights, so the per-slice safety check would flag every slice and send its
fallback; the benchmark runs with ``fallback="none"`` so no fallback reconstruction is timed. Model
time counts every network forward, the safety check's re-run without withheld lines included, so
overhead is the pipeline around the network (the check's FFTs and norms among it).

:func:`run_compression_bench` measures PCA coil compression (``coil_compression``): the same simulated
many-coil scan reconstructed by the shipped weights twice in one run, all coils and N virtual coils;
time per slice and SSIM/PSNR of the compressed image against the uncompressed one and both against the
fully sampled reference (fastMRI's target: RSS of the noisy fully sampled k-space, cropped).
"""
from __future__ import annotations

import os
import platform
import socket
import threading
import time

import torch

from .model_bench import CONFIGS
from .scans import simulated_scan


def run_pipeline_bench(slices: int = 16, coils: int = 12, recon_size: tuple[int, int] = (160, 128),
                       config: str = "small", threads: int = 2, seed: int = 0) -> dict:
    from gadget.model.varnet import VarNet
    from gadget.recon.config import ReconConfig
    from gadget.recon.engine import Reconstructor
    from gadget.server import ReconService
    from gadget.stream.codec import MessageId, MessageReader, MessageWriter

    torch.set_num_threads(threads)
    xml, lines, _ = simulated_scan(slices, coils, recon_size, seed)
    torch.manual_seed(seed)
    engine = Reconstructor(VarNet(**CONFIGS[config]), "cpu")
    service = ReconService(ReconConfig(checkpoint="bench", fallback="none"), engine, "random weights")
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=service.serve, kwargs=dict(port=0, ready=ready, stop=stop), daemon=True)
    server.start()
    ready.wait(10)
    nbytes = sum(ln.data.nbytes + 342 for ln in lines)
    with socket.create_connection(("127.0.0.1", service.address[1])) as sock:
        writer = MessageWriter(sock)

        def send():
            writer.config_file("default")
            writer.header(xml)
            for ln in lines:
                writer.acquisition(ln)
            writer.close()

        t0 = time.perf_counter()
        sender = threading.Thread(target=send)
        sender.start()
        reader, images, first = MessageReader(sock), 0, None
        while (msg := reader.read()) is not None and msg.id != MessageId.CLOSE:
            if msg.id == MessageId.IMAGE:
                images += 1
                first = first or time.perf_counter() - t0
                last = time.perf_counter() - t0
        sender.join()
    stop.set()
    server.join(5)
    result = service.recent[-1]
    overhead = last - result.model_seconds
    return {"slices": slices, "coils": coils, "kspace": (2 * recon_size[0], recon_size[1]), "config": config,
            "images": images, "stream_mb": nbytes / 1e6, "total_s": last, "first_image_s": first,
            "model_s": result.model_seconds, "overhead_s": overhead,
            "overhead_pct": 100 * overhead / result.model_seconds, "threads": threads}


def format_table(r: dict) -> str:
    return (f"pipeline benchmark: {r['slices']} slices x {r['coils']} coils x {r['kspace'][0]}x{r['kspace'][1]} "
            f"k-space ({r['stream_mb']:.1f} MB), model config '{r['config']}', MRD server over loopback, "
            f"{r['threads']} threads, {platform.machine()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n"
            "| images | first image s | last image s | model s | overhead s | overhead % of model |\n"
            "|---|---|---|---|---|---|\n"
            f"| {r['images']} | {r['first_image_s']:.2f} | {r['total_s']:.2f} | {r['model_s']:.2f} | "
            f"{r['overhead_s']:.3f} | {r['overhead_pct']:.1f} |")


def _reconstruct(xml: str, lines: list, engine, model_id: str, virtual_coils: int) -> tuple[list, float, float]:
    """One scan through :class:`ScanReconstructor` (in process, one thread of work): ``(magnitudes (H, W)
    float32, wall seconds, model seconds)``. Prewhitening off: the reference is the RSS of unwhitened data."""
    from gadget.recon.config import ReconConfig
    from gadget.recon.pipeline import ScanReconstructor
    from gadget.stream.images import image_magnitude

    config = ReconConfig(device="cpu", fallback="none", prewhiten=False, coil_compression=virtual_coils)
    scan = ScanReconstructor(xml, config, engine, source=f"compression-bench-{virtual_coils or 'all'}",
                             model_id=model_id)
    t0 = time.perf_counter()
    images = [image_magnitude(i) for i in scan.run(lines) if hasattr(i, "meta")]
    return images, time.perf_counter() - t0, scan.stats.model_seconds


def run_compression_bench(slices: int = 3, coils: int = 32, virtual_coils: int = 12,
                          recon_size: tuple[int, int] = (160, 128), threads: int = 2, seed: int = 0,
                          checkpoint: str | None = None) -> dict:
    """All ``coils`` vs ``virtual_coils`` virtual coils, the same scan and weights (default: the shipped
    ones), CPU. Each variant first reconstructs the scan's first slice once untimed (warm-up)."""
    import numpy as np

    from gadget.mri.metrics import center_crop, psnr, ssim
    from gadget.recon.config import ReconConfig
    from gadget.recon.pipeline import build_engine

    if not 0 < virtual_coils < coils:
        raise ValueError(f"virtual coils must be in 1..{coils - 1}, got {virtual_coils}")
    torch.set_num_threads(threads)
    xml, lines, reference = simulated_scan(slices, coils, recon_size, seed)
    engine, model_id = build_engine(ReconConfig(device="cpu", checkpoint=checkpoint))
    first = [ln for ln in lines if int(ln.head["idx"]["slice"]) == 0]
    rows = {}
    for keep in (0, virtual_coils):
        _reconstruct(xml, first, engine, model_id, keep)  # warm-up
        images, wall, model = _reconstruct(xml, lines, engine, model_id, keep)
        if len(images) != slices:
            raise RuntimeError(f"expected {slices} images, got {len(images)}")
        rows[keep] = {"images": np.stack([center_crop(i, reference.shape[1:]) for i in images]),
                      "wall_per_slice": wall / slices, "model_per_slice": model / slices}
    full, small = rows[0]["images"], rows[virtual_coils]["images"]
    peak = float(reference.max())
    for row in rows.values():
        row["ssim_ref"] = ssim(reference, row["images"], peak)
        row["psnr_ref"] = psnr(reference, row["images"], peak)
    rows[virtual_coils]["ssim_uncompressed"] = ssim(full, small, float(full.max()))
    rows[virtual_coils]["psnr_uncompressed"] = psnr(full, small, float(full.max()))
    return {"slices": slices, "coils": coils, "virtual_coils": virtual_coils, "kspace": (2 * recon_size[0],
            recon_size[1]), "threads": threads, "model": model_id,
            "rows": {k: {n: v for n, v in r.items() if n != "images"} for k, r in rows.items()}}


def format_compression_table(r: dict) -> str:
    rows = r["rows"]
    out = [f"coil compression: {r['slices']} slices x {r['coils']} coils x {r['kspace'][0]}x{r['kspace'][1]} k-space, "
           f"acceleration 4 (equispaced, 8 % centre), weights {r['model']}, CPU {r['threads']} threads, "
           f"{platform.machine()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; time per slice: the whole "
           "pipeline in process (assembly, compression, network incl. the safety check's second forward, images)",
           "| coils | s/slice | model s/slice | SSIM vs uncompressed | PSNR vs uncompressed dB | SSIM vs fully sampled "
           "| PSNR vs fully sampled dB |",
           "|---|---|---|---|---|---|---|"]
    for keep, row in rows.items():
        name = f"{r['coils']} (uncompressed)" if keep == 0 else f"{r['coils']} -> {keep}"
        vs = ("1 (itself)", "inf") if keep == 0 else (f"{row['ssim_uncompressed']:.4f}",
                                                      f"{row['psnr_uncompressed']:.2f}")
        out.append(f"| {name} | {row['wall_per_slice']:.2f} | {row['model_per_slice']:.2f} | {vs[0]} | {vs[1]} | "
                   f"{row['ssim_ref']:.4f} | {row['psnr_ref']:.2f} |")
    return "\n".join(out)
