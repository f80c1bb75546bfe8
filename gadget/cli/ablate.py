"""``varnet ablate``: train and score the seed paper's four model variants (Tables 1–2, Fig. 3)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser(
        "ablate", help="the paper's model ablation: VN, VNU, VNU-K, E2E-VN at an equal training budget",
        description=(
            "Train the four model variants (vn, vnu, vnu-k: fixed ESPIRiT maps; e2e: learned maps) with one\n"
            "recipe (same data, steps, seed, optimiser), then score them on held-out test files with the seed's\n"
            "masks: equispaced 4x/30, 6x/22, 8x/16 ACS lines (counts at 368 columns, scaled to each file's\n"
            "width: max(4, round(l*W/368))) and random 4x/0.08, 6x/0.06, 8x/0.04; and SSIM against ACS lines.\n"
            "The YAML is a training config plus an 'ablation' section (test_dirs, variants, runs_dir, ...;\n"
            "see pipelines/train/ablation.yaml). A variant whose runs_dir/VARIANT/final.pt was written with the\n"
            "same config is not retrained; an unfinished run is resumed from its last.pt. ESPIRiT maps are\n"
            "cached in runs_dir/maps_cache (shared by the fixed-map variants).\n"
            "Writes OUT/ablation.md (Tables 1-2, parameters, s/slice), OUT/ablation.json, OUT/fig3_acs.png."),
        epilog=example_epilog(
            "varnet ablate --config pipelines/train/ablation.yaml --out results/ablation",
            "varnet ablate --config ablation --variants e2e,vnu-k --set optim.epochs=1 --out /tmp/abl"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="PRESET|YAML",
                   help="ablation YAML (a path, or a preset name in pipelines/train, e.g. ablation)")
    p.add_argument("--out", type=Path, default=Path("results/ablation"),
                   help="where the tables and the figure go (default results/ablation)")
    p.add_argument("--variants", metavar="LIST", help="comma-separated subset of vn,vnu,vnu-k,e2e "
                                                      "(default: the config's ablation.variants)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable): training sections as in `varnet train`, "
                        "or ablation.KEY (e.g. ablation.max_slices=1)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..evaluation.ablation import run_ablation
    from ..train.config import TrainConfigError, resolve_config_path
    from . import UserError

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    try:
        result = run_ablation(resolve_config_path(args.config), args.out, args.overrides, variants,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (TrainConfigError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print((args.out / "ablation.md").read_text())
    return 0 if result["results"] else 1
