"""Checkpoint I/O for E2E-VarNet.

Three on-disk formats are read, always with ``torch.load(weights_only=True)``:

* a plain fastMRI state dict (``knee_leaderboard_state_dict.pt`` …): ``{param_name: tensor}``;
* a PyTorch Lightning ``.ckpt`` from fastMRI's ``VarNetModule``: ``{"state_dict": {"varnet.<name>": …},
  "hyper_parameters": {...}, ...}``;
* our own format (written by :func:`save_checkpoint`): ``{"format": "varnet-gadget", "format_version": 1,
  "config": VarNetConfig fields, "description": {...}, "state_dict": {...}}``.

The refine a checkpoint is run with when none is given (``refine: auto``, the default; :func:`default_refine`)
comes from the file: our format records it in its description (``"refine"``, written by
``experiments/shipping/scripts/ship_weights.py``: the refine its evaluation was run with; files shipped
before that field are listed by sha256 in :data:`RECORDED_REFINE`); everything else (fastMRI and bare state
dicts, Lightning ``.ckpt``, our checkpoints that record none) gets ``none``, the network's image as the
weights were trained to give it.

Hyperparameters missing from a file are inferred from the state dict's shapes, and the model
variant (``VarNetConfig.variant``, the seed paper's ablation) from its parameter names: no
``sens_net.*`` → a fixed-map variant; ``cascades.N.step_size`` → an image-space one (``vnu``, or ``vn``
with ``cascades.N.model.filters``); else ``e2e`` / ``vnu-k``. Our format records the variant in its
config; a variant this code does not know is a :class:`CheckpointError` naming the known ones.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .varnet import VARIANTS, VarNet, VarNetConfig

log = logging.getLogger(__name__)

FORMAT_NAME = "varnet-gadget"
FORMAT_VERSION = 1
_LIGHTNING_PREFIX = "varnet."


#: The refine of checkpoints shipped before our format had a ``"refine"`` field, by the file's sha256 (a
#: shipped file is not rewritten: its hash is what ``varnet`` reports and tests pin). ``varnet_head_v3.pt``:
#: ``pi``, the refinement was measured and made the default with these weights
#: (``experiments/generalisation/configs/generalisation_matrix.v3-refine.yaml``, docs/results/refinement.md).
#: A file that records ``"refine"`` in its description is read from there instead.
RECORDED_REFINE = {"669d36e6c6591b85af0eb0653db366fac4dc75ff8432e84338dcc840f241b36b": "pi"}
_KIND_NAMES = {"fastmri-state-dict": "fastMRI state dict", "lightning": "Lightning checkpoint"}


class CheckpointError(Exception):
    """A checkpoint could not be found, read or matched to the model; the message is one line."""


@dataclass
class LoadedCheckpoint:
    model: VarNet
    config: VarNetConfig
    kind: str  # "fastmri-state-dict" | "lightning" | "varnet-gadget"
    path: str
    sha256: str
    description: dict = field(default_factory=dict)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The model variant a state dict was made by, from its parameter names (module docstring)."""
    learned_maps = any(k.startswith("sens_net.") for k in state_dict)
    image_space = "cascades.0.step_size" in state_dict
    shallow = "cascades.0.model.filters" in state_dict
    if learned_maps and (image_space or shallow):
        raise CheckpointError("cannot infer the model variant: a sensitivity network (sens_net.*) with image-space "
                              "cascades (cascades.0.step_size / model.filters) matches none of "
                              f"{', '.join(VARIANTS)}")
    if shallow:
        return "vn"
    if image_space:
        return "vnu"
    return "e2e" if learned_maps else "vnu-k"


def infer_config(state_dict: Mapping[str, torch.Tensor], mask_center: bool = True) -> VarNetConfig:
    """Recover VarNet hyperparameters (and the variant, :func:`infer_variant`) from parameter names
    and shapes; fields a variant does not use keep their defaults."""
    def unet_shape(prefix: str) -> tuple[int, int]:
        first = state_dict.get(f"{prefix}.down_sample_layers.0.layers.0.weight")
        if first is None:
            raise CheckpointError(f"cannot infer hyperparameters: no '{prefix}.down_sample_layers.0.layers.0.weight'")
        levels = {int(m.group(1)) for k in state_dict
                  if (m := re.match(re.escape(prefix) + r"\.down_sample_layers\.(\d+)\.", k))}
        return int(first.shape[0]), len(levels)

    cascades = {int(m.group(1)) for k in state_dict if (m := re.match(r"cascades\.(\d+)\.", k))}
    if not cascades:
        raise CheckpointError("cannot infer hyperparameters: no 'cascades.N.*' parameters")
    variant = infer_variant(state_dict)
    defaults = VarNetConfig()
    chans, pools = (defaults.chans, defaults.pools) if variant == "vn" else unet_shape("cascades.0.model.unet")
    sens_chans, sens_pools = (unet_shape("sens_net.norm_unet.unet") if variant == "e2e"
                              else (defaults.sens_chans, defaults.sens_pools))
    return VarNetConfig(num_cascades=len(cascades), chans=chans, pools=pools,
                        sens_chans=sens_chans, sens_pools=sens_pools, mask_center=mask_center, variant=variant)


def _config_from_mapping(values: Mapping[str, Any], fallback: VarNetConfig, path: str = "<memory>") -> VarNetConfig:
    variant = values.get("variant", fallback.variant)
    if variant not in VARIANTS:
        raise CheckpointError(f"{path}: model variant {variant!r} is not known to this version "
                              f"(known: {', '.join(VARIANTS)})")
    if variant != fallback.variant:
        raise CheckpointError(f"{path}: the checkpoint's config says variant {variant!r}, but its parameter names "
                              f"are those of {fallback.variant!r}")
    known = {f.name for f in fields(VarNetConfig)}
    picked = {k: type(getattr(fallback, k))(v) for k, v in values.items() if k in known}
    try:
        return VarNetConfig(**{**fallback.to_dict(), **picked})
    except ValueError as exc:
        raise CheckpointError(f"checkpoint hyperparameters: {exc}") from None


def _read(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint is not a file: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for non-checkpoints
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint (weights_only=True): {reason}") from None


def split_checkpoint(obj: Any, path: str = "<memory>") -> tuple[str, dict, Optional[dict], dict]:
    """Return ``(kind, state_dict, hyperparameters or None, description)`` of a loaded object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT_NAME:
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        return FORMAT_NAME, dict(obj["state_dict"]), dict(obj.get("config", {})), dict(obj.get("description", {}))
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = {k[len(_LIGHTNING_PREFIX):]: v for k, v in obj["state_dict"].items()
                 if k.startswith(_LIGHTNING_PREFIX)}
        if not state:
            raise CheckpointError(f"{path}: Lightning checkpoint without 'varnet.*' weights")
        hparams = obj.get("hyper_parameters")
        return "lightning", state, dict(hparams) if isinstance(hparams, Mapping) else None, {}
    if all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        return "fastmri-state-dict", dict(obj), None, {}
    raise CheckpointError(f"{path}: not a VarNet checkpoint (keys: {sorted(obj)[:5]}...)")


def build_model(state_dict: Mapping[str, torch.Tensor], config: VarNetConfig, path: str = "<memory>") -> VarNet:
    """A :class:`VarNet` of ``config`` holding ``state_dict`` (every key, every shape; :class:`CheckpointError`
    otherwise), floating-point tensors in the model's dtypes. The model is built on the meta device and takes
    the given tensors as its own (the state dict is not to be reused), so the random initialisation they
    would overwrite is never drawn; a variant with buffers no state dict holds (non-persistent) is built
    and filled the usual way."""
    with torch.device("meta"):
        model = VarNet.from_config(config)
    template = model.state_dict()
    expected, given = set(template), set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not match VarNet{config.to_dict()}: "
                              f"missing keys {_short(missing)}; unexpected keys {_short(unexpected)}")
    state = {k: v.to(template[k].dtype) if v.is_floating_point() and template[k].is_floating_point() else v
             for k, v in state_dict.items()}
    assign = not any(m._non_persistent_buffers_set for m in model.modules())
    if not assign:
        model = VarNet.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        shape_lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise CheckpointError(f"{path}: {'; '.join(shape_lines) or exc}") from None
    return model


def _short(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(path: str | os.PathLike, config: Optional[VarNetConfig] = None) -> LoadedCheckpoint:
    """Load any supported checkpoint into a :class:`VarNet` in eval mode on the CPU.

    ``config`` overrides hyperparameters stored in (or inferred from) the file.
    """
    obj = _read(path)
    kind, state, hparams, description = split_checkpoint(obj, str(path))
    inferred = infer_config(state)
    resolved = config or (_config_from_mapping(hparams, inferred, str(path)) if hparams else inferred)
    model = build_model(state, resolved, str(path)).eval()
    return LoadedCheckpoint(model=model, config=resolved, kind=kind, path=str(path),
                            sha256=file_sha256(path), description=description)


def save_checkpoint(path: str | os.PathLike, model: VarNet, description: Optional[dict] = None) -> None:
    """Write our format (weights + hyperparameters + description), atomically."""
    from .. import __version__

    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "config": model.config.to_dict(),
        "description": dict(description or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)


#: The refine modes a checkpoint (or a config) may name; the refine stage itself lives in
#: :mod:`gadget.recon.refine`, which imports this (the model layer never imports the recon layer).
REFINE_MODES = ("pi", "none")


def default_refine(loaded: LoadedCheckpoint) -> tuple[str, str]:
    """The refine ``loaded`` is run with when none is given: ``(mode, reason)``, the reason worded for the
    log (module docstring). A recorded value that is not a refine mode is a :class:`CheckpointError`."""
    if loaded.kind != FORMAT_NAME:
        return "none", _KIND_NAMES.get(loaded.kind, loaded.kind)
    recorded = loaded.description.get("refine")
    if recorded is not None:
        if recorded not in REFINE_MODES:
            raise CheckpointError(f"{loaded.path}: its description records refine {recorded!r}, "
                                  f"not one of {', '.join(REFINE_MODES)}")
        return recorded, "from the checkpoint's recipe"
    if loaded.sha256 in RECORDED_REFINE:
        return RECORDED_REFINE[loaded.sha256], ("from the checkpoint's recipe, recorded for its sha256 in "
                                                "gadget.model.checkpoint")
    return "none", "the checkpoint records no refine"


def resolve_refine(setting: str, loaded: LoadedCheckpoint) -> tuple[str, str]:
    """``setting`` (``auto`` | ``pi`` | ``none``) for ``loaded``: ``auto`` → :func:`default_refine`; a mode
    given explicitly always wins. Returns ``(mode, reason)`` and logs ``refine MODE (REASON)``."""
    mode, reason = default_refine(loaded) if setting == "auto" else (setting, "given")
    log.info("refine %s (%s)", mode, reason)
    return mode, reason
