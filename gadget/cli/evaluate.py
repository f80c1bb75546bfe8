"""``varnet evaluate``: fastMRI-style scores of reconstructions against targets."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser(
        "evaluate", help="score reconstructions against targets (NMSE, PSNR, SSIM; fastMRI semantics)",
        description=(
            "Score prediction files ('reconstruction' (slice, H, W), as written by 'varnet infer') against\n"
            "target files of the same name, as fastMRI's evaluate.py does: both volumes centre-cropped to\n"
            "(W, W) with W the target width (a wider-than-tall target: to (H, W)); NMSE over the volume,\n"
            "PSNR and SSIM (7x7) with data range = max of the target volume; then the mean over volumes\n"
            "(± sample std), overall and per 'acquisition' attribute. Prints a markdown table.\n"
            "Target 'auto': target_noise_free (files from 'varnet synth') when present, else reconstruction_rss."),
        epilog=example_epilog("varnet evaluate --targets data/synth_test --predictions recons/",
                              "varnet evaluate --targets multicoil_val --predictions recons "
                              "--target-key reconstruction_rss --csv scores.csv"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", required=True, type=Path, help="directory of target .h5 files (or one file)")
    p.add_argument("--predictions", required=True, type=Path,
                   help="directory of prediction .h5 files with the same names (or one file)")
    p.add_argument("--target-key", default="auto", choices=("auto", "target_noise_free", "reconstruction_rss"),
                   help="target dataset (default auto)")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write per-volume scores to this CSV file")
    p.add_argument("--skip-missing", action="store_true",
                   help="score only targets that have a prediction (default: a missing prediction is an error)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..evaluation.scoring import EvaluationError, evaluate_predictions
    from . import UserError

    try:
        result = evaluate_predictions(args.targets, args.predictions, args.target_key, args.skip_missing)
    except EvaluationError as exc:
        raise UserError(str(exc)) from None
    print(result.to_markdown())
    if args.csv:
        result.write_csv(args.csv)
        print(f"\nper-volume scores: {args.csv}")
    return 0
