"""The ``varnet`` console script: one entry point, one module per subcommand."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .. import __version__
from . import ablate, adapt, bench, compare, convert, demo, evaluate, export, infer, openrecon, replay, serve, synth, train

SUBCOMMANDS = (infer, replay, serve, convert, synth, train, adapt, evaluate, compare, ablate, export, bench, demo, openrecon)


class UserError(Exception):
    """Raised by subcommands for bad input; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varnet", description="E2E-VarNet reconstruction for Gadgetron / ISMRMRD / fastMRI data.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..data.fastmri_file import FastMRIFileError
    from ..data.mrd_file import MrdFileError
    from ..data.mrd_header import HeaderError
    from ..model.checkpoint import CheckpointError
    from ..recon.config import ConfigError
    from ..recon.pipeline import ReconError
    from ..stream.assemble import AssemblyError
    from ..stream.noise import NoiseError
    from ..train.adapt import AdaptError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose + 1, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (UserError, CheckpointError, ConfigError, FastMRIFileError, MrdFileError, HeaderError, AssemblyError,
            NoiseError, ReconError, AdaptError, FileNotFoundError) as exc:
        print(f"varnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


def example_epilog(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def add_workers_argument(p: argparse.ArgumentParser, help: Optional[str] = None) -> None:
    p.add_argument("--workers", default="auto",
                   help=help or "batches reconstructed side by side, each on its share of the CPU threads (auto: 2 "
                                "on a CPU with 2 or more threads, 1 on a GPU; more hold more slices in memory at once)")


def device_option(name: str):
    """``--device`` as a ``torch.device`` (``auto`` → CUDA when present); a bad or absent device is a
    :class:`UserError` naming the option."""
    from ..recon.engine import resolve_device

    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device: {exc}") from None


def slice_workers(setting: str, device) -> int:
    """``--workers``: a count >= 1, or ``auto``: 2 on a CPU (``device``, a ``torch.device``) with at least 2
    intra-op threads (two slices on half the threads each beat one slice on all of them:
    docs/results/performance.md, "Slices side by side"), else 1 (a GPU runs one forward at a time)."""
    import torch

    if setting == "auto":
        return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1
    try:
        count = int(setting)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"--workers must be 'auto' or a whole number >= 1, got {setting!r}")
    return count


def add_precision_argument(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    from ..recon.config import CHOICES  # not gadget.model.varnet.PRECISIONS: keeps torch out of --help

    p.add_argument("--precision", choices=CHOICES["precision"], default=default,
                   help="arithmetic of the U-Nets (torch.autocast); FFTs and coil operators stay fp32. "
                        "bf16/fp16 pay on GPUs; on CPUs without bf16/fp16 units they are slower"
                        + ("" if default else " (default: the config's, fp32)"))


def add_refine_argument(p: argparse.ArgumentParser, default: Optional[str] = "auto") -> None:
    """``--refine``/``--refine-lambda``; ``default=None``: unset unless given (the config's then applies)."""
    from ..recon.config import CHOICES

    p.add_argument("--refine", choices=CHOICES["refine"], default=default,
                   help="pi: finish the network's image with a parallel-imaging solve that takes it as the prior "
                        "(ESPIRiT's maps where they cover the object, else the network's own; "
                        "gadget/recon/refine.py); none: the network's image as it is; auto: what the checkpoint "
                        "records (pi for the shipped weights), none where it records nothing (fastMRI and bare "
                        "state dicts, Lightning .ckpt)"
                        + (" (default: auto)" if default else " (default: the config's, auto)"))
    p.add_argument("--refine-lambda", type=float, default=0.0 if default else None,
                   help="weight of the network's image in that solve; 0: chosen from the noise level"
                        + (" (default)" if default else " (default: the config's, 0)"))


def refine_config(args, loaded):
    """``--refine``/``--refine-lambda`` for the checkpoint ``loaded`` → :class:`RefineConfig` (``auto``
    resolved and logged by :func:`gadget.model.checkpoint.resolve_refine`; a bad value is a :class:`UserError`)."""
    from ..model.checkpoint import resolve_refine
    from ..recon.refine import RefineConfig

    try:
        return RefineConfig(mode=resolve_refine(args.refine, loaded)[0], lam=args.refine_lambda)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def operator_overrides(args) -> dict:
    """``--checkpoint``, ``--device``, ``--precision``, ``--refine``, ``--refine-lambda``, ``--adapt``,
    ``--adapt-steps``, ``--adapt-time-limit`` given on the command line, as config settings."""
    return {k: v for k in ("checkpoint", "device", "precision", "refine", "refine_lambda", "adapt", "adapt_steps",
                           "adapt_time_limit")
            if (v := getattr(args, k, None)) is not None and v != ""}


def add_adapt_arguments(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """``--adapt``, ``--adapt-steps``, ``--adapt-time-limit`` (the config's ``adapt*`` settings)."""
    from ..recon.config import CHOICES, ReconConfig

    defaults = ReconConfig()
    p.add_argument("--adapt", choices=CHOICES["adapt"], default=default,
                   help="solve: choose the cs refine's weights on each scan's own held-back lines; scan: that, "
                        "and adapt the network's weights on them (self-supervised; gadget/train/adapt_run.py); "
                        "then reconstruct the scan" + (f" (default {default})" if default
                                                                          else " (default: the config's)"))
    p.add_argument("--adapt-steps", type=int, default=None,
                   help=f"most adaptation steps per scan (default {defaults.adapt_steps})")
    p.add_argument("--adapt-time-limit", type=float, default=None,
                   help=f"seconds of adaptation per scan, 0 = none (default {defaults.adapt_time_limit:g})")
