"""``varnet demo``: simulate an undersampled scan and reconstruct it end to end."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser("demo", help="simulate an undersampled scan and reconstruct it (built-in data)",
                       description="Simulates a 4x undersampled raw ISMRMRD whole-head scan and streams it through "
                                   "the gadget pipeline with the shipped weights (and zero-filled for comparison); "
                                   "writes images (HDF5), a PNG comparison and prints metrics.",
                       epilog=example_epilog("varnet demo --out demo_out"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model checkpoint (default: the weights shipped with the package)")
    p.add_argument("--source", choices=("mni", "colin", "inia"), default="mni",
                   help="anatomy of the simulated head (colin and inia need Debian mricron-data)")
    p.add_argument("--acceleration", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(out_dir=args.out, checkpoint=args.checkpoint, source=args.source,
                            acceleration=args.acceleration, seed=args.seed)
    results = run_demo(settings)
    print("\n| method | SSIM | PSNR dB | NMSE |\n|---|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['ssim']:.4f} | {m['psnr']:.2f} | {m['nmse']:.4f} |")
    print(f"\nwrote {args.out}/images.h5 (/demo/image_1: E2E-VarNet, /demo/image_2: zero-filled), "
          f"{args.out}/comparison.png, {args.out}/scan_raw_ismrmrd.h5")
    return 0
