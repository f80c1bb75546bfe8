"""Adaptation matrix: does self-supervised adaptation help where the shipped weights meet data they never saw?

Rows: simulated shifts where the truth is known (a proton-density contrast, a 20-coil array, low SNR, a
320² matrix; 1 test slice each, noise-free target kept), INIA19's real T1 brain with a 10-coil birdcage
model at 30 and 50 dB (anatomy and coils no training set has), and the real scanner k-space in
../shared/data/real/ (retrospectively undersampled; no noise-free truth, so both scores are against the
RSS of the fully sampled data); ``--rows`` also takes the 8-coil 230×180 simulations of MORE_SIM_ROWS.
Columns: zero-filled, BART pics-L1 (ESPIRiT maps, λ 0.005), the shipped
weights (their default refinement), shipped + adapt per scan (on the test slice's own undersampled lines),
shipped + adapt per site (simulated rows only: adapted on two slices of another volume with the same
shift, scored on the unseen test slice). Masks: fastMRI equispaced-fraction, 4× centre 0.08 and 8× centre
0.04, seeded by the row's name. Scores: PSNR dB / SSIM on the whole image against the noisy RSS, and inside
the head (object mask: target above 10 % of its maximum, closed and filled) against the clean truth.

    python experiments/adaptation/scripts/adaptation_matrix.py --rows sim-pd,real-brain16 --accel 4 --out results/adaptation_matrix.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from gadget.converters.simulate import simulate_volume
from gadget.baselines.bart import BartConfig, find_bart, pics_l1
from gadget.model.checkpoint import load_checkpoint, resolve_refine
from gadget.model.shipped import shipped_checkpoint
from gadget.mri.masks import make_mask
from gadget.mri.metrics import center_crop
from gadget.recon.engine import Reconstructor
from gadget.recon.refine import RefineConfig
from gadget.recon.refine_stage import RefinedEngine, Refiner
from gadget.train.adapt import AdaptConfig, AdaptSlice
from gadget.train.adapt_run import adapt_to_scan, adapted_engine
from gadget.train.solve_calibration import CalibrationConfig

REAL = Path(__file__).resolve().parents[4] / "shared" / "data" / "real"  # beside the repository
SIM_ROWS = {  # name: simulate_volume arguments (seed of the test volume; the site volume uses seed + 100)
    "sim-pd": dict(source="mni", contrast="pdw", num_coils=12, recon_size=(128, 128), snr_db=40),
    "sim-20coil": dict(source="colin", num_coils=20, recon_size=(128, 128), snr_db=40),
    "sim-lowsnr": dict(source="mni", num_coils=12, recon_size=(128, 128), snr_db=12),
    "sim-320": dict(source="colin", num_coils=8, recon_size=(320, 320), snr_db=40),
}
#: Rows ``--rows`` accepts beyond the default matrix: 8 coils on a 230×180 matrix (readout oversampled 2×), the
#: size and coil count of the issue's 8-channel real brain, MNI at 35 dB and Colin27 at 30 dB.
MORE_SIM_ROWS = {
    "sim-8coil230": dict(source="mni", num_coils=8, recon_size=(230, 180), snr_db=35),
    "sim-8coil230c": dict(source="colin", num_coils=8, recon_size=(230, 180), snr_db=30),
}
REAL_ROWS = ("real-brain16", "real-phantom16", "real-phantom32", "real-phantom4")
OOD_ROWS = {  # name: SNR dB of INIA19's real T1 brain (an anatomy no training source has), 10-coil birdcage, 256²
    "ood-brain": 30.0,
    "ood-brain-hi": 50.0,
}


@dataclasses.dataclass
class Row:
    name: str
    kspace: np.ndarray               # complex64 (coil, readout, phase), fully sampled test slice
    truth: np.ndarray                # float32 (H, W): noise-free RSS (simulated) or the RSS of kspace (real)
    noisy: np.ndarray                # float32 (H, W): RSS of kspace, cropped
    site: list                       # fully sampled slices of the same shift for the site column


def rss_image(kspace: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    coils = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), axes=(-2, -1), norm="ortho"),
                            axes=(-2, -1))
    return center_crop(np.sqrt((np.abs(coils) ** 2).sum(0)).astype(np.float32), crop)


def ood_slice(fraction: float, snr_db: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kspace, clean RSS)`` of INIA19's T1 slice at ``fraction`` of the brain's height, 10 birdcage
    coils, 256², a smooth random phase, complex Gaussian noise at ``snr_db`` (the held-out brain of
    docs/results/held-out-matrix.md, built by the same functions)."""
    from gadget.converters.simulate import centred_fft, correlated_noise, noise_sigma
    from gadget.converters.heldout import birdcage_sensitivities, inia_t1_slice

    rng = np.random.default_rng(seed)
    size = 256
    image = inia_t1_slice(fraction, size)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    phase = rng.uniform(-np.pi, np.pi) + rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx
    clean = centred_fft(centred_fft(birdcage_sensitivities(size, 10) * (image * np.exp(1j * phase))[None], -2), -1)
    clean = (clean / np.abs(clean).max()).astype(np.complex64)
    truth = rss_image(clean, (size, size))
    noise = correlated_noise(clean.shape, np.eye(10) * noise_sigma(truth, snr_db) ** 2, rng)
    return (clean + noise).astype(np.complex64), truth


def load_row(name: str, real_dir: Path = REAL) -> Row:
    if name in OOD_ROWS:
        kspace, truth = ood_slice(0.5, OOD_ROWS[name], seed=21)
        site, _ = ood_slice(0.6, OOD_ROWS[name], seed=121)
        return Row(name, kspace, truth, rss_image(kspace, truth.shape), [site])
    if name in SIM_ROWS or name in MORE_SIM_ROWS:
        args = SIM_ROWS.get(name) or MORE_SIM_ROWS[name]
        vol = simulate_volume(num_slices=3, seed=21, **args)
        site = simulate_volume(num_slices=2, seed=121, **args)
        middle = 1
        return Row(name, vol.kspace[middle], vol.target[middle], vol.target_rss[middle], list(site.kspace))
    file = real_dir / f"{name.removeprefix('real-')}_kspace.npy"
    kspace = np.load(file).transpose(0, 2, 1).astype(np.complex64)  # (coil, ky, kx) -> (coil, readout, phase)
    full = rss_image(kspace, kspace.shape[-2:])
    return Row(name, kspace, full, full, [])


def head_mask(truth: np.ndarray) -> np.ndarray:
    mask = ndimage.binary_closing(truth > 0.1 * truth.max(), iterations=3)
    return ndimage.binary_fill_holes(mask)


def scores(image: np.ndarray, row: Row) -> dict:
    out = {}
    for tag, target in (("whole", row.noisy), ("head", row.truth)):
        mask = np.ones(target.shape, bool) if tag == "whole" else head_mask(row.truth)
        peak = float(target.max())
        mse = float(((image - target)[mask] ** 2).mean())
        _, ssim_map = structural_similarity(target / peak, image / peak, data_range=1.0, win_size=7,
                                            full=True)  # at unit scale: SSIM's constants underflow on tiny data
        out[tag] = (float(ssim_map[mask].mean()), 10 * np.log10(peak ** 2 / mse))
    return out


def undersample(row: Row, accel: int):
    width = row.kspace.shape[-1]
    mask, acs = make_mask("equispaced_fraction", width, accel, 0.08 if accel == 4 else 0.04,
                          seed=tuple(map(ord, row.name)))
    return mask.astype(bool), int(acs)


def undersampled_row(spec: str, real_dir: Path = REAL) -> tuple[Row, int, np.ndarray, int, np.ndarray]:
    """``(row, acceleration, mask, acs, measured k-space)`` of ``spec`` (``row:acceleration``), undersampled as
    the matrix does it (for the scripts that look at one cell)."""
    name, accel = spec.split(":")
    row = load_row(name, real_dir)
    mask, acs = undersample(row, int(accel))
    return row, int(accel), mask, acs, row.kspace * mask


COLUMNS = ("solve", "scan", "site")
VERDICTS = {"folds": "used", "discrepancy": "used (noise level)", "none": "not used"}  # CalibrationResult.rule


def run_row(row: Row, accel: int, engine: Reconstructor, settings: AdaptConfig, use_bart: bool,
            columns=COLUMNS) -> dict:
    """One row at one acceleration. ``columns``: which adapted columns to run: ``solve`` (the cs refine
    calibrated on the test slice), ``scan`` (that and the weights adapted on the test slice), ``site``
    (weights adapted on other slices of the same shift, the cs refine calibrated on the test slice)."""
    mask, acs = undersample(row, accel)
    crop = row.truth.shape
    measured = row.kspace * mask
    result, seconds, steps = {}, {}, {}
    result["zero-filled"] = rss_image(measured, crop)
    if use_bart:
        try:
            result["BART pics-L1"] = center_crop(np.abs(pics_l1(measured, BartConfig(lam=0.005), acs)), crop)
        except Exception as exc:  # BART's ESPIRiT fails on some slices: a cell, not a crash
            print(f"  {row.name} {accel}x: BART failed: {exc}", file=sys.stderr)
    result["shipped"] = center_crop(engine(measured[None], mask, acs)[0], crop)
    own = [AdaptSlice(measured, mask, acs, f"{row.name}/test")]
    runs = {"solve": ("shipped + solve (scan)", own), "scan": ("shipped + adapt (scan)", own)}
    if row.site:
        runs["site"] = ("shipped + adapt (site)",
                        [AdaptSlice(k * mask, mask, acs, f"{row.name}/site{i}") for i, k in enumerate(row.site)])
    for column in [c for c in columns if c in runs]:
        label, slices = runs[column]
        t0 = time.perf_counter()
        if column == "site":  # the site's weights, then the solve calibrated on the test scan
            site_engine, info = adapted_engine(engine.engine, slices, settings, row.name + " (site)")
            adaptation = adapt_to_scan(site_engine, own, "solve", settings, CalibrationConfig(), row.name)
            steps[column] = f"{info.best_step}/{info.steps}"
        else:
            adaptation = adapt_to_scan(engine.engine, slices, column, settings, CalibrationConfig(), row.name)
            if adaptation.weights is not None:
                steps[column] = f"{adaptation.weights.best_step}/{adaptation.weights.steps}"
        seconds[column] = time.perf_counter() - t0
        scan_engine = RefinedEngine(adaptation.network, adaptation.refiner or engine.refiner)
        result[label] = center_crop(scan_engine(measured[None], mask, acs)[0], crop)
        solve = adaptation.solve
        maps = (" ESPIRiT's maps" if solve.maps == "espirit" else "") + \
            (" capped outside" if solve.outside == "capped" else "")
        steps[column + " solve"] = (f"λ {solve.lam:g} μ {solve.mu:g}{maps} {VERDICTS[solve.rule]} "
                                    f"(error {solve.score:.3f}, network {solve.network_score:.3f}, "
                                    f"noise {solve.noise_score:.3f})")
    return {"row": row.name, "accel": accel, "scores": {k: scores(v, row) for k, v in result.items()},
            "adapt_seconds": seconds, "adapt_steps": steps}


def markdown(results: list[dict]) -> str:
    methods = []
    for r in results:
        methods += [m for m in r["scores"] if m not in methods]
    lines = ["| row | R | score | " + " | ".join(methods) + " | adaptation s; choices |",
             "|---|---|---|" + "---|" * len(methods) + "---|"]
    for r in results:
        for tag, label in (("whole", "whole, vs noisy RSS"), ("head", "in-head, vs truth")):
            cells = [f"{r['scores'][m][tag][0]:.3f} / {r['scores'][m][tag][1]:.2f}" if m in r["scores"] else "–"
                     for m in methods]
            timing = (" / ".join(f"{k} {v:.0f}" for k, v in r["adapt_seconds"].items()) if tag == "whole"
                      else "; ".join(f"{k}: {v}" for k, v in r["adapt_steps"].items()))
            lines.append(f"| {r['row']} | {r['accel']}× | {label} | " + " | ".join(cells) + f" | {timing} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join([*SIM_ROWS, *OOD_ROWS, *REAL_ROWS]))
    p.add_argument("--accel", default="4,8")
    p.add_argument("--out", type=Path, default=None, help="markdown table (and .json beside it)")
    p.add_argument("--no-bart", action="store_true")
    p.add_argument("--columns", default=",".join(COLUMNS), help="adapted columns to run: solve, scan, site")
    p.add_argument("--real-dir", type=Path, default=REAL, help="folder of the real k-space (*_kspace.npy)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_checkpoint(shipped_checkpoint())
    mode, _ = resolve_refine("auto", loaded)
    engine = RefinedEngine(Reconstructor(loaded.model, "cpu"), Refiner(RefineConfig(mode=mode)))
    settings = AdaptConfig()  # the per-scan defaults (varnet infer --adapt scan)
    use_bart = not args.no_bart and find_bart() is not None
    results = []
    for name in args.rows.split(","):
        row = load_row(name, args.real_dir)
        for accel in map(int, args.accel.split(",")):
            results.append(run_row(row, accel, engine, settings, use_bart, args.columns.split(",")))
            print(markdown(results[-1:]), flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
