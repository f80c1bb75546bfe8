"""``varnet adapt``: self-supervised adaptation of the weights to a site's own undersampled scans."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_NOT_BETTER = 3


def add_parser(sub) -> None:
    from ..train.splits import SELECTIONS
    from . import add_workers_argument, example_epilog

    p = sub.add_parser(
        "adapt", help="adapt the weights to a site's undersampled scans (no fully sampled data needed)",
        description="Self-supervised adaptation (SSDU with zero-shot stopping): each slice's acquired lines are "
                    "split at random into the network's input and the lines it is scored on, fresh at every "
                    "step; a few acquired lines per slice are held back and never trained on, and their loss "
                    "decides which weights are kept. Writes a checkpoint every door reads, with its provenance. "
                    f"Exits with status {EXIT_NOT_BETTER} and writes nothing when no weights beat the start on the "
                    "held-back lines.",
        epilog=example_epilog("varnet adapt site_scans/ --out site.pt --report adapt_report/",
                              "varnet replay scan.h5 images.h5 --checkpoint site.pt"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path,
                   help="ISMRMRD raw files, Siemens twix .dat files, fastMRI files as acquired (undersampled), or "
                        "folders of them (*.h5, *.dat)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    p.add_argument("--checkpoint", default=None, help="start weights (default: the shipped weights)")
    p.add_argument("--config", default="default",
                   help="pipeline preset or YAML for ISMRMRD inputs (prewhitening, ACS rule, coil compression)")
    p.add_argument("--group", default="dataset", help="ISMRMRD group in raw files")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=200, help="most optimiser steps")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds (0: none)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--splits", type=int, default=None, help="splits per slice and step")
    p.add_argument("--slices-per-step", type=int, default=None)
    p.add_argument("--rho", type=float, default=None, help="share of the lines scored (Λ) per split")
    p.add_argument("--holdout", type=float, default=None,
                   help="share of each slice's non-ACS lines held back (Γ)")
    p.add_argument("--selection", choices=SELECTIONS, default=None, help="how lines are drawn")
    p.add_argument("--eval-every", type=int, default=None, help="steps between Γ scores")
    p.add_argument("--patience", type=int, default=None, help="Γ scores without a gain before stopping")
    p.add_argument("--trainable", choices=("cascades", "all"), default=None)
    p.add_argument("--tie-weight", type=float, default=None, help="L2 pull towards the start weights")
    p.add_argument("--joint-data", nargs="+", default=None,
                   help="fully sampled fastMRI-layout folders for the supervised joint term")
    p.add_argument("--joint-weight", type=float, default=0.0, help="weight of the supervised joint term")
    p.add_argument("--seed", type=int, default=0)
    add_workers_argument(p, "splits trained side by side, each on its share of the CPU threads (auto: 2 on a CPU "
                            "with 2 or more threads, 1 on a GPU; a run repeats exactly for a given count)")
    p.add_argument("--report", type=Path, default=None, help="write the Γ curve and before/after PNGs here")
    p.set_defaults(run=run)


def settings_from_args(args):
    """:class:`AdaptConfig` from the options given (the rest: its defaults)."""
    import dataclasses

    from ..train.adapt import AdaptConfig, AdaptError
    from ..train.splits import SplitSettings
    from . import UserError

    names = {"lr": "lr", "splits": "splits_per_step", "slices_per_step": "slices_per_step",
             "eval_every": "eval_every", "patience": "patience", "trainable": "trainable",
             "tie_weight": "tie_weight"}
    given = {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}
    split = {k: getattr(args, k) for k in ("rho", "holdout", "selection") if getattr(args, k) is not None}
    try:
        base = AdaptConfig()
        return dataclasses.replace(base, steps=args.steps, time_limit=args.time_limit, seed=args.seed,
                                   joint_weight=args.joint_weight,
                                   split=dataclasses.replace(base.split, **split), **given)
    except (AdaptError, ValueError) as exc:
        raise UserError(str(exc)) from None


def expand(paths) -> list[Path]:
    from . import UserError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.h5"), *path.glob("*.dat")])
            if not found:
                raise UserError(f"no .h5 files in {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input not found: {path}")
    return files


def load_inputs(files, config, group: str):
    """``(slices, [(name, sha256)])`` of every input file."""
    from ..model.checkpoint import file_sha256
    from ..replay import file_lines, ismrmrd_source
    from ..train.adapt_inputs import file_kind, fastmri_slices, ismrmrd_slices

    slices, hashes = [], []
    for path in files:
        with ismrmrd_source(path, group) as (source, in_group):  # a twix file: a temporary ISMRMRD file
            kind = file_kind(source)
            found = (fastmri_slices(source) if kind == "fastmri"
                     else ismrmrd_slices(source, config, file_lines(source, in_group), in_group))
        log.info("%s (%s): %d undersampled slices", path.name, kind, len(found))
        slices += found
        hashes.append((path.name, file_sha256(path)))
    return slices, hashes


def run(args) -> int:
    import torch

    from ..model.checkpoint import load_checkpoint
    from ..model.shipped import resolve_checkpoint
    from ..recon.config import ConfigError, load_config
    from ..recon.engine import resolve_device
    from ..train.adapt import AdaptError, adapt, adapted_model
    from ..train.adapt_run import joint_term, provenance, save_adapted
    from . import UserError, slice_workers

    settings = settings_from_args(args)
    if settings.joint_weight > 0 and not args.joint_data:
        raise UserError("--joint-weight needs --joint-data (fully sampled fastMRI-layout folders)")
    try:
        config = load_config(args.config)
        device = resolve_device(args.device)
    except (ConfigError, RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    workers = slice_workers(args.workers, device)
    files = expand(args.inputs)
    base = load_checkpoint(resolve_checkpoint(args.checkpoint))
    from gadget.converters.twix import TwixError

    try:
        slices, hashes = load_inputs(files, config, args.group)
        if not slices:
            raise AdaptError("no undersampled slices in the inputs (fully sampled slices are not adapted on)")
        joint = joint_term(args.joint_data, args.seed) if args.joint_data else None
        print(f"adapting {base.path} (sha256 {base.sha256[:12]}) on {len(slices)} slices from {len(files)} files, "
              f"device {device}, {workers} worker(s)", flush=True)
        torch.manual_seed(args.seed)
        result = adapt(base.model, slices, settings, device=device, joint=joint, workers=workers,
                       on_score=lambda e: print(f"  step {e['step']:4d}  {e['seconds']:8.1f} s  Γ loss "
                                                f"{e['gamma']:.5g}", flush=True))
    except (AdaptError, TwixError) as exc:
        raise UserError(str(exc)) from None
    print(result.summary())
    if not result.improved:
        print(f"varnet adapt: no weights beat the start on the held-back lines; {args.out} not written",
              flush=True)
        return EXIT_NOT_BETTER
    model = adapted_model(base.model, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_adapted(args.out, base, model, provenance(base, hashes, settings, result))
    print(f"wrote {args.out}")
    if args.report:
        from ..train.adapt_report import write_report

        for path in write_report(args.report, result, base.model, model, slices):
            print(f"wrote {path}")
    return 0
