"""Cost of self-supervised adaptation with the shipped weights and the per-scan defaults.

Prints one table: for each shape, the time of one network forward (what reconstruction costs), of
``adapt: solve`` (the cs refine's calibration on the scan, run once, plus the cs refine of every slice),
of one weight-adaptation step (``splits_per_step`` forwards and backwards), of one Γ score per slice, and
of the whole default weight adaptation (``--full``: run it; else estimated from the step count, the
evaluation interval and the slices scored); ``adapt: scan`` costs the solve column plus the last.
Random-phase simulated k-space; threads as the product uses; ``--workers``: the calibration's folds side by
side, as ``varnet infer``/``replay --workers`` run them, and a weight step's splits side by side (the
per-slice refine is timed one slice at a time).

    python experiments/adaptation/scripts/adapt_cost.py --repeats 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gadget.model.checkpoint import load_checkpoint
from gadget.model.shipped import shipped_checkpoint
from gadget.recon.engine import Reconstructor
from gadget.recon.refine_stage import Refiner
from gadget.train.adapt import (AdaptConfig, AdaptSlice, _Prepared, _trainable, accumulate_split_gradients, adapt,
                                gamma_score)
from gadget.train.solve_calibration import calibrate_solve
from gadget.train.splits import holdout_lines, seeded_rng, split_lines

CASES = [  # (label, coils, readout, phase, slices)
    ("128² slice, 16 coils", 16, 128, 128, 1),
    ("230×180 slice, 8 coils", 8, 230, 180, 1),
    ("20-slice 256² volume, 16 coils", 16, 256, 256, 20),
]


def _slice(coils: int, readout: int, phase: int, rng: np.random.Generator) -> AdaptSlice:
    y, x = np.mgrid[-1:1:readout * 1j, -1:1:phase * 1j]
    image = ((x ** 2 + y ** 2) < 0.7).astype(np.float32) * np.exp(1j * 2 * x)
    maps = np.exp(-((x[None] - rng.uniform(-1, 1, (coils, 1, 1))) ** 2 + (y[None] - rng.uniform(-1, 1, (coils, 1, 1))) ** 2))
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * image, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    k = (k + 0.01 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))).astype(np.complex64)
    acs = int(round(0.08 * phase))
    mask = np.zeros(phase, bool)
    mask[::4] = True
    mask[(phase - acs + 1) // 2:(phase - acs + 1) // 2 + acs] = True
    return AdaptSlice(k * mask, mask, acs, f"{readout}x{phase}")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _solve_time(model, sl: AdaptSlice, slices: int, repeats: int, workers: int = 1) -> str:
    """``adapt: solve`` for a scan of ``slices`` copies of ``sl``: the calibration (once, its folds on
    ``workers``) and the network plus the calibrated cs refine per slice (median of ``repeats``)."""
    engine = Reconstructor(model.eval(), "cpu", forwards=workers)
    t0 = time.perf_counter()
    result = calibrate_solve(engine, [sl] * slices)
    t_cal = time.perf_counter() - t0
    refiner = Refiner(result.refine_config())

    def reconstruct():
        image, final = engine.run_tensors(sl.kspace[None], sl.mask, sl.acs)
        refiner(image, final, sl.kspace, sl.mask, sl.acs)

    per_slice = _median_time(reconstruct, repeats)
    return f"{t_cal + slices * per_slice:.0f} ({t_cal:.0f} + {slices} × {per_slice:.1f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full", type=int, default=0, help="run the whole default adaptation for the first N cases")
    p.add_argument("--workers", type=int, default=2,
                   help="the calibration's folds and a step's splits side by side (the doors' auto)")
    p.add_argument("--solve-only", action="store_true", help="only the forward and adapt solve columns")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model = load_checkpoint(shipped_checkpoint()).model
    settings = AdaptConfig()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.workers} worker(s); defaults: {settings.steps} steps, "
          f"{settings.splits_per_step} splits/step, Γ every {settings.eval_every} steps on <= {settings.eval_slices} slices")
    print("| case | forward s | adapt solve s (calibration + cs refine) | weight step s | Γ score s/slice | "
          "default weight adaptation s |")
    print("|---|---|---|---|---|---|")
    for n, (label, coils, readout, phase, slices) in enumerate(CASES):
        sl = _slice(coils, readout, phase, rng)
        gamma = holdout_lines(sl.mask, sl.acs, settings.split, seeded_rng(0, 1))
        prepared = _Prepared(sl, gamma, torch.device("cpu"))
        work = model.train()
        params = _trainable(work, settings.trainable)

        def step():  # one optimiser step's gradients, the splits on the workers as adapt() runs them
            splits = [(prepared, *split_lines(prepared.available, sl.acs, settings.split, seeded_rng(0, s)))
                      for s in range(settings.splits_per_step)]
            accumulate_split_gradients(work, params, splits, args.workers)

        def forward():
            with torch.inference_mode():
                model(prepared.kspace, torch.from_numpy(sl.mask), sl.acs)

        t_fwd = _median_time(forward, args.repeats)
        t_solve = _solve_time(model, sl, slices, args.repeats, args.workers)
        if args.solve_only:
            print(f"| {label} | {t_fwd:.2f} | {t_solve} | – | – | – |", flush=True)
            continue
        t_step = _median_time(step, args.repeats)
        model.zero_grad(set_to_none=True)
        t_gamma = _median_time(lambda: gamma_score(model.eval(), [prepared]), args.repeats)
        evals = settings.steps // settings.eval_every + 1
        estimate = settings.steps * t_step + evals * min(slices, settings.eval_slices) * t_gamma
        total = f"{estimate:.0f} (estimated)"
        if n < args.full:
            t0 = time.perf_counter()
            result = adapt(model, [sl] * slices, settings, workers=args.workers)
            total = f"{time.perf_counter() - t0:.0f} (run: {result.steps} steps, {result.stopped})"
        print(f"| {label} | {t_fwd:.2f} | {t_solve} | {t_step:.2f} | {t_gamma:.2f} | {total} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
