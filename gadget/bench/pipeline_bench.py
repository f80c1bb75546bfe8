"""Pipeline overhead benchmark: a 16-slice simulated scan streamed over loopback TCP into the MRD
server; overhead = (first byte sent → last image received) − model time (measured in the server).
The model runs while later slices still stream in, so overhead counts only what is not hidden.

The model has random weights, so the per-slice safety check would flag every slice and send its
fallback; the benchmark runs with ``fallback="none"`` so no fallback reconstruction is timed. Model
time counts every network forward, the safety check's re-run without withheld lines included, so
overhead is the pipeline around the network (the check's FFTs and norms among it).
"""
from __future__ import annotations

import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch

from .model_bench import CONFIGS


def run_pipeline_bench(slices: int = 16, coils: int = 12, recon_size: tuple[int, int] = (160, 128),
                       config: str = "small", threads: int = 2, seed: int = 0) -> dict:
    from converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
    from converters.simulate import simulate_volume, write_fastmri
    from gadget.data.mrd_file import iter_acquisitions, read_header_xml
    from gadget.model.varnet import VarNet
    from gadget.recon.config import ReconConfig
    from gadget.recon.engine import Reconstructor
    from gadget.server import ReconService
    from gadget.stream.codec import MessageId, MessageReader, MessageWriter
    from gadget.stream.types import AcqLine

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="varnet-pipeline-bench-") as tmp:
        vol = simulate_volume(num_slices=slices, num_coils=coils, recon_size=recon_size, seed=seed)
        write_fastmri(Path(tmp) / "v.h5", vol)
        convert_fastmri_to_ismrmrd(Path(tmp) / "v.h5", Path(tmp) / "raw.h5", "equispaced-fraction", 4, 0.08, seed=1)
        xml = read_header_xml(Path(tmp) / "raw.h5")
        lines = [AcqLine(h, d) for c in iter_acquisitions(Path(tmp) / "raw.h5") for h, d in zip(c.heads, c.data)]
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
