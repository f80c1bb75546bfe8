"""The OpenRecon label: a JSON document, base64-encoded into one Docker label of the image.

Built from the package version, the constants below, and the UI parameter table
(:data:`gadget.recon.ui_parameters.UI_PARAMETERS`) plus the ``config`` choice of preset; every
parameter's default is its value in the ``openrecon`` preset (the config name OpenRecon sends),
so a scanner that sends the defaults gets that preset unchanged. Validated against
``schema.json`` (draft-07, "OpenReconSchema_1.1.0"; docs/guide/openrecon.md).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..recon.config import preset_names
from ..recon.ui_parameters import CONFIG_ID, LABEL_PRESET, MAX_PARAMETERS, UI_PARAMETERS, label_defaults

LABEL_KEY = "com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0"
VENDOR = "VarNetGadget"   # file-name safe: OpenRecon_<vendor>_<name>_V<version>.zip
NAME = "E2EVarNet"
PRESET = LABEL_PRESET      # the config name an OpenRecon scanner sends (docs/reference/protocol.md)
PORT = 9002
# Deterministic on purpose (the Dockerfile's label is compared with a fresh one in the tests):
# change with the package version.
RELEASE_DATE = "2026/11/30"
INFORMATION = ("E2E-VarNet (Sriram et al. 2020) reconstruction of undersampled Cartesian 2-D k-space, "
               "with noise prewhitening and a per-slice safety check that falls back to a zero-filled "
               "image. Research software: not a medical device, not for diagnostic use.")
DOUBLE_STEP = Decimal("0.1")  # OpenRecon's multipleOf for double parameters
_SAFE_NAME = re.compile(r"^[A-Za-z0-9]+$")


class LabelError(ValueError):
    """The label cannot be built or is not valid; the message names what is wrong."""


# ----------------------------------------------------------------------------- schema

@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The draft-07 schema shipped as package data (``gadget/openrecon/schema.json``)."""
    return json.loads(resources.files(__package__).joinpath("schema.json").read_text(encoding="utf-8"))


def _jsonschema():
    try:
        import jsonschema
    except ImportError:
        raise LabelError("validating the OpenRecon label needs jsonschema: "
                         "pip install 'varnet-gadget[openrecon]'") from None
    return jsonschema


def _decimal_multiple_of(validator, step, instance, schema):
    """``multipleOf`` on the decimal text of a JSON number: 0.3 is a multiple of 0.1 (binary floats
    say otherwise: 0.3 / 0.1 = 2.9999999999999996)."""
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "number") or isinstance(instance, bool):
        return
    if Decimal(repr(instance)) % Decimal(repr(step)) != 0:
        yield ValidationError(f"{instance!r} is not a multiple of {step}")


def schema_errors(label: Any) -> list[str]:
    """Every violation of the schema, as ``path: message`` lines (empty: valid).

    Two checks: ``multipleOf`` in decimal arithmetic (what the JSON text says), and the stock
    ``jsonschema.Draft7Validator`` (float ``multipleOf``), which public OpenRecon build scripts run:
    a label must pass both."""
    jsonschema = _jsonschema()
    schema = load_schema()
    decimal = jsonschema.validators.extend(jsonschema.Draft7Validator, {"multipleOf": _decimal_multiple_of})
    def where(err) -> str:
        return "/".join(str(p) for p in err.absolute_path) or "(top)"

    found = [f"{where(e)}: {e.message}" for e in decimal(schema).iter_errors(label)]
    found += [f"{where(e)}: {e.message} (in binary floating point, as stock jsonschema computes it)"
              for e in jsonschema.Draft7Validator(schema).iter_errors(label)
              if e.validator == "multipleOf" and f"{where(e)}: {e.message}" not in found]
    return found


def validate_label(label: Any) -> None:
    """Raise :class:`LabelError` listing every schema violation and every cross-field problem
    (duplicate ids, defaults outside their range or choices)."""
    problems = schema_errors(label)
    if not problems:
        problems = _cross_field_problems(label["parameters"])
    if problems:
        raise LabelError("OpenRecon label is not valid:\n  " + "\n  ".join(problems))


def _cross_field_problems(parameters: list[dict]) -> list[str]:
    problems, seen = [], set()
    for p in parameters:
        if p["id"] in seen:
            problems.append(f"parameter '{p['id']}' is declared twice")
        seen.add(p["id"])
        if p["type"] in ("int", "double") and not p["minimum"] <= p["default"] <= p["maximum"]:
            problems.append(f"parameter '{p['id']}': default {p['default']} outside "
                            f"[{p['minimum']}, {p['maximum']}]")
        if p["type"] == "choice" and p["default"] not in [v["id"] for v in p["values"]]:
            problems.append(f"parameter '{p['id']}': default '{p['default']}' is not one of its values")
    return problems


# ----------------------------------------------------------------------------- building

def _text(value: str) -> dict[str, str]:
    return {"en": value}


def _double(param_id: str, what: str, value: float) -> float:
    """A double bound or default, which OpenRecon requires to be a multiple of 0.1."""
    if Decimal(repr(float(value))) % DOUBLE_STEP != 0:
        raise LabelError(f"UI parameter '{param_id}': {what} {value} is not a multiple of {DOUBLE_STEP} "
                         "(OpenRecon double parameters step by 0.1); change it in "
                         "gadget/recon/ui_parameters.py or the openrecon preset")
    return float(value)


def _ui_parameter(param, defaults) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": param.id, "label": _text(param.label), "type": param.kind,
                             "information": _text(param.help)}
    default = getattr(defaults, param.setting)
    if param.kind in ("int", "double") and (param.minimum is None or param.maximum is None):
        raise LabelError(f"UI parameter '{param.id}' ({param.kind}) needs a minimum and a maximum")
    if param.kind == "choice":
        entry["values"] = [{"id": c, "name": _text(c)} for c in param.choices]
        entry["default"] = str(default)
    elif param.kind == "int":
        entry.update(minimum=int(param.minimum), maximum=int(param.maximum), default=int(default))
    elif param.kind == "double":
        entry.update(minimum=_double(param.id, "minimum", param.minimum),
                     maximum=_double(param.id, "maximum", param.maximum),
                     default=_double(param.id, "default", default))
    elif param.kind == "boolean":
        entry["default"] = bool(default)
    else:
        entry["default"] = "" if default is None else str(default)
    return entry


def _config_parameter() -> dict[str, Any]:
    """The preset choice, defaulting to ``openrecon``. The preset named ``default`` is not offered: the
    server reads that name as "keep the preset the config name chose", so offering it would mislead."""
    names = [n for n in preset_names() if n != "default"]
    if PRESET not in names:
        raise LabelError(f"the preset '{PRESET}' (pipelines/{PRESET}.yaml) is missing; OpenRecon sends that name")
    return {"id": CONFIG_ID, "label": _text("Preset"), "type": "choice",
            "information": _text("Settings preset (pipelines/*.yaml); the parameters below are applied on top."),
            "values": [{"id": n, "name": _text(n)} for n in names], "default": PRESET}


def package_version() -> str:
    from .. import __version__

    if not re.match(r"^\d+\.\d+\.\d+", __version__):
        raise LabelError(f"package version '{__version__}' is not a semantic version; install the package "
                         "(pip install -e .) so its version is known")
    return __version__


def build_label(version: Optional[str] = None) -> dict[str, Any]:
    """The label document for this package version (validated; raises :class:`LabelError`)."""
    version = version or package_version()
    for what, value in (("VENDOR", VENDOR), ("NAME", NAME)):
        if not _SAFE_NAME.match(value):
            raise LabelError(f"{what} '{value}' must be letters and digits (it names the package files)")
    defaults = label_defaults()
    parameters = [_config_parameter()] + [_ui_parameter(p, defaults) for p in UI_PARAMETERS]
    if len(parameters) > MAX_PARAMETERS:
        raise LabelError(f"{len(parameters)} UI parameters; OpenRecon allows at most {MAX_PARAMETERS}")
    label = {
        "general": {
            "name": _text(NAME),
            "version": version,
            "vendor": VENDOR,
            "information": _text(INFORMATION),
            "id": f"{VENDOR}.{NAME}".lower(),
            "regulatory_information": {
                "device_trade_name": NAME,
                "production_identifier": version,
                "manufacturer_address": "none (open-source research software)",
                "made_in": "none (open-source research software)",
                "manufacture_date": RELEASE_DATE,
                "material_number": f"{NAME}_{version.replace('.', '_')}",
                "gtin": "none",
                "udi": "none",
                "safety_advices": "Research use only. Not a medical device; images are not for diagnosis.",
                "special_operating_instructions": "See the PDF manual of this package.",
                "additional_relevant_information": "Slices the safety check flags are replaced by zero-filled "
                                                   "images and marked SAFETY FLAG in their comments.",
            },
        },
        "reconstruction": {
            "transfer_protocol": {"protocol": "ISMRMRD", "version": "1.4.1"},
            "port": PORT,
            "emitter": "raw",
            "injector": "image",
            "can_use_gpu": True,
            "min_count_required_gpus": 0,
            "min_required_memory": 4096,
            "min_count_required_cpu_cores": 2,
            "content_qualification_type": "RESEARCH",
        },
        "parameters": parameters,
    }
    validate_label(label)
    return label


def package_stem(label: dict) -> str:
    """``OpenRecon_<vendor>_<name>_V<version>``: the name of the zip, its tar and its PDF."""
    g = label["general"]
    return f"OpenRecon_{g['vendor']}_{g['name']['en']}_V{g['version']}"


# ----------------------------------------------------------------------------- encoding

def encode_label(label: dict) -> str:
    """Base64 of the compact JSON (ASCII), the Docker label's value."""
    text = json.dumps(label, separators=(",", ":"), ensure_ascii=True)
    return base64.b64encode(text.encode("ascii")).decode("ascii")


def decode_label(value: str) -> dict:
    try:
        return json.loads(base64.b64decode(value, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"the label value is not base64 of a JSON document: {exc}") from None


def label_instruction(label: dict) -> str:
    """The Dockerfile line carrying the label."""
    return f'LABEL "{LABEL_KEY}"="{encode_label(label)}"'


_LABEL_LINE = re.compile(r'^LABEL "' + re.escape(LABEL_KEY) + r'"="([A-Za-z0-9+/=]*)"\s*$', re.M)


def dockerfile_label(dockerfile: Path, stage: str = "openrecon") -> dict:
    """Decode the label from the ``LABEL`` line of ``stage`` in a Dockerfile."""
    match = _LABEL_LINE.search(_stage_text(Path(dockerfile), stage)[2])
    if not match:
        raise LabelError(f"{dockerfile}: stage '{stage}' has no line LABEL \"{LABEL_KEY}\"=\"...\"")
    return decode_label(match.group(1))


def write_dockerfile_label(dockerfile: Path, label: dict, stage: str = "openrecon") -> bool:
    """Replace the label line of ``stage`` in place; returns whether the file changed."""
    dockerfile = Path(dockerfile)
    text, start, body = _stage_text(dockerfile, stage)
    new_body, count = _LABEL_LINE.subn(lambda _: label_instruction(label), body)
    if count != 1:
        raise LabelError(f"{dockerfile}: stage '{stage}' must hold exactly one line LABEL \"{LABEL_KEY}\"=\"...\" "
                         f"(found {count})")
    new_text = text[:start] + new_body + text[start + len(body):]
    if new_text != text:
        dockerfile.write_text(new_text)
    return new_text != text


def _stage_text(dockerfile: Path, stage: str) -> tuple[str, int, str]:
    """``(whole file, offset of the stage, text of the stage)``: from its FROM line to the next."""
    text = dockerfile.read_text()
    froms = [m for m in re.finditer(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?\s*$", text, flags=re.M | re.I)]
    for n, m in enumerate(froms):
        if (m.group(1) or "").lower() == stage.lower():
            end = froms[n + 1].start() if n + 1 < len(froms) else len(text)
            return text, m.start(), text[m.start():end]
    raise LabelError(f"{dockerfile}: no build stage '{stage}' (FROM ... AS {stage})")
