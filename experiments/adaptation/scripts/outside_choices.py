"""What the ``cs`` refine sends where its coil maps vanish, on rows of the adaptation matrix.

``adapt: solve`` as the defaults run it (the held-back lines choose the maps, λ, μ and what goes where the maps
vanish), then the slice reconstructed with each alternative there: the network's image, that image capped at
the noise floor outside the maps' region grown by 0, 2 (the default, ``EXTERIOR_MARGIN``) or 4 pixels, and
nothing (cap 0, no margin; holes in the maps' region keep the network's image). Scores as in
adaptation_matrix.py: SSIM / PSNR dB, whole image against the noisy RSS and in-head against the truth.

    python experiments/adaptation/scripts/outside_choices.py --rows sim-pd:4,ood-brain-hi:8
    python experiments/adaptation/scripts/outside_choices.py --rows real-brain8x96:4 --real-dir variants
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_matrix as am  # noqa: E402  (the matrix's rows, masks and scores)

from gadget.mri.metrics import center_crop  # noqa: E402
from gadget.model.checkpoint import load_checkpoint, resolve_refine  # noqa: E402
from gadget.model.shipped import shipped_checkpoint  # noqa: E402
from gadget.recon import refine as refine_module  # noqa: E402
from gadget.recon.engine import Reconstructor  # noqa: E402
from gadget.recon.refine import RefineConfig  # noqa: E402
from gadget.recon.refine_stage import RefinedEngine, Refiner  # noqa: E402
from gadget.train.adapt import AdaptConfig, AdaptSlice  # noqa: E402
from gadget.train.adapt_run import adapt_to_scan  # noqa: E402
from gadget.train.solve_calibration import CalibrationConfig  # noqa: E402

#: label: (cs_outside, margin, cap scale)
VARIANTS = {
    "network": ("network", 0, 1.0),
    "capped, margin 0": ("capped", 0, 1.0),
    "capped, margin 2": ("capped", 2, 1.0),
    "capped, margin 4": ("capped", 4, 1.0),
    "nothing": ("capped", 0, 0.0),
}


def sent(adaptation, measured, mask, acs, outside: str, margin: int, scale: float):
    """The slice reconstructed with the calibrated cs refine, ``outside`` sent where the maps vanish."""
    exterior, floor = refine_module.map_exterior, refine_module.noise_floor
    refine_module.map_exterior = functools.partial(exterior, margin=margin)
    refine_module.noise_floor = lambda *a, **kw: floor(*a, **kw) * scale
    try:
        config = replace(adaptation.refiner.config, cs_outside=outside)
        return RefinedEngine(adaptation.network, Refiner(config))(measured[None], mask, acs)[0]
    finally:
        refine_module.map_exterior, refine_module.noise_floor = exterior, floor


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True, help="row:acceleration, comma-separated (adaptation_matrix.py's rows)")
    p.add_argument("--real-dir", type=Path, default=am.REAL)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_checkpoint(shipped_checkpoint())
    mode, _ = resolve_refine("auto", loaded)
    engine = RefinedEngine(Reconstructor(loaded.model, "cpu"), Refiner(RefineConfig(mode=mode)))
    print("| row | R | maps; chosen outside | " + " | ".join(f"{v}: whole / in-head" for v in VARIANTS) + " |")
    print("|---" * (3 + len(VARIANTS)) + "|")
    for spec in args.rows.split(","):
        name, accel = spec.split(":")
        row = am.load_row(name, args.real_dir)
        mask, acs = am.undersample(row, int(accel))
        measured = row.kspace * mask
        adaptation = adapt_to_scan(engine.engine, [AdaptSlice(measured, mask, acs, name)], "solve", AdaptConfig(),
                                   CalibrationConfig(), name)
        if adaptation.refiner is None:
            print(f"| {name} | {accel}× | cs refine not used | " + " | ".join("–" for _ in VARIANTS) + " |")
            continue
        cells = []
        for outside, margin, scale in VARIANTS.values():
            image = center_crop(sent(adaptation, measured, mask, acs, outside, margin, scale), row.truth.shape)
            s = am.scores(image, row)
            cells.append(f"{s['whole'][0]:.3f} / {s['whole'][1]:.2f} ; {s['head'][0]:.3f} / {s['head'][1]:.2f}")
        solve = adaptation.solve
        print(f"| {name} | {accel}× | {solve.maps}; {solve.outside} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
