"""The default ``pi`` refine with ESPIRiT's old and new kernel rule, slice by slice on held-out whole heads.

For each file of a folder of fastMRI-format heads (the held-out matrix's INIA sets: ``data/head/test_inia``,
``data/head/test_inia_hi``), the middle two slices undersampled with an equispaced-fraction mask (seeded by
the file's path), the shipped weights and the ``pi`` refine with ESPIRiT's kernel shrunk only to the
calibration block (``phase_positions`` 1, the stage's setting) and with the baselines' rule (5); prints
the coils, matrix, ACS lines, and per slice the PSNR dB against the file's RSS target with the maps used
(``E`` ESPIRiT's, ``N`` the network's).

    python experiments/adaptation/scripts/pi_kernel_heads.py data/head/test_inia_hi --accel 4
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
from unittest import mock

import h5py
import numpy as np
import torch

from gadget.baselines.espirit import MIN_PHASE_POSITIONS
from gadget.model.checkpoint import load_checkpoint
from gadget.model.shipped import shipped_checkpoint
from gadget.mri.masks import make_mask
from gadget.mri.metrics import center_crop
from gadget.recon import refine as refine_module
from gadget.recon.engine import Reconstructor
from gadget.recon.refine_stage import RefinedEngine, Refiner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--accel", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    centre = 0.08 if args.accel == 4 else 0.04
    engine = RefinedEngine(Reconstructor(load_checkpoint(shipped_checkpoint()).model, "cpu"),
                           Refiner(refine_module.RefineConfig(mode="pi")))
    sources = []
    choose = refine_module.choose_maps

    def recording(*a, **kw):
        maps, used = choose(*a, **kw)
        sources.append(used[0])
        return maps, used

    for path in sorted(glob.glob(f"{args.folder}/*.h5")):
        with h5py.File(path) as f:
            kspace, target = f["kspace"][()], f["reconstruction_rss"][()]
        cells = []
        for positions in (1, MIN_PHASE_POSITIONS):
            espirit = dataclasses.replace(refine_module.REFINE_ESPIRIT, phase_positions=positions)
            with mock.patch.object(refine_module, "REFINE_ESPIRIT", espirit), \
                    mock.patch.object(refine_module, "choose_maps", recording):
                for s in (kspace.shape[0] // 2 - 1, kspace.shape[0] // 2):
                    mask, acs = make_mask("equispaced_fraction", kspace.shape[-1], args.accel, centre,
                                          seed=tuple(map(ord, path)))
                    mask = mask.astype(bool)
                    image = center_crop(engine((kspace[s] * mask)[None], mask, acs)[0], target.shape[-2:])
                    psnr = 10 * np.log10(target[s].max() ** 2 / ((image - target[s]) ** 2).mean())
                    cells.append(f"{psnr:.2f}{'E' if sources[-1] == 'espirit' else 'N'}")
        print(f"{path.split('/')[-1]}: {kspace.shape[1]} coils, {kspace.shape[2]}×{kspace.shape[3]}, {acs} ACS lines; "
              f"block kernel {' '.join(cells[:2])}; baselines' rule {' '.join(cells[2:])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
