"""The noise level the cs refine's calibration reads, on rows of the adaptation matrix.

For each row and acceleration: the expected share of the noise in the held-back lines' energy (σ² per
sample over their energy, averaged over the calibration's folds: what ``solve_calibration.beats_network``
subtracts; σ here from all the acquired lines, where the calibration reads it from each fold's kept lines),
and σ as the refine reads it (the outer eighth of the readout, :func:`gadget.recon.refine.noise_sigma`)
over σ read the same way from the outer 32nd only (signal left in the band would show as a ratio above 1:
the object's k-space falls towards the edge, noise does not) and over σ from the image background of the
fully sampled slice (the darkest 10 % of the 9-pixel-smoothed RSS, all coils; below the k-space σ where the
noise is lower at the edges of the field of view than on average, as behind a receiver's filter).

    python experiments/adaptation/scripts/noise_level.py --rows sim-8coil230,real-brain16 --accel 4,8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_matrix as am  # noqa: E402  (the matrix's rows and masks)

from gadget.recon.refine import noise_sigma  # noqa: E402
from gadget.train.adapt import AdaptSlice  # noqa: E402
from gadget.train.solve_calibration import CalibrationConfig, noise_share, outer_folds  # noqa: E402


def background_sigma(kspace: np.ndarray) -> float:
    """σ per coil sample from the darkest 10 % of the smoothed RSS of the fully sampled ``kspace``
    ``(coil, readout, phase)``."""
    coils = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), axes=(-2, -1), norm="ortho"),
                            axes=(-2, -1))
    smooth = ndimage.uniform_filter(np.sqrt((np.abs(coils) ** 2).sum(0)), 9)
    background = smooth < np.quantile(smooth, 0.10)
    return float(np.sqrt((np.abs(coils[:, background]) ** 2).mean()))


def readout_sigma(kspace: np.ndarray, mask: np.ndarray, fraction: int = 8) -> float:
    """σ as :func:`gadget.recon.refine.noise_sigma` reads it from the outer ``1 / fraction`` of the readout."""
    return float(noise_sigma(torch.from_numpy(kspace[None]), torch.from_numpy(mask), fraction)[0])


def held_back_noise(measured: np.ndarray, mask: np.ndarray, acs: int, settings: CalibrationConfig) -> float:
    """The folds' mean noise share of the held-back lines' energy (σ from all the acquired lines)."""
    folds = outer_folds(mask, AdaptSlice(measured, mask, acs, "").split_acs, settings.folds,
                        np.random.default_rng(settings.seed))
    sigma = readout_sigma(measured, mask)
    return float(np.mean([noise_share(sigma, torch.from_numpy(measured[..., f])) for f in folds]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join([*am.SIM_ROWS, *am.OOD_ROWS, *am.MORE_SIM_ROWS, *am.REAL_ROWS]))
    p.add_argument("--accel", default="4,8")
    p.add_argument("--real-dir", type=Path, default=am.REAL)
    args = p.parse_args(argv)
    print("| row | R | held-back noise share | σ outer 8th / outer 32nd of the readout | σ outer 8th / background |")
    print("|---|---|---|---|---|")
    for name in args.rows.split(","):
        row = am.load_row(name, args.real_dir)
        background = background_sigma(row.kspace)
        every = np.ones(row.kspace.shape[-1], bool)
        edge = readout_sigma(row.kspace, every, 8) / readout_sigma(row.kspace, every, 32)
        for accel in map(int, args.accel.split(",")):
            mask, acs = am.undersample(row, accel)
            measured = (row.kspace * mask).astype(np.complex64)
            band = readout_sigma(measured, mask)
            share = held_back_noise(measured, mask, acs, CalibrationConfig())
            print(f"| {name} | {accel}× | {share:.3f} | {edge:.2f} | {band / background:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
