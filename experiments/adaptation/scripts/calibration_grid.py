"""The cs refine's whole (λ, μ) grid on one row of the adaptation matrix: each candidate's held-out error (as
``adapt: solve`` scores it, the maps given) beside its image solved on all the lines and scored against the
truth. Shows whether the held-back lines rank the candidates as the truth does.

    python experiments/adaptation/scripts/calibration_grid.py --row sim-8coil230:4
    python experiments/adaptation/scripts/calibration_grid.py --row sim-8coil230:4 --folds 12 --held-out-only
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_matrix as am  # noqa: E402  (the matrix's rows, masks and scores)

from gadget.mri.metrics import center_crop  # noqa: E402
from gadget.model.checkpoint import load_checkpoint  # noqa: E402
from gadget.model.shipped import shipped_checkpoint  # noqa: E402
from gadget.recon.engine import Reconstructor  # noqa: E402
from gadget.recon.refine import RefineConfig  # noqa: E402
from gadget.recon.refine_stage import RefinedEngine, Refiner  # noqa: E402
from gadget.train import solve_calibration as cal  # noqa: E402
from gadget.train.adapt import AdaptSlice  # noqa: E402


def held_out_errors(engine, sl: AdaptSlice, settings: cal.CalibrationConfig, maps: str) -> tuple:
    """``(errors (folds, P), network (folds,), noise (folds,))``: every grid candidate's held-out error on
    each fold (the solve alone), the network's and the noise's."""
    lam, mu = settings.candidates()
    folds = cal.outer_folds(sl.mask, sl.split_acs, settings.folds, np.random.default_rng(settings.seed))
    errors, network, noise = [], [], []
    for fold in folds:
        data = cal.hold_out(engine, sl, fold, RefineConfig(mode="cs", maps=maps))
        with torch.inference_mode():
            errors.append(cal.fold_errors(data, lam, mu, settings)[:, 0].numpy())
            network.append(float(data.error(data.network)))
        noise.append(data.noise)
    return np.stack(errors), np.array(network), np.array(noise)


def searched(per_fold: np.ndarray, settings: cal.CalibrationConfig, within: bool) -> int:
    """The grid index the calibration's search picks from ``per_fold`` ``(folds, P)`` (the λ line at
    ``start_mu``, then the μ line; ``within``: at the least λ within one standard error, else the best λ)."""
    lam, mu = (t.numpy() for t in settings.candidates())
    line = [int(np.flatnonzero((lam == np.float32(a)) & (mu == np.float32(settings.start_mu)))[0])
            for a in settings.lams]
    pick = cal.lam_index(per_fold[:, line], replace(settings, lam_within_error=within))
    mu_line = [int(np.flatnonzero((lam == lam[line[pick]]) & (mu == np.float32(b)))[0]) for b in settings.mus]
    return mu_line[int(per_fold[:, mu_line].mean(0).argmin())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", required=True, help="row:acceleration (adaptation_matrix.py's rows)")
    p.add_argument("--folds", type=int, default=cal.CalibrationConfig.folds)
    p.add_argument("--maps", choices=("espirit", "network"), default="espirit")
    p.add_argument("--held-out-only", action="store_true", help="skip the images against the truth")
    p.add_argument("--real-dir", type=Path, default=am.REAL)
    p.add_argument("--json", type=Path, default=None, help="also write every fold's errors and the scores here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    row, accel, mask, acs, measured = am.undersampled_row(args.row, args.real_dir)
    name = row.name
    engine = Reconstructor(load_checkpoint(shipped_checkpoint()).model, "cpu")
    settings = cal.CalibrationConfig(folds=args.folds)
    per_fold, network, noise = held_out_errors(engine, AdaptSlice(measured, mask, acs, name), settings, args.maps)
    errors = per_fold.mean(0)
    lam, mu = settings.candidates()
    picks = {within: searched(per_fold, settings, within) for within in (False, True)}
    print(f"{name} {accel}×, {args.maps} maps, {args.folds} folds: network {network.mean():.4f}, "
          f"noise {noise.mean():.4f}; the search picks λ {float(lam[picks[False]]):g} μ {float(mu[picks[False]]):g}, "
          f"with the least λ within one standard error λ {float(lam[picks[True]]):g} μ {float(mu[picks[True]]):g}\n")
    print("| λ | μ | held-out error | in-head SSIM / PSNR dB | whole SSIM / PSNR dB |")
    print("|---|---|---|---|---|")
    record = {"row": args.row, "maps": args.maps, "lam": lam.tolist(), "mu": mu.tolist(),
              "fold_errors": per_fold.tolist(), "network": network.tolist(), "noise": noise.tolist(), "scores": {}}
    for i in np.argsort(errors, kind="stable"):
        cells = ["–", "–"]
        if not args.held_out_only:
            chosen = cal.CalibrationResult(float(lam[i]), float(mu[i]), float(errors[i]), [], args.folds, 1, 0.0,
                                           maps=args.maps, outside="capped")
            image = RefinedEngine(engine, Refiner(chosen.refine_config()))(measured[None], mask, acs)[0]
            scores = am.scores(center_crop(image, row.truth.shape), row)
            cells = [f"{scores[tag][0]:.3f} / {scores[tag][1]:.2f}" for tag in ("head", "whole")]
            record["scores"][int(i)] = scores
        print(f"| {float(lam[i]):g} | {float(mu[i]):g} | {float(errors[i]):.4f} | {cells[0]} | {cells[1]} |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
