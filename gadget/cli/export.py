"""``varnet export``: E2E-VarNet as TorchScript or ONNX for one k-space shape and ACS width."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser("export", help="export the model as TorchScript or ONNX (static shape and ACS width)",
                       description="Writes E2E-VarNet for a fixed k-space shape (coils, readout, phase) and ACS "
                                   "width as TorchScript or ONNX (opset 18; DFT operators on power-of-two "
                                   "lengths, odd factors as matrix products). Inputs: kspace "
                                   "(1, coils, readout, phase, 2) float32 (re, im), mask (phase,) float32; "
                                   "output: image (1, readout, phase). The file is then run on a simulated "
                                   "scan of that shape and compared with the eager model.",
                       epilog=example_epilog("varnet export --format onnx --coils 16 --readout 640 --phase 368 "
                                             "--acs 30 --out varnet.onnx"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the shipped weights)")
    p.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    p.add_argument("--coils", type=int, required=True)
    p.add_argument("--readout", type=int, required=True, help="k-space readout samples (with oversampling)")
    p.add_argument("--phase", type=int, required=True, help="phase-encoding lines (k-space width)")
    p.add_argument("--acs", type=int, required=True, help="ACS (centre) lines the sensitivity network uses")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from ..bench.model_bench import BenchCase, make_input
    from ..model.checkpoint import load_checkpoint
    from ..model.export import MAX_REL_DIFF, export_model, verify_export
    from ..model.shipped import resolve_checkpoint
    from . import UserError

    if min(args.coils, args.readout, args.phase) < 1 or not 0 < args.acs <= args.phase:
        raise UserError(f"need positive --coils/--readout/--phase and 1 <= --acs <= --phase "
                        f"(got {args.coils}, {args.readout}, {args.phase}, acs {args.acs})")
    model = load_checkpoint(resolve_checkpoint(args.checkpoint)).model
    case = BenchCase(coils=args.coils, readout=args.readout, phase=args.phase, acs=args.acs)
    kspace, mask = make_input(case)
    maps = None
    if model.needs_maps:  # a fixed-map variant: the exported graph takes ESPIRiT maps as its third input
        from ..baselines.espirit import fixed_maps

        maps = torch.from_numpy(fixed_maps(kspace * mask, mask, args.acs))
    try:
        path = export_model(model, args.out, args.format, args.coils, args.readout, args.phase, args.acs)
        error = verify_export(path, args.format, model, torch.from_numpy(kspace), torch.from_numpy(mask), args.acs,
                              sens_maps=maps)
    except RuntimeError as exc:  # a missing optional package (the `export` extra)
        raise UserError(str(exc)) from None
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB); max relative difference to the eager model "
          f"on a simulated {args.coils}x{args.readout}x{args.phase} scan: {error:.2e}")
    if error > MAX_REL_DIFF:
        raise UserError(f"exported model differs from the eager one by {error:.2e} (> {MAX_REL_DIFF:g}); "
                        f"the file is kept at {path}")
    return 0
