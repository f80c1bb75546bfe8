"""Speed of ``varnet synth``: simulated slices per second (12 coils, k-space 640×320, 2 threads).

    python experiments/synthesis/scripts/synth_bench.py [--coils 12] [--matrix 320] [--slices 4] [--threads 2] \
        [--preview PNG]

Prints one table row per anatomy source (anatomy loading is done before timing): the pure
simulation (``simulate_volume``) and simulation plus writing the fastMRI file. ``--preview``
saves a picture of one simulated MNI slice: noise-free truth, noisy RSS, four coil images and
the zero-filled 4× (equispaced-fraction, 8 % centre) reconstruction.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coils", type=int, default=12)
    p.add_argument("--matrix", type=int, default=320, help="image N; k-space 2N x N")
    p.add_argument("--slices", type=int, default=4, help="slices per timed volume")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sources", nargs="+", default=["phantom", "mni", "colin"])
    p.add_argument("--preview", type=Path, help="write a PNG of one simulated MNI slice here")
    return p.parse_args()


def _time_source(source: str, args) -> tuple[float, float] | None:
    from gadget.converters.anatomy import AnatomyUnavailable, load_anatomy
    from gadget.converters.simulate import simulate_volume, write_fastmri

    try:
        load_anatomy(source)
    except AnatomyUnavailable as exc:
        print(f"{source:8s} skipped: {exc}", file=sys.stderr)
        return None
    shape = (args.matrix, args.matrix)
    simulate_volume(1, args.coils, shape, source=source, workers=args.threads)  # warm-up
    start = time.perf_counter()
    vol = simulate_volume(args.slices, args.coils, shape, seed=1, source=source, workers=args.threads)
    simulate_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_fastmri(Path(tmp) / "v.h5", vol, with_noise=True)
        write_s = time.perf_counter() - start
    return args.slices / simulate_s, args.slices / (simulate_s + write_s)


def _preview(path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from gadget.converters.simulate import image_from_kspace, simulate_volume
    from gadget.mri.masks import make_mask

    vol = simulate_volume(1, args.coils, (args.matrix, args.matrix), seed=3, source="mni", workers=args.threads)
    k = vol.kspace[0]
    h = args.matrix
    crop = slice(h // 2, h // 2 + h)
    coil_images = np.abs(image_from_kspace(k))[:, crop]
    mask, _ = make_mask("equispaced-fraction", k.shape[-1], 4, 0.08, seed=0)
    zf = image_from_kspace(k * mask)[:, crop]
    zf = np.sqrt((np.abs(zf) ** 2).sum(0))
    coils = np.linspace(0, args.coils - 1, 4).round().astype(int)
    panels = [(vol.target[0], "noise-free truth (RSS)"), (vol.target_rss[0], f"noisy RSS, SNR {vol.snr_db:g} dB")]
    panels += [(coil_images[c], f"coil {c} |image|") for c in coils]
    panels += [(zf, "zero-filled 4x (equispaced-fraction)")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.5))
    vmax = float(vol.target[0].max())
    for ax, (img, title) in zip(axes.flat, panels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax if "coil" not in title else float(img.max()))
        ax.set_title(title)
        ax.axis("off")
    axes.flat[-1].imshow(np.log1p(np.abs(k[0]) / np.abs(k[0]).max() * 1e4), cmap="gray", aspect="auto")
    axes.flat[-1].set_title(f"coil 0 k-space (log), {k.shape[-2]}x{k.shape[-1]}")
    axes.flat[-1].axis("off")
    fig.suptitle(f"{vol.acquisition} axial, {args.coils} coils, slice at z = {vol.slice_positions_mm[0]:.1f} mm")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    print(f"preview: {path}")


def main() -> int:
    args = _parse()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    print(f"synth benchmark: {args.coils} coils, k-space {2 * args.matrix}x{args.matrix} (readout x phase), "
          f"{args.slices} slices/volume, {args.threads} threads, {os.cpu_count()} CPUs")
    print(f"{'source':8s} {'simulate slices/s':>18s} {'+ write slices/s':>17s}")
    for source in args.sources:
        rates = _time_source(source, args)
        if rates is not None:
            print(f"{source:8s} {rates[0]:18.2f} {rates[1]:17.2f}")
    if args.preview:
        _preview(args.preview, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
