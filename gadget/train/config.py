"""One typed configuration for ``varnet train``: dataclass sections, YAML files and dotted overrides.

Defaults live here only (they are the seed's recipe: SSIM loss, Adam lr 3e-4, 12 cascades, random
masks with centre fractions [0.08, 0.04] and accelerations [4, 8], step decay ×0.1 after 40 of
50 epochs — fastMRI's ``train_varnet_demo.py``). A YAML file is a mapping of sections::

    model: {num_cascades: 12, ...}       # VarNetConfig fields
    data:  {train_dirs: [...], ...}      # DataConfig
    optim: {lr: 3.0e-4, ...}             # OptimConfig
    loss:  {kind: ssim}                  # LossConfig
    run:   {out_dir: runs/varnet, ...}   # RunConfig
    ablation: {...}                      # read by `varnet ablate` only; ignored here (FOREIGN_SECTIONS)

``model.variant`` picks the architecture (``e2e``, ``vnu-k``, ``vnu``, ``vn``; the seed's §4
ablation): the fixed-map variants get ESPIRiT maps of each sample's ACS lines from the data
pipeline, cached per (file, slice, ACS count) in ``data.maps_cache`` (default
``<run.out_dir>/maps_cache``; see :class:`gadget.train.data.FixedMapsCache`).

Overrides are ``section.key=value`` strings whose value is parsed as YAML (``[4, 8]``, ``1e-3``,
``true``, ``null``); a list field also accepts a bare or comma-separated value
(``data.train_dirs=a,b``). Unknown sections or keys are rejected with the list of known ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..data.typed_config import (check_choice, choice, choices_of, convert_field, joined_by, load_yaml_mapping,
                                 presets_folder, yaml_stems)
from ..model.varnet import VarNetConfig

MASK_KINDS = ("random", "equispaced", "equispaced-fraction")
LOSS_KINDS = ("ssim", "l1")
AMP_MODES = ("off", "bf16", "fp16")
TARGET_AUTO = "auto"  # target_noise_free when the file has it, else reconstruction_rss


class TrainConfigError(ValueError):
    """A training setting is unknown or invalid; the message names it."""


@dataclass(frozen=True)
class DataConfig:
    """Where the fastMRI-layout files are and how they are undersampled."""

    train_dirs: list[str] = field(default_factory=list)   # directories of *.h5 (fastMRI or `varnet synth`)
    val_dirs: list[str] = field(default_factory=list)     # train/val layout, or test layout with `mask`
    # random | equispaced | equispaced-fraction, or several joined by commas (one drawn per mask)
    mask: str = choice("random", MASK_KINDS, joined=",")
    center_fractions: list[float] = field(default_factory=lambda: [0.08, 0.04])
    accelerations: list[float] = field(default_factory=lambda: [4.0, 8.0])
    target: str = TARGET_AUTO                             # dataset name, or auto
    batch_size: int = 1                                   # > 1 only for slices of one shape
    num_workers: int = 2                                  # DataLoader worker processes (0: main process)
    maps_cache: Optional[str] = None                      # fixed-map variants: directory of cached ESPIRiT
                                                          # maps (null: <run.out_dir>/maps_cache)
    maps_cache_mb: int = 256                              # and an in-memory LRU of this size per process


@dataclass(frozen=True)
class OptimConfig:
    """Adam with a step learning-rate schedule (stepped once per epoch)."""

    lr: float = 3e-4
    epochs: int = 50
    lr_step_size: int = 40
    lr_gamma: float = 0.1
    weight_decay: float = 0.0


@dataclass(frozen=True)
class LossConfig:
    """``ssim``: 1 − SSIM (fastMRI SSIMLoss: 7×7 uniform window, k1 0.01, k2 0.03, data range = the
    volume maximum of the target); ``l1``: mean |output − target| / volume maximum."""

    kind: str = choice("ssim", LOSS_KINDS)


@dataclass(frozen=True)
class RunConfig:
    """Where results go and how the loop runs."""

    out_dir: str = "runs/varnet"
    seed: int = 42
    device: str = "auto"                      # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    amp: str = choice("off", AMP_MODES)       # off | bf16 | fp16 — the U-Nets' arithmetic (FFTs stay fp32)
    activation_checkpointing: bool = False    # recompute each cascade in backward (less memory)
    resume: Optional[str] = None              # a last.pt written by an earlier run
    init_from: Optional[str] = None           # start from these weights (any checkpoint; fresh optimizer)
    val_every: int = 1                        # validate every N epochs (and after the last one)
    max_steps_per_epoch: Optional[int] = None  # cap on optimizer steps per epoch (quick runs)
    log_every: int = 50                       # steps between CSV/TensorBoard loss lines
    save_every: int = 0                       # also write last.pt every N steps (0: at epoch ends only)
    tensorboard: bool = True                  # write TensorBoard events (needs the `train` extra)


@dataclass(frozen=True)
class TrainConfig:
    model: VarNetConfig = field(default_factory=VarNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def mask_kinds(mask: str) -> list[str]:
    """``"random,equispaced-fraction"`` → ``["random", "equispaced-fraction"]``."""
    return [kind.strip() for kind in str(mask).split(",")]


SECTIONS = {f.name: f.default_factory for f in fields(TrainConfig)}  # name -> section class
FOREIGN_SECTIONS = ("ablation",)  # sections of a shared YAML that other commands read (varnet ablate)


# ----------------------------------------------------------------------------- building


def build_config(values: Optional[Mapping[str, Any]] = None, overrides: Sequence[str] = (),
                 source: str = "config") -> TrainConfig:
    """Defaults ← ``values`` (nested sections, e.g. a parsed YAML file) ← ``overrides``
    (``section.key=value`` strings); validated."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, entries in (values or {}).items():
        if section in FOREIGN_SECTIONS:
            continue
        _check_section(section, source)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise TrainConfigError(f"{source}: section '{section}' must be a mapping, got {type(entries).__name__}")
        for key, value in entries.items():
            merged[section][str(key)] = value
    for item in overrides:
        section, key, value = parse_override(item)
        known = [f.name for f in fields(SECTIONS[section])]
        if key.replace("-", "_") not in known:
            raise TrainConfigError(f"--set {item}: unknown setting '{section}.{key}' "
                                   f"(known in '{section}': {', '.join(known)})")
        merged[section][key] = value
    sections = {name: _build_section(name, merged[name], source) for name in SECTIONS}
    config = TrainConfig(**sections)
    validate(config, source)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML file (see the module docstring) and apply ``overrides``."""
    path = Path(path)
    data = load_yaml_mapping(path, str(path), error=TrainConfigError, what="sections")
    return build_config(data, overrides, source=str(path))


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"optim.lr=1e-3"`` → ``("optim", "lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in item:
        raise TrainConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise TrainConfigError(f"override {item!r}: key must be section.key "
                               f"(sections: {', '.join(SECTIONS)})")
    _check_section(parts[0], "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts[0], parts[1], value


def _check_section(section: str, source: str) -> None:
    if section not in SECTIONS:
        raise TrainConfigError(f"{source}: unknown section '{section}' (known: {', '.join(SECTIONS)})")


def _build_section(name: str, values: Mapping[str, Any], source: str):
    cls = SECTIONS[name]
    known = {f.name: f for f in fields(cls)}
    converted = {}
    for key, value in values.items():
        attr = key.replace("-", "_")
        if attr not in known:
            raise TrainConfigError(f"{source}: unknown setting '{name}.{key}' "
                                   f"(known in '{name}': {', '.join(known)})")
        converted[attr] = convert_field(cls, attr, value, source=source, error=TrainConfigError,
                                        name=f"{name}.{attr}")
    try:
        return cls(**converted)
    except ValueError as exc:  # a section's own check (e.g. model.output)
        raise TrainConfigError(f"{source}: section '{name}': {exc}") from None


# ----------------------------------------------------------------------------- validation


def validate(config: TrainConfig, source: str = "config") -> None:
    """Range and choice checks that types alone cannot express (data directories are checked
    when the datasets are built)."""
    def fail(message: str) -> None:
        raise TrainConfigError(f"{source}: {message}")

    m, d, o, r = config.model, config.data, config.optim, config.run
    for key in ("num_cascades", "chans", "pools", "sens_chans", "sens_pools"):
        if getattr(m, key) < 1:
            fail(f"model.{key} must be >= 1, got {getattr(m, key)}")
    for section in fields(config):  # the choices declared beside the fields (typed_config.choice)
        values = getattr(config, section.name)
        for key, allowed in choices_of(values).items():
            check_choice(getattr(values, key), allowed, name=f"{section.name}.{key}", source=source,
                         error=TrainConfigError, joined=joined_by(values, key))
    if len(d.center_fractions) != len(d.accelerations):
        fail(f"data.center_fractions ({len(d.center_fractions)} values) and data.accelerations "
             f"({len(d.accelerations)} values) must pair up one to one")
    if not d.accelerations:
        fail("data.accelerations must not be empty")
    if any(not 0 < c < 1 for c in d.center_fractions):
        fail(f"data.center_fractions must lie in (0, 1), got {d.center_fractions}")
    if any(a < 1 for a in d.accelerations):
        fail(f"data.accelerations must be >= 1, got {d.accelerations}")
    if m.variant != "e2e" and r.activation_checkpointing:
        fail(f"run.activation_checkpointing supports model.variant=e2e only, not {m.variant!r}")
    if d.maps_cache_mb < 0:
        fail(f"data.maps_cache_mb must be >= 0, got {d.maps_cache_mb}")
    if d.batch_size < 1 or d.num_workers < 0:
        fail(f"data.batch_size must be >= 1 and data.num_workers >= 0 (got {d.batch_size}, {d.num_workers})")
    if not d.target:
        fail("data.target must name a dataset (or be 'auto')")
    if not o.lr > 0 or o.epochs < 1 or o.lr_step_size < 1 or not o.lr_gamma > 0 or o.weight_decay < 0:
        fail(f"optim needs lr > 0, epochs >= 1, lr_step_size >= 1, lr_gamma > 0, weight_decay >= 0; got {o}")
    if r.device != "auto" and r.device != "cpu" and not r.device.startswith("cuda"):
        fail(f"run.device = {r.device!r} must be auto, cpu, cuda or cuda:N")
    if r.val_every < 1 or r.log_every < 1 or r.save_every < 0:
        fail("run.val_every and run.log_every must be >= 1, run.save_every >= 0")
    if r.max_steps_per_epoch is not None and r.max_steps_per_epoch < 1:
        fail(f"run.max_steps_per_epoch must be >= 1 or null, got {r.max_steps_per_epoch}")
    if not r.out_dir:
        fail("run.out_dir must not be empty")


# ----------------------------------------------------------------------------- presets


def presets_dir() -> Path:
    """The folder of the training recipes (``gadget.pipelines`` ``train/``, ``pipelines/train/*.yaml``)."""
    return presets_folder("train")


def preset_names() -> list[str]:
    """The names of the training recipes, sorted."""
    return yaml_stems(presets_dir())


def resolve_config_path(spec: str) -> Path:
    """``spec`` is a YAML path, or the name of a preset in ``pipelines/train`` (``default``,
    ``cpu-small``)."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise TrainConfigError(f"config file not found: {path}")
        return path
    if spec in preset_names():
        return presets_dir() / f"{spec}.yaml"
    raise TrainConfigError(f"config {spec!r} is neither a file nor a preset "
                           f"(presets: {', '.join(preset_names()) or 'none'})")


__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "LossConfig", "RunConfig", "VarNetConfig",
           "TrainConfigError", "build_config", "load_config", "parse_override", "resolve_config_path",
           "preset_names", "mask_kinds", "MASK_KINDS", "FOREIGN_SECTIONS", "LOSS_KINDS", "AMP_MODES"]
