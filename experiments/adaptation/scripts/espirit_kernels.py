"""ESPIRiT's kernel width against the number of calibration lines: which width gives maps a solve can use?

For each row and acceleration of ``adaptation_matrix.py`` (the same slice, mask and scores; the rows with
``96``, ``160`` or ``180`` in their name are extra matrix sizes of its simulated rows, giving 4, 6, 7 and 8
calibration lines), the refine's ESPIRiT (``REFINE_ESPIRIT``) on the measured calibration lines with a
kernel of exactly 2 to 6, then plain ℓ1-wavelet SENSE with those maps (``gadget.recon.sparse.solve``, λ 0, 60
FISTA steps from the maps' combination of the zero-filled coil images) at μ 0.001, 0.002, 0.005 and 0.01;
prints the best in-head PSNR dB over μ per width, and the width :func:`calibration_kernel` picks (the
baselines' and the ``cs`` stage's rule).

    python experiments/adaptation/scripts/espirit_kernels.py --rows sim-pd,sim-pd96,sim-pd160 --accel 4,8
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_matrix as am  # noqa: E402  (the matrix's rows, masks and scores)

from gadget.baselines.espirit import calibrated_maps, calibration_kernel, espirit_calibration  # noqa: E402
from gadget.mri.fft import ifft2c  # noqa: E402
from gadget.mri.metrics import center_crop  # noqa: E402
from gadget.recon import sparse  # noqa: E402
from gadget.recon.refine import REFINE_ESPIRIT  # noqa: E402

EXTRA_ROWS = {  # more matrix sizes, so that 4× and 8× give 4 to 14 calibration lines
    "sim-pd96": dict(source="mni", contrast="pdw", num_coils=12, recon_size=(96, 96), snr_db=40),
    "sim-20coil96": dict(source="colin", num_coils=20, recon_size=(96, 96), snr_db=40),
    "sim-pd160": dict(source="mni", contrast="pdw", num_coils=12, recon_size=(160, 160), snr_db=40),
    "sim-8coil180": dict(source="colin", num_coils=8, recon_size=(180, 180), snr_db=40),
}
MUS = (0.001, 0.002, 0.005, 0.01)
WIDTHS = (2, 3, 4, 5, 6)


def best_psnr(row: am.Row, accel: int, kernel: int) -> float:
    mask, acs = am.undersample(row, accel)
    measured = torch.from_numpy(row.kspace * mask)
    config = dataclasses.replace(REFINE_ESPIRIT, kernel=kernel, phase_positions=1)  # exactly this width
    maps, _ = calibrated_maps(espirit_calibration(measured, acs, mask=mask, config=config), config)
    prior = (ifft2c(measured) * maps.conj()).sum(0)
    images = sparse.solve(maps, measured, torch.from_numpy(mask), prior, [0.0] * len(MUS), list(MUS), 60)
    return max(am.scores(center_crop(x.abs().numpy(), row.truth.shape), row)["head"][1] for x in images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="sim-pd,sim-20coil,ood-brain,ood-brain-hi,sim-320," + ",".join(EXTRA_ROWS))
    p.add_argument("--accel", default="4,8")
    p.add_argument("--real-dir", type=Path, default=am.REAL)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    am.SIM_ROWS.update(EXTRA_ROWS)
    print("| row | R | lines | " + " | ".join(f"kernel {k}" for k in WIDTHS) + " | picked |")
    print("|---" * (len(WIDTHS) + 4) + "|")
    for name in args.rows.split(","):
        row = am.load_row(name, args.real_dir)
        for accel in map(int, args.accel.split(",")):
            acs = am.undersample(row, accel)[1]
            cells = [f"{best_psnr(row, accel, k):.2f}" if k <= acs else "–" for k in WIDTHS]
            print(f"| {name} | {accel}× | {acs} | " + " | ".join(cells) + f" | {calibration_kernel(acs, 6)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
