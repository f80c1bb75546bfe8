"""Edits of ISMRMRD header XML that keep everything we do not touch (ElementTree, namespace kept).

Used by the converters: set the acceleration / calibration mode and slice limits, and carry
fastMRI attributes as ``userParameters`` (names prefixed ``fastmri.``) so a round trip
fastMRI → ISMRMRD → fastMRI restores them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from gadget.data.mrd_header import ISMRMRD_NS, HeaderError

NS = f"{{{ISMRMRD_NS}}}"
USER_PREFIX = "fastmri."
# Child order inside <encoding> and the header root (ismrmrd.xsd sequences).
_ENCODING_ORDER = ["encodedSpace", "reconSpace", "encodingLimits", "trajectory", "trajectoryDescription",
                   "parallelImaging", "echoTrainLength"]
_ROOT_ORDER = ["version", "subjectInformation", "studyInformation", "measurementInformation",
               "acquisitionSystemInformation", "experimentalConditions", "encoding", "sequenceParameters",
               "userParameters", "waveformInformation"]
_LIMIT_ORDER = ["kspace_encoding_step_0", "kspace_encoding_step_1", "kspace_encoding_step_2", "average",
                "slice", "contrast", "phase", "repetition", "set", "segment"]
_USER_KINDS = {int: "userParameterLong", float: "userParameterDouble", str: "userParameterString"}


def _local(tag: str) -> str:
    return tag.split("}", 1)[-1]


def parse(xml: str) -> ET.Element:
    ET.register_namespace("", ISMRMRD_NS)
    try:
        root = ET.fromstring(xml.rstrip("\x00 \n"))
    except ET.ParseError as exc:
        raise HeaderError(f"ISMRMRD header is not valid XML ({exc})") from None
    if _local(root.tag) != "ismrmrdHeader":
        raise HeaderError(f"root element is <{_local(root.tag)}>, expected <ismrmrdHeader>")
    return root


def to_string(root: ET.Element) -> str:
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def _ns(root: ET.Element) -> str:
    return root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""


def _child(parent: ET.Element, name: str, order: list[str], ns: str) -> ET.Element:
    """The child ``name`` of ``parent``, created at its schema position when missing."""
    for el in parent:
        if _local(el.tag) == name:
            return el
    new = ET.Element(ns + name)
    rank = order.index(name)
    position = len(parent)
    for i, el in enumerate(parent):
        if _local(el.tag) in order and order.index(_local(el.tag)) > rank:
            position = i
            break
    parent.insert(position, new)
    return new


def _set_text(parent: ET.Element, ns: str, *pairs: tuple[str, Any]) -> None:
    for name, value in pairs:
        el = next((e for e in parent if _local(e.tag) == name), None)
        if el is None:
            el = ET.SubElement(parent, ns + name)
        el.text = str(value)


def set_parallel_imaging(root: ET.Element, acceleration: int, calibration_mode: str) -> None:
    ns = _ns(root)
    enc = _child(root, "encoding", _ROOT_ORDER, ns)
    pi = _child(enc, "parallelImaging", _ENCODING_ORDER, ns)
    for el in list(pi):
        pi.remove(el)
    factor = ET.SubElement(pi, ns + "accelerationFactor")
    _set_text(factor, ns, ("kspace_encoding_step_1", acceleration), ("kspace_encoding_step_2", 1))
    _set_text(pi, ns, ("calibrationMode", calibration_mode))


def set_limit(root: ET.Element, name: str, maximum: int, center: int) -> None:
    ns = _ns(root)
    enc = _child(root, "encoding", _ROOT_ORDER, ns)
    limits = _child(enc, "encodingLimits", _ENCODING_ORDER, ns)
    limit = _child(limits, name, _LIMIT_ORDER, ns)
    for el in list(limit):
        limit.remove(el)
    _set_text(limit, ns, ("minimum", 0), ("maximum", maximum), ("center", center))


def set_user_parameters(root: ET.Element, values: dict[str, Any]) -> None:
    """Store ``values`` as ``fastmri.<name>`` user parameters (int → Long, float → Double, str → String)."""
    ns = _ns(root)
    params = _child(root, "userParameters", _ROOT_ORDER, ns)
    for el in list(params):
        name = el.find(ns + "name")
        if name is not None and (name.text or "").startswith(USER_PREFIX):
            params.remove(el)
    order = list(_USER_KINDS.values())
    for key, value in values.items():
        kind = _USER_KINDS[int if isinstance(value, (bool, int)) else float if isinstance(value, float) else str]
        el = ET.Element(ns + kind)
        _set_text(el, ns, ("name", USER_PREFIX + key), ("value", value if kind != "userParameterDouble"
                                                           else repr(float(value))))
        position = len(params)
        for i, other in enumerate(params):
            if _local(other.tag) in order and order.index(_local(other.tag)) > order.index(kind):
                position = i
                break
        params.insert(position, el)


def pop_user_parameters(root: ET.Element) -> dict[str, Any]:
    """Remove and return our ``fastmri.*`` user parameters, typed back from their element kind."""
    ns = _ns(root)
    params = next((e for e in root if _local(e.tag) == "userParameters"), None)
    if params is None:
        return {}
    casts = {"userParameterLong": int, "userParameterDouble": float, "userParameterString": str}
    out = {}
    for el in list(params):
        name, value = el.find(ns + "name"), el.find(ns + "value")
        if name is None or value is None or not (name.text or "").startswith(USER_PREFIX):
            continue
        cast = casts.get(_local(el.tag), str)
        out[name.text[len(USER_PREFIX):]] = cast(value.text or "")
        params.remove(el)
    if len(params) == 0:
        root.remove(params)
    return out
