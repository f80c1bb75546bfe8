"""``varnet train``: train E2E-VarNet on directories of fastMRI-layout multicoil files."""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser(
        "train", help="train E2E-VarNet on fastMRI-layout files (real fastMRI or `varnet synth` output)",
        description=(
            "Train E2E-VarNet (SSIM loss, Adam, random undersampling masks drawn on the fly) on directories of\n"
            "fastMRI multicoil .h5 files: fully sampled train/val files (kspace + reconstruction_rss, plus\n"
            "target_noise_free in `varnet synth` files, used when present) or test-layout files with a mask.\n"
            "Settings come from one YAML file (a preset name from pipelines/train, or a path) with sections\n"
            "model, data, optim, loss, run; --set overrides single keys. Writes to run.out_dir: config.yaml,\n"
            "train_log.csv, val_metrics.csv, tensorboard/, best.pt (best val SSIM), final.pt, last.pt (resume).\n"
            "Several processes: torchrun --nproc_per_node N -m gadget.cli train ... (gloo on CPU, NCCL on GPUs)."),
        epilog=example_epilog(
            "varnet synth data/synth/train --volumes 8 --slices 8 --matrix 128 --coils 12",
            "varnet synth data/synth/val --volumes 2 --slices 8 --matrix 128 --coils 12 --seed 1",
            "varnet train --config cpu-small --set data.train_dirs=[data/synth/train] "
            "--set data.val_dirs=[data/synth/val] --set run.out_dir=runs/small",
            "varnet train --config default --set data.train_dirs=[multicoil_train] "
            "--set data.val_dirs=[multicoil_val] --set run.activation_checkpointing=true --set run.amp=bf16",
            "varnet train --config runs/small/config.yaml --set run.resume=runs/small/last.pt"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", metavar="PRESET|YAML",
                   help="a preset in pipelines/train (default, cpu-small) or a YAML file (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, value in YAML syntax (repeatable), e.g. --set optim.lr=1e-3 "
                        "--set data.accelerations=[4,8]")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(run=run)


def resolve(args):
    """The :class:`~gadget.train.config.TrainConfig` for parsed arguments (``UserError`` if invalid)."""
    from ..train.config import TrainConfigError, load_config, resolve_config_path
    from . import UserError

    try:
        return load_config(resolve_config_path(args.config), args.overrides)
    except TrainConfigError as exc:
        raise UserError(str(exc)) from None


def run(args) -> int:
    from ..train.config import TrainConfigError
    from ..train.trainer import Trainer
    from . import UserError

    config = resolve(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    try:
        summary = Trainer(config).fit()
    except TrainConfigError as exc:
        raise UserError(str(exc)) from None
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    best = summary["best_metrics"]
    line = f"trained {summary['epochs']} epochs, {summary['steps']} steps in {summary['seconds']:.1f} s"
    if best:
        line += (f"; best val SSIM {best['ssim']:.4f} (PSNR {best['psnr']:.2f} dB, NMSE {best['nmse']:.4g}) "
                 f"at epoch {best['epoch']} -> {summary['best_path']}")
    print(line)
    print(f"final model: {summary['final_path']}; resume state: {summary['last_path']}")
    return 0
