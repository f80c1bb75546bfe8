"""``varnet infer``: fastMRI challenge-style inference on test-format files."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    from . import (add_adapt_arguments, add_precision_argument, add_refine_argument, add_workers_argument,
                   example_epilog)

    p = sub.add_parser(
        "infer", help="reconstruct fastMRI test-format files with a checkpoint",
        description="Reconstruct undersampled fastMRI multicoil files (kspace + mask + ismrmrd_header). "
                    "Writes one file of the same name per input with 'reconstruction' (slice, H, W) float32.",
        epilog=example_epilog("varnet infer --checkpoint knee_leaderboard_state_dict.pt "
                              "--input multicoil_test/ --output recons/"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="fastMRI state dict, Lightning .ckpt, or our checkpoint (default: the shipped weights)")
    p.add_argument("--input", required=True, type=Path, help="one .h5 file or a directory of them")
    p.add_argument("--output", required=True, type=Path, help="output directory")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    add_precision_argument(p, default="fp32")
    add_refine_argument(p)
    add_adapt_arguments(p, default="none")
    p.add_argument("--batch-size", type=int, default=1, help="slices per forward pass")
    add_workers_argument(p)
    p.add_argument("--acs", choices=("auto", "attrs", "mask"), default="auto",
                   help="ACS line count: file attribute num_low_frequency (attrs), fastMRI's detection from "
                        "the mask (mask; what the reference does), or the attribute when present, else the run "
                        "of sampled columns around the centre column (auto)")
    p.set_defaults(run=run)


def input_files(path: Path) -> list[Path]:
    from . import UserError

    if path.is_dir():
        files = sorted(path.glob("*.h5"))
        if not files:
            raise UserError(f"no .h5 files in {path}")
        return files
    if not path.exists():
        raise UserError(f"input not found: {path}")
    return [path]


def run(args) -> int:
    from ..data.fastmri_file import open_volume, write_reconstruction
    from ..model.checkpoint import load_checkpoint
    from ..recon.engine import Reconstructor
    from ..recon.fastmri_infer import reconstruct_volume
    from ..recon.refine_stage import RefinedEngine, Refiner
    from . import UserError, device_option, refine_config, slice_workers

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    files = input_files(args.input)
    device = device_option(args.device)
    workers = slice_workers(args.workers, device)
    from ..model.shipped import resolve_checkpoint

    loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
    refine = refine_config(args, loaded)  # auto: the checkpoint's own; logged
    try:
        network = Reconstructor(loaded.model, device, args.precision, forwards=workers)
    except (RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    engine = RefinedEngine(network, Refiner(refine, network.device))  # the network, then the refine stage
    log.info("checkpoint %s (%s, sha256 %s), device %s, U-Nets in %s, refine %s, %d worker(s)", loaded.path,
             loaded.kind, loaded.sha256[:12], engine.device, args.precision, refine.mode, workers)
    adapt = adapt_settings(args)
    args.output.mkdir(parents=True, exist_ok=True)
    for path in files:
        scan_engine = engine if adapt is None else adapted_to_file(engine, path, adapt)
        with open_volume(path) as volume, tqdm(total=volume.num_slices, desc=path.name, unit="slice",
                                               leave=False, disable=None) as bar:
            recon = reconstruct_volume(scan_engine, volume, args.batch_size, args.acs, on_batch=bar.update,
                                       workers=workers)
        write_reconstruction(args.output / path.name, recon)
        print(f"{path.name}: {recon.shape[0]} slices -> {args.output / path.name}")
    return 0


def adapt_settings(args):
    """The per-scan adaptation's settings from ``--adapt*`` and ``--refine`` as a
    :class:`gadget.recon.config.ReconConfig` (None: ``--adapt none``), checked as the config checks them."""
    if args.adapt == "none":
        return None
    from ..recon.config import ConfigError, ReconConfig
    from . import UserError, operator_overrides

    try:
        config = ReconConfig().merged({k: v for k, v in operator_overrides(args).items()
                                       if k.startswith("adapt") or k == "refine"}, "command line")
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if config.adapt == "solve" and not config.calibrates_solve:
        raise UserError(f"--adapt solve chooses the cs refine's weights on each scan: it needs --refine auto, "
                        f"not {config.refine}")
    return config


def adapted_to_file(engine, path: Path, config):
    """``engine`` (a :class:`RefinedEngine`) adapted to the file's own undersampled slices (``--adapt solve``:
    the cs refine's weights; ``scan``: those and the network's)."""
    from ..recon.refine_stage import RefinedEngine
    from ..train.adapt import AdaptError
    from ..train.adapt_inputs import fastmri_slices
    from ..train.adapt_run import adapt_for_config
    from . import UserError

    try:
        result = adapt_for_config(engine.engine, fastmri_slices(path), config, path.name)
    except AdaptError as exc:
        raise UserError(f"{path.name}: --adapt {config.adapt}: {exc}") from None
    print(f"{path.name}: adapted on its own lines: {result.summary()}", flush=True)
    return RefinedEngine(result.network, result.refiner or engine.refiner)
