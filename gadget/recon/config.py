"""One typed configuration for the streaming pipeline, filled from YAML presets, Gadgetron
``<property name= value=/>`` elements or MRD JSON parameters. Defaults live here only;
unknown keys are rejected with the list of known ones; values given as strings (Gadgetron
properties) are converted to the field's type.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from ..data.typed_config import choice, choices_of, convert_field, load_yaml_mapping, presets_folder, yaml_stems

log = logging.getLogger(__name__)

# Settings only the operator sets (command line, preset file, Gadgetron chain), never a network client.
OPERATOR_ONLY = ("checkpoint", "device", "precision", "refine", "refine_lambda", "adapt", "adapt_steps",
                 "adapt_time_limit", "workers")


class ConfigError(ValueError):
    """A configuration key or value is not acceptable; the message names it."""


@dataclass(frozen=True)
class ReconConfig:
    """Pipeline settings. Units: ``dither_sigma`` relative to the image maximum."""

    # varnet | zero-filled (no model; debugging, comparison)
    mode: str = choice("varnet", ("varnet", "zero-filled"))
    # The model file, a path given by the operator (never by a client); unset: $VARNET_CHECKPOINT, else the
    # weights shipped in the package (docs/guide/doors.md, "Model weights").
    checkpoint: Optional[str] = None
    device: str = "auto"                 # auto (CUDA when present) | cpu | cuda | cuda:N
    # fp32 | bf16 | fp16: the U-Nets' arithmetic (FFTs, coil maths stay fp32)
    precision: str = choice("fp32", ("fp32", "bf16", "fp16"))
    # The network's image finished by a parallel-imaging solve with its image as the prior (ESPIRiT's maps
    # where they cover the object, else its own; docs/guide/refinement.md): pi | none | auto (the default:
    # what the checkpoint records, gadget.model.checkpoint.default_refine: pi for the shipped weights,
    # none for fastMRI and bare state dicts and Lightning .ckpt, whose output is then fastMRI's).
    refine: str = choice("auto", ("auto", "pi", "none"))
    # The refinement's prior weight λ; 0 = chosen per slice from the noise (noisy data lean on the network,
    # clean data on the measurements).
    refine_lambda: float = 0.0
    batch_size: int = 1                  # slices per forward pass
    # Batches reconstructed side by side (network, refine, safety check), each on its share of the CPU
    # threads: more slices per second when slices wait (varnet replay --workers sets it; auto there is 2 on
    # a CPU), but each slice takes longer alone, so a live stream keeps 1 unless its slices complete together.
    workers: int = 1
    prewhiten: bool = True               # noise prewhitening from noise-measurement acquisitions
    # flags (calibration flags; else the centre run of the mask) | mask (the centre run)
    acs_source: str = choice("flags", ("flags", "mask"))
    # float32 | uint16 (scale recorded in the meta)
    image_dtype: str = choice("float32", ("float32", "uint16"))
    uint16_max: int = 4095               # uint16 only: the largest stored value (4095: the 12 bits consoles store)
    # uint16 only: stored = float · scale, one scale for the whole series. 0 = chosen from the first
    # slice reconstructed (its maximum maps to uint16_max / 2, so slices up to twice as bright keep their
    # peaks; brighter pixels clip); > 0 = this factor.
    uint16_scale: float = 0.0
    # Noise added to each stored image, its std relative to the image maximum and shaped by the local
    # median of the image (gadget/stream/images.py, dither_noise); seeded per image index; 0 = none.
    dither_sigma: float = 0.0
    series_description: str = "E2E-VarNet"          # the images' series description
    sequence_description_additional: str = "VARNET"  # SequenceDescriptionAdditional of the images ("" = omitted)
    image_series_index: int = 1          # series number of the network's images (also_send's series: + 1)
    # A second series for side-by-side reading, numbered image_series_index + 1: none | zero-filled | sense.
    also_send: str = choice("none", ("none", "zero-filled", "sense"))
    # Receiver noise bandwidth relative to the sampling bandwidth, used when the header does not give
    # acquisitionSystemInformation/relativeReceiverNoiseBandwidth (Gadgetron's NoiseAdjustGadget default).
    noise_bandwidth_ratio: float = 0.793
    # The whitened noise level (gadget/stream/noise.py): scan = the imaging data's own per-coil level, which
    # no dwell-time difference between noise scan and data can change; gadgetron = NoiseAdjustGadget's
    # absolute units, scaled by sqrt(2 · imaging dwell / noise dwell · noise_bandwidth_ratio).
    noise_units: str = choice("scan", ("scan", "gadgetron"))
    # Virtual coils kept by PCA coil compression from the calibration region (0 = off).
    coil_compression: int = 0
    reconstruct_incomplete: bool = True  # at end of stream, reconstruct buffers never marked complete
    # A slice sampled at an acceleration below this (lines in the acquired range / lines measured) is
    # sent as the RSS coil combination of its data, not a network's rewrite (docs/guide/pipeline.md).
    fully_sampled_below: float = 1.5
    # What is sent for a slice the safety check (gadget/recon/safety.py) flags: zero-filled (RSS of the
    # measured lines; the default: it invents nothing, and on held-out heads ESPIRiT + CG-SENSE was worse
    # than it, docs/results/safety.md) | sense (ESPIRiT + CG-SENSE) | none (the network's image, flagged).
    fallback: str = choice("zero-filled", ("none", "sense", "zero-filled"))
    # Flag a slice whose withheld-line prediction error exceeds this (zero-filling scores 1; above it the
    # network's guess of unseen k-space is worse than none). 1.1: above every held-out slice of a good
    # model, below half of a failing one's (docs/results/safety.md).
    safety_prediction_max: float = 1.1
    # Flag a slice whose residual on the measured lines exceeds this; inf = reported only (it did not
    # separate a good model from a failing one).
    safety_consistency_max: float = math.inf
    # Flag a slice whose image departs from the ACS-band reconstruction by more than this; inf = reported
    # only (it did not separate a good model from a failing one).
    safety_departure_max: float = math.inf
    # Self-supervised adaptation on each scan's own undersampled lines before it is reconstructed
    # (gadget/train/adapt_run.py; offline doors only: varnet infer, varnet replay): none; solve (the cs
    # refine, its weights chosen on the scan's held-back lines); scan (that, and the network's weights
    # adapted on the scan). With refine pi or none given explicitly, scan adapts the weights only.
    adapt: str = choice("none", ("none", "solve", "scan"))
    # The most optimiser steps of that adaptation; fewer when the held-back lines' loss stops falling.
    adapt_steps: int = 60
    adapt_time_limit: float = 480.0      # seconds the adaptation may take per scan, calibration included (0 = no limit)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def calibrates_solve(self) -> bool:
        """Per-scan adaptation chooses the ``cs`` refine's weights (``adapt`` solve or scan, refine auto)."""
        return self.adapt != "none" and self.refine == "auto"

    def merged(self, values: Mapping[str, Any], source: str) -> "ReconConfig":
        """A copy with ``values`` applied (validated and converted); ``source`` names them in errors."""
        known = {f.name: f for f in fields(self)}
        updates = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown setting '{key}' (known: {', '.join(sorted(known))})")
            updates[name] = _check_range(name, convert_field(ReconConfig, name, value, source=source,
                                                             error=ConfigError), source)
        return dataclasses.replace(self, **updates)

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())


# The allowed values of each choice field, declared beside the fields (gadget.data.typed_config.choice):
# precision is gadget.model.varnet.PRECISIONS, noise_units gadget.stream.noise.UNITS; refine auto is the
# checkpoint's own, else gadget.model.checkpoint.REFINE_MODES; adapt is gadget.train.adapt_run's.
CHOICES = choices_of(ReconConfig)


def _check_range(name: str, out: Any, source: str) -> Any:
    """``out`` (already converted to the field's type) if it lies in the range setting ``name`` allows,
    else a :class:`ConfigError` naming ``source`` and the setting."""
    if name in ("batch_size", "workers", "uint16_max", "image_series_index", "adapt_steps") and out < 1:
        raise ConfigError(f"{source}: setting '{name}' must be >= 1, got {out}")
    if name in ("safety_consistency_max", "safety_departure_max", "safety_prediction_max") and not out > 0:
        raise ConfigError(f"{source}: setting '{name}' must be > 0 (a relative norm; inf switches it off), got {out}")
    if name == "fully_sampled_below" and not out >= 1:
        raise ConfigError(f"{source}: setting 'fully_sampled_below' must be >= 1 (an acceleration), got {out}")
    if name == "uint16_max" and out > 65535:
        raise ConfigError(f"{source}: setting 'uint16_max' must be <= 65535, got {out}")
    if name == "coil_compression" and out < 0:
        raise ConfigError(f"{source}: setting 'coil_compression' must be >= 0 (0 = off), got {out}")
    if name == "refine_lambda" and not (out >= 0 and math.isfinite(out)):
        raise ConfigError(f"{source}: setting 'refine_lambda' must be a finite number >= 0 (0 = from the noise), "
                          f"got {out}")
    if name == "adapt_time_limit" and not (out >= 0 and math.isfinite(out)):
        raise ConfigError(f"{source}: setting 'adapt_time_limit' must be a finite number of seconds >= 0 (0 = none), "
                          f"got {out}")
    if name == "uint16_scale" and not (out >= 0 and math.isfinite(out)):
        raise ConfigError(f"{source}: setting 'uint16_scale' must be a finite number >= 0 (0 = from the first "
                          f"slice), got {out}")
    if name == "noise_bandwidth_ratio" and not 0 < out <= 1:
        raise ConfigError(f"{source}: setting 'noise_bandwidth_ratio' must be in (0, 1], got {out}")
    if name == "dither_sigma" and out < 0:
        raise ConfigError(f"{source}: setting 'dither_sigma' must be >= 0, got {out}")
    return out


# --------------------------------------------------------------------------- sources

_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def presets_dir() -> Path:
    """The folder of the pipeline presets (``gadget.pipelines``, ``pipelines/*.yaml`` in the source tree)."""
    return presets_folder()


def preset_names() -> list[str]:
    """The names of the pipeline presets, sorted."""
    return yaml_stems(presets_dir())


def preset_path(name: str) -> Path:
    """The YAML file of a preset; ``name`` is checked against the files present (a whitelist),
    so client-supplied names can never reach other paths."""
    available = preset_names()
    if not _PRESET_NAME.match(name or "") or name not in available:
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(available) or 'none'})")
    return presets_dir() / f"{name}.yaml"


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """The mapping of settings in YAML ``text`` (empty: ``{}``); a :class:`ConfigError` naming ``source``
    for invalid YAML or another top level."""
    return load_yaml_mapping(text, source, error=ConfigError, what="settings")


def load_config(spec: Optional[str] = None, base: ReconConfig = ReconConfig()) -> ReconConfig:
    """``spec`` is a preset name or a path to a YAML file, given by the operator. A name from a network
    client goes through :func:`load_preset` only."""
    if not spec:
        return base
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return base.merged(parse_yaml(path.read_text(), str(path)), str(path))
    return load_preset(spec, base)


def load_preset(name: str, base: ReconConfig = ReconConfig()) -> ReconConfig:
    """``base`` with the preset ``name`` applied; the name is checked against the preset files
    (:func:`preset_path`), never read as a path."""
    path = preset_path(name)
    return base.merged(parse_yaml(path.read_text(), f"preset {name}"), f"preset {name}")


def json_object(text: str | Mapping[str, Any], source: str = "JSON parameters") -> Mapping[str, Any]:
    """A JSON parameters text as a mapping (an already parsed mapping passes through); anything else
    is a :class:`ConfigError` naming ``source``."""
    if isinstance(text, Mapping):
        return text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    return data


def from_json_parameters(text: str | Mapping[str, Any], base: ReconConfig,
                         source: str = "JSON parameters") -> ReconConfig:
    """MRD clients may send a JSON object of parameters (python-ismrmrd-server style); a
    ``parameters`` sub-object is accepted too. Only known settings, and never ``checkpoint``. (The
    OpenRecon form, where unknown keys are warnings, is gadget.recon.ui_parameters.)"""
    data = json_object(text, source)
    if isinstance(data.get("parameters"), dict):
        data = data["parameters"]
    return client_merge(base, data, source)


def client_merge(base: ReconConfig, values: Mapping[str, Any], source: str) -> ReconConfig:
    """Settings from a network client: the model file, device and precision stay the operator's choice."""
    for forbidden in OPERATOR_ONLY:
        if forbidden in values:
            raise ConfigError(f"{source}: '{forbidden}' cannot be set by a client")
    return base.merged(values, source)


def gadgetron_properties(xml_text: str, source: str = "Gadgetron configuration") -> dict[str, str]:
    """The ``<property name="batch_size" value="2"/>`` elements anywhere in the ``<configuration>``,
    as named there (values unchecked; :meth:`ReconConfig.merged` checks them)."""
    import xml.etree.ElementTree as ET

    text = xml_text.rstrip("\x00 \n")
    if not text:
        return {}
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConfigError(f"{source}: not valid XML ({exc})") from None
    props = {}
    for el in root.iter():
        if el.tag.split("}")[-1] == "property" and "name" in el.attrib:
            props[el.attrib["name"]] = el.attrib.get("value", el.text or "")
    return props


def from_gadgetron_config(xml_text: str, base: ReconConfig, source: str = "Gadgetron configuration") -> ReconConfig:
    """``base`` with the chain's ``<property>`` elements applied (:func:`gadgetron_properties`)."""
    return base.merged(gadgetron_properties(xml_text, source), source)
