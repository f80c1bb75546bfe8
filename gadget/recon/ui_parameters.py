"""The settings a scanner's user may change per scan, as typed UI parameters.

One table serves two ends: the OpenRecon label (gadget/openrecon/label.py declares each entry as a
boolean/choice/int/double/string parameter with default, range and help) and the MRD server, which
applies the JSON parameters TEXT an OpenRecon/FIRE client sends after the header
(:func:`apply_ui_parameters`). Ids follow OpenRecon's pattern ``^[A-Za-z0-9]+$`` (docs/guide/openrecon.md);
values may arrive as strings (``"False"``, ``"4"``) and are converted to the setting's type.
``config`` is not a setting: it names a preset (pipelines/*.yaml).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .config import CHOICES, OPERATOR_ONLY, ConfigError, ReconConfig, json_object, load_preset

log = logging.getLogger(__name__)

CONFIG_ID = "config"
LABEL_PRESET = "openrecon"  # the preset whose values are the label's defaults (the config name OpenRecon sends)
MAX_PARAMETERS = 14  # OpenRecon's label schema allows at most 14 UI parameters
_ID = re.compile(r"^[A-Za-z0-9]+$")


@functools.lru_cache(maxsize=1)
def label_defaults() -> ReconConfig:
    """The ``openrecon`` preset: the defaults the OpenRecon label declares (read once per process)."""
    return load_preset(LABEL_PRESET)


@dataclass(frozen=True)
class UiParameter:
    id: str                        # the UI id (camelCase of the setting)
    setting: str                   # the ReconConfig field it sets
    label: str                     # short label shown on the scanner
    help: str                      # one sentence for the operator
    minimum: Optional[float] = None  # int/double only
    maximum: Optional[float] = None

    @property
    def kind(self) -> str:
        """boolean | choice | int | double | string (OpenRecon's parameter types)."""
        if self.setting in CHOICES:
            return "choice"
        annotation = str(ReconConfig.__dataclass_fields__[self.setting].type)
        return {"bool": "boolean", "int": "int", "float": "double"}.get(annotation, "string")

    @property
    def default(self) -> Any:
        """The label's default: the setting's value in the ``openrecon`` preset."""
        return getattr(label_defaults(), self.setting)

    @property
    def choices(self) -> tuple[str, ...]:
        return CHOICES.get(self.setting, ())


UI_PARAMETERS: tuple[UiParameter, ...] = (
    UiParameter("mode", "mode", "Reconstruction", "varnet: the E2E-VarNet network; zero-filled: no network."),
    UiParameter("fallback", "fallback", "Safety fallback",
                "What is sent for a slice the safety check flags: zero-filled, CG-SENSE, or the network image."),
    UiParameter("alsoSend", "also_send", "Second series",
                "Also send a conventional series (zero-filled or CG-SENSE) for side-by-side reading."),
    UiParameter("imageDtype", "image_dtype", "Pixel type", "float32, or uint16 with one scale per series."),
    UiParameter("safetyPredictionMax", "safety_prediction_max", "Safety threshold",
                "Flag a slice whose withheld-line prediction error exceeds this (zero-filled = 1).", 0.1, 10.0),
    UiParameter("fullySampledBelow", "fully_sampled_below", "Fully sampled below R",
                "Slices sampled below this acceleration are sent as the coil combination of the data.", 1.0, 4.0),
    UiParameter("coilCompression", "coil_compression", "Virtual coils",
                "Compress the receive channels to this many virtual coils (0 = off).", 0, 64),
    UiParameter("prewhiten", "prewhiten", "Noise prewhitening", "Decorrelate channels using the noise scan."),
    UiParameter("reconstructIncomplete", "reconstruct_incomplete", "Reconstruct incomplete slices",
                "At the end of the scan, reconstruct slices never marked complete."),
    UiParameter("acsSource", "acs_source", "Calibration lines",
                "flags: the calibration-flagged lines; mask: the sampled centre run."),
    UiParameter("batchSize", "batch_size", "Slices per batch", "Slices per network forward pass.", 1, 16),
    UiParameter("seriesDescription", "series_description", "Series description", "Series description of the images."),
    UiParameter("seqDescAdditional", "sequence_description_additional", "Sequence suffix",
                "Appended to the sequence description of the images (SequenceDescriptionAdditional)."),
)
_BY_ID = {p.id: p for p in UI_PARAMETERS}


@dataclass
class AppliedParameters:
    config: ReconConfig
    preset: Optional[str]            # the preset ``config`` named, if any
    applied: dict[str, Any]          # setting → converted value
    ignored: list[str]               # warnings: keys we do not declare

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.applied.items()) or "none"


def apply_ui_parameters(text: str | Mapping[str, Any], base: ReconConfig, preset_loader,
                        source: str = "OpenRecon parameters") -> AppliedParameters:
    """Apply an OpenRecon/FIRE parameters TEXT: ``{"version": ..., "parameters": {key: value}}``.

    ``parameters.config`` (when it names a preset other than ``openrecon``/``default``) is applied
    first through ``preset_loader(name, config) -> config``. OpenRecon sends every UI parameter, so
    with such a preset a UI parameter left at its label default does not undo the preset's value.
    Then each key that is a declared UI id, or
    the name of a setting a client may change (gadget.recon.config.client_merge), is converted to the
    setting's type and validated (a bad value is a :class:`ConfigError`). Every other key (e.g. the
    ``sendoriginal`` of OpenRecon's example UI, or ``checkpoint``) is not applied: it is returned in
    ``ignored`` for the server to log and report to the client."""
    values = json_object(text, source).get("parameters")
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a JSON object with a 'parameters' object")
    config, preset, applied, ignored = base, None, {}, []
    name = values.get(CONFIG_ID)
    if name is not None and str(name).strip() not in ("", "default", "openrecon"):
        preset = str(name).strip()
        config = preset_loader(preset, config)
    settings = {f.name for f in dataclasses.fields(ReconConfig)} - set(OPERATOR_ONLY)
    for key, value in values.items():
        if key == CONFIG_ID:
            continue
        param = _BY_ID.get(key)
        setting = param.setting if param else str(key).replace("-", "_")
        if param is None and setting not in settings:
            reason = ("set by the operator, never by a client" if setting in OPERATOR_ONLY
                      else "not a parameter of this reconstruction")
            ignored.append(f"parameter '{key}' ignored: {reason} (known: {', '.join(_BY_ID)})")
            continue
        updated = config.merged({setting: value}, f"{source} '{key}'")
        if preset and param is not None and getattr(updated, setting) == param.default:
            continue
        config = updated
        applied[setting] = getattr(config, setting)
    return AppliedParameters(config, preset, applied, ignored)


def check_table() -> None:
    """The table's invariants (ids, count, settings exist); raises AssertionError."""
    assert len(UI_PARAMETERS) + 1 <= MAX_PARAMETERS, "OpenRecon labels allow at most 14 parameters"
    names = {f.name for f in dataclasses.fields(ReconConfig)}
    for p in UI_PARAMETERS:
        assert _ID.match(p.id), p.id
        assert p.setting in names, p.setting
        assert p.setting not in OPERATOR_ONLY, p.setting

