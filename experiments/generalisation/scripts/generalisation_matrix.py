"""Generalisation matrix: each model against test sets seen in its training or held out.

    python experiments/generalisation/scripts/generalisation_matrix.py \
        experiments/generalisation/configs/generalisation_matrix.example.yaml --out results/generalisation

Reads the YAML spec (format: ``gadget/evaluation/generalisation.py`` and the example file), runs
``compare_methods`` once per acceleration with every test set and model in it, prints the matrix
(rows: test set × acceleration; columns: zero-filled, CG-SENSE, BART pics-L1, each model; cells
SSIM / PSNR, model cells marked "seen in training" or "held out") and writes OUT/matrix.md,
OUT/matrix.csv and each acceleration's ``varnet compare`` report under OUT/R{R}_cf{F}/.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    from gadget.recon.config import CHOICES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path,
                        help="YAML spec (see experiments/generalisation/configs/generalisation_matrix.example.yaml)")
    parser.add_argument("--out", type=Path, default=Path("generalisation_results"),
                        help="output directory (default ./generalisation_results)")
    parser.add_argument("--device", default="auto", help="E2E-VarNet device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--refine", choices=CHOICES["refine"], default="pi",
                        help="E2E-VarNet's refinement (gadget/recon/refine.py; default pi; auto: each "
                             "checkpoint's own, gadget.model.checkpoint.default_refine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from gadget.evaluation.generalisation import load_spec, run_matrix
    from gadget.evaluation.scoring import EvaluationError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        spec = load_spec(args.spec)
        from gadget.recon.refine import RefineConfig

        records = run_matrix(spec, args.out, device=args.device,
                             refine=RefineConfig(mode="pi" if args.refine == "auto" else args.refine),
                             refine_from_checkpoint=args.refine == "auto")
    except (EvaluationError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "matrix.md").read_text())
    print(f"written: {args.out / 'matrix.md'}, {args.out / 'matrix.csv'}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
