"""``varnet compare``: zero-filled, CG-SENSE, BART and E2E-VarNet on the same undersampled data."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from ..baselines.bart import BartConfig
    from ..baselines.sense import SenseConfig
    from . import add_precision_argument, add_refine_argument, example_epilog

    sense, bart = SenseConfig(), BartConfig()

    p = sub.add_parser(
        "compare", help="compare zero-filled, CG-SENSE, BART pics and E2E-VarNet on the same data",
        description=(
            "Reconstruct fastMRI-layout files with several methods and score them (fastMRI semantics) against\n"
            "target_noise_free when the file has it, else reconstruction_rss:\n"
            "  zero-filled  RSS of the zero-filled k-space;\n"
            "  sense        ESPIRiT maps (kernel 6, threshold 0.02, crop 0.95) + CG-SENSE (Tikhonov);\n"
            "  bart         BART ecalib -m1 + pics -S -l1 (skipped, with the reason, when 'bart' is not installed);\n"
            "  varnet       E2E-VarNet from --checkpoint (default: the shipped weights).\n"
            "Test-layout files (kspace + mask) use their own mask; fully sampled files need --acceleration\n"
            "and are undersampled with a fastMRI mask seeded by the file name.\n"
            "Each DIR_OR_FILE is one source, named by its directory name or file stem, or NAME=PATH (inputs\n"
            "given the same NAME are one source). Scores are means over volumes, per source and pooled ('all').\n"
            "--checkpoint NAME=PATH, repeated, adds one row per model (varnet:NAME) on the same masks;\n"
            "PATH 'shipped' is the packaged weights.\n"
            "Writes OUT/results.md (a table per source and the pooled one), OUT/results.csv (source, method,\n"
            "SSIM, PSNR, NMSE, s/slice, target; source 'all' = pooled) and OUT/figure.png (truth, each method\n"
            "and error maps for the middle slice of the first file)."),
        epilog=example_epilog(
            "varnet synth data/test --matrix 256 --slices 4 --acceleration 4",
            "varnet compare data/test --checkpoint model.pt --out results/ --max-slices 2",
            "varnet compare data/train/synth_mni_axial_000.h5 --acceleration 8 --center-fraction 0.04 "
            "--methods zero-filled,sense",
            "varnet compare mni=data/test_mni colin=data/test_colin --acceleration 4 "
            "--checkpoint new=runs/small/best.pt --checkpoint shipped-v1=shipped --out results/"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE",
                   help="fastMRI .h5 files or directories, each one source; NAME=PATH names it")
    p.add_argument("--checkpoint", action="append", metavar="[NAME=]PATH",
                   help="E2E-VarNet checkpoint (fastMRI state dict, Lightning .ckpt or ours; default: the shipped "
                        "weights); repeat as NAME=PATH to compare several models (rows varnet:NAME); "
                        "PATH 'shipped' = the packaged weights")
    p.add_argument("--methods", default="zero-filled,sense,bart,varnet",
                   help="comma-separated subset of zero-filled,sense,bart,varnet (default all)")
    p.add_argument("--out", type=Path, default=Path("compare_results"),
                   help="output directory (default ./compare_results)")
    p.add_argument("--max-slices", type=int, metavar="N", help="only the middle N slices of each file")
    p.add_argument("--target-key", default="auto", choices=("auto", "target_noise_free", "reconstruction_rss"),
                   help="target dataset (default auto: target_noise_free when present)")
    g = p.add_argument_group("undersampling fully sampled files")
    g.add_argument("--acceleration", type=float, metavar="R", help="acceleration of the mask")
    g.add_argument("--center-fraction", type=float, default=0.08, metavar="F", help="default 0.08")
    g.add_argument("--mask", default="equispaced-fraction", choices=("random", "equispaced", "equispaced-fraction"),
                   help="fastMRI mask kind (default equispaced-fraction)")
    g = p.add_argument_group("method settings (defaults from SenseConfig / BartConfig)")
    g.add_argument("--sense-iterations", type=int, default=sense.iterations,
                   help=f"CG iterations (default {sense.iterations})")
    g.add_argument("--sense-lambda", type=float, default=sense.lam,
                   help=f"Tikhonov weight relative to ||A^H A|| (default {sense.lam:g})")
    g.add_argument("--bart-lambda", type=float, default=bart.lam,
                   help=f"pics -r L1-wavelet weight (default {bart.lam:g})")
    g.add_argument("--bart-iterations", type=int, default=bart.iterations,
                   help=f"pics -i (default {bart.iterations})")
    g.add_argument("--device", default="auto", help="E2E-VarNet device: auto, cpu, cuda, cuda:N")
    g.add_argument("--batch-size", type=int, default=1, help="E2E-VarNet slices per forward pass")
    add_precision_argument(g, default="fp32")
    add_refine_argument(g)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..baselines.bart import BartConfig
    from ..baselines.sense import SenseConfig
    from ..evaluation.compare import Undersample, compare_methods, parse_methods
    from ..evaluation.scoring import EvaluationError
    from ..recon.refine import RefineConfig
    from . import UserError

    if args.max_slices is not None and args.max_slices < 1:
        raise UserError("--max-slices must be >= 1")
    if args.sense_iterations < 1 or args.bart_iterations < 1 or args.batch_size < 1:
        raise UserError("iteration counts and --batch-size must be >= 1")
    undersample = None
    if args.acceleration is not None:
        undersample = Undersample(args.acceleration, args.center_fraction, args.mask)
    checkpoint = args.checkpoint  # a list of [NAME=]PATH (parsed by compare_methods) or None
    try:
        if checkpoint is None and "varnet" in parse_methods(args.methods):
            from ..model.shipped import resolve_checkpoint

            checkpoint = resolve_checkpoint(None)  # the shipped weights
        rows = compare_methods(
            args.inputs, args.methods, checkpoint, out_dir=args.out, max_slices=args.max_slices,
            undersample=undersample, target_key=args.target_key,
            sense_config=SenseConfig(iterations=args.sense_iterations, lam=args.sense_lambda),
            bart_config=BartConfig(lam=args.bart_lambda, iterations=args.bart_iterations),
            device=args.device, batch_size=args.batch_size, precision=args.precision,
            refine=RefineConfig(mode="pi" if args.refine == "auto" else args.refine, lam=args.refine_lambda),
            refine_from_checkpoint=args.refine == "auto")  # auto: each checkpoint's own
    except (EvaluationError, ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    print((args.out / "results.md").read_text())
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.csv'}"
          + (f", {args.out / 'figure.png'}" if (args.out / "figure.png").exists() else ""))
    return 1 if any(r["status"] == "failed" for r in rows) else 0
