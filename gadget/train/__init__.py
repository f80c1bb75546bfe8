"""Training E2E-VarNet on fastMRI-layout multicoil files (``varnet train``).

Layers: imports ``mri``, ``model``, ``data`` and ``recon`` (device/crop helpers); imported only by
the CLI. Public API::

    from gadget.train import load_config, build_config, Trainer, train
    cfg = load_config("pipelines/train/cpu-small.yaml", ["data.train_dirs=[data/synth]"])
    summary = train(cfg)          # or Trainer(cfg).fit()
"""
from .config import (DataConfig, LossConfig, OptimConfig, RunConfig, TrainConfig, TrainConfigError,
                     build_config, load_config, parse_override, preset_names, resolve_config_path)
from .data import EpochSampler, SliceDataset, TrainSample, collate
from .losses import TrainingLoss, l1_loss, ssim_loss
from .trainer import Trainer, TrainingVarNet, train

__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "LossConfig", "RunConfig", "TrainConfigError",
           "build_config", "load_config", "parse_override", "preset_names", "resolve_config_path",
           "SliceDataset", "TrainSample", "EpochSampler", "collate",
           "TrainingLoss", "ssim_loss", "l1_loss", "Trainer", "TrainingVarNet", "train"]
