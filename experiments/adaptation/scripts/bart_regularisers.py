"""BART's own regularisers on the adaptation matrix's rows: is an ℓ1 prior other than the wavelet a lever?

For each row and acceleration of ``adaptation_matrix.py`` (the same slice, mask and scores), BART's ESPIRiT
maps (``ecalib -m1``) and ``pics`` with the ℓ1 wavelet (``-R W:3:0:λ``), total variation (``-R T:3:0:λ``)
or both at several λ; prints in-head and whole-image PSNR dB per setting. The project's BART column is the
wavelet at λ 0.005.

    python experiments/adaptation/scripts/bart_regularisers.py --rows ood-brain,ood-brain-hi --accel 4,8
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_matrix as matrix  # noqa: E402  (this folder's script, for its rows, masks and scores)

from gadget.baselines.bart import read_cfl, require_bart, to_bart_slice, write_cfl  # noqa: E402
from gadget.mri.metrics import center_crop  # noqa: E402

SETTINGS = ("W:3:0:0.002", "W:3:0:0.005", "W:3:0:0.01", "W:3:0:0.02",
            "T:3:0:0.002", "T:3:0:0.005", "T:3:0:0.01", "T:3:0:0.02",
            "W:3:0:0.005 T:3:0:0.005", "W:3:0:0.0025 T:3:0:0.0025")


def run(row: matrix.Row, accel: int, iterations: int = 50) -> dict:
    """``{setting: (in-head PSNR, whole PSNR)}``, or ``{"error": message}`` where BART's ESPIRiT fails."""
    mask, _ = matrix.undersample(row, accel)
    measured = row.kspace * mask
    out = {}
    with tempfile.TemporaryDirectory(prefix="varnet-bart-reg-") as tmp:
        write_cfl(Path(tmp) / "kspace", to_bart_slice(measured))
        done = subprocess.run(["bart", "ecalib", "-m1", "kspace", "maps"], cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            return {"error": f"ecalib exit {done.returncode}"}
        for setting in SETTINGS:
            args = ["bart", "pics", "-S", "-i", str(iterations)]
            for term in setting.split():
                args += ["-R", term]
            done = subprocess.run([*args, "kspace", "maps", "image"], cwd=tmp, capture_output=True, text=True)
            if done.returncode:
                out[setting] = None
                continue
            image = read_cfl(Path(tmp) / "image")
            image = np.abs(image.reshape(image.shape[0], image.shape[1])).astype(np.float32)
            s = matrix.scores(center_crop(image, row.truth.shape), row)
            out[setting] = (s["head"][1], s["whole"][1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="ood-brain,ood-brain-hi,real-brain16")
    p.add_argument("--accel", default="4,8")
    args = p.parse_args(argv)
    require_bart()
    print("| row | R | " + " | ".join(f"`{s}`" for s in SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    for name in args.rows.split(","):
        row = matrix.load_row(name)
        for accel in (int(a) for a in args.accel.split(",")):
            got = run(row, accel)
            if "error" in got:
                print(f"| {name} | {accel}× | BART: {got['error']} |")
                continue
            cells = ["failed" if got[s] is None else f"{got[s][0]:.2f} / {got[s][1]:.2f}" for s in SETTINGS]
            print(f"| {name} | {accel}× | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
