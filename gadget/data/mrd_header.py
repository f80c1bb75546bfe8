"""Tolerant reading and minimal writing of ISMRMRD XML headers.

Strict parsers (``ismrmrd.xsd`` 1.15) reject headers real tools write (missing sections,
unknown elements, a ``<version>`` element). We read only the fields we need, by path,
ignoring namespaces and everything else; a missing field raises :class:`HeaderError`
naming the source and the field.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"


class HeaderError(ValueError):
    """A header is not XML or lacks a field we need."""


@dataclass(frozen=True)
class EncodingInfo:
    """What reconstruction needs from ``<encoding>`` (the first one).

    Sizes in samples; FOV in mm. ``kspace_encoding_step_1`` limits index phase-encode lines,
    ``kspace_encoding_step_2`` limits the partitions of a 3-D scan (``encoded_matrix[2] > 1``);
    a 2-D scan has ``e2_min == e2_max == e2_center == 0``.
    """

    encoded_matrix: tuple[int, int, int]  # (x=readout, y=phase, z)
    recon_matrix: tuple[int, int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_fov_mm: tuple[float, float, float]
    e1_min: int
    e1_max: int
    e1_center: int
    acceleration_e1: Optional[int] = None
    calibration_mode: Optional[str] = None
    e2_min: int = 0
    e2_max: int = 0
    e2_center: int = 0
    acceleration_e2: Optional[int] = None
    receiver_channels: Optional[int] = None  # acquisitionSystemInformation/receiverChannels

    @property
    def is_3d(self) -> bool:
        """A 3-D Cartesian scan: more than one partition in the encoded matrix (z)."""
        return self.encoded_matrix[2] > 1

    @property
    def separate_reference(self) -> bool:
        """``parallelImaging/calibrationMode`` is ``separate``: lines flagged only
        ACQ_IS_PARALLEL_CALIBRATION are reference data, not imaging data."""
        return (self.calibration_mode or "").strip().lower() == "separate"

    @property
    def partition_thickness_mm(self) -> float:
        """Thickness of one reconstructed partition (mm): reconSpace FOV z / reconSpace matrix z.
        For a 2-D scan (matrix z 1) this is the slice thickness, reconSpace FOV z."""
        return self.recon_fov_mm[2] / max(self.recon_matrix[2], 1)

    @property
    def e2_padding(self) -> int:
        """Row of partition ``e2 = 0`` in the encoded z grid: ``encoded z // 2 - e2 center`` (the
        e1 rule along kz; non-zero for partial Fourier along kz)."""
        return self.encoded_matrix[2] // 2 - self.e2_center

    @property
    def padding(self) -> tuple[int, int]:
        """fastMRI's ``(padding_left, padding_right)`` of the acquired phase range in the
        encoded matrix: left = enc_y//2 - center, right = left + maximum + 1."""
        left = self.encoded_matrix[1] // 2 - self.e1_center
        return left, left + self.e1_max + 1

    @property
    def recon_size(self) -> tuple[int, int]:
        return self.recon_matrix[0], self.recon_matrix[1]


def _strip_ns(root: ET.Element) -> ET.Element:
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    return root


def parse_xml(text: str | bytes, source: str = "header") -> ET.Element:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.rstrip("\x00 \n\r\t")
    if not text:
        raise HeaderError(f"{source}: ISMRMRD header is empty")
    try:
        return _strip_ns(ET.fromstring(text))
    except ET.ParseError as exc:
        raise HeaderError(f"{source}: ISMRMRD header is not valid XML ({exc})") from None


def _find(root: ET.Element, path: str, source: str, cast=int, default=None, required=True):
    el = root.find(path)
    if el is None or el.text is None or not el.text.strip():
        if required and default is None:
            raise HeaderError(f"{source}: ISMRMRD header lacks field '{path}'")
        return default
    try:
        return cast(el.text.strip())
    except ValueError:
        raise HeaderError(f"{source}: ISMRMRD header field '{path}' = {el.text.strip()!r} is not a {cast.__name__}") from None


def parse_encoding(text: str | bytes, source: str = "header") -> EncodingInfo:
    root = parse_xml(text, source)
    enc = root.find("encoding")
    if enc is None:
        raise HeaderError(f"{source}: ISMRMRD header lacks field 'encoding'")

    def triple(space: str, what: str, cast):
        return tuple(_find(enc, f"{space}/{what}/{ax}", source, cast, default=1 if ax == "z" else None)
                     for ax in ("x", "y", "z"))

    enc_matrix = triple("encodedSpace", "matrixSize", int)
    lim = "encodingLimits/kspace_encoding_step_1"
    e1_max = _find(enc, f"{lim}/maximum", source, default=enc_matrix[1] - 1)
    lim2 = "encodingLimits/kspace_encoding_step_2"
    return EncodingInfo(
        encoded_matrix=enc_matrix,
        recon_matrix=triple("reconSpace", "matrixSize", int),
        encoded_fov_mm=triple("encodedSpace", "fieldOfView_mm", float),
        recon_fov_mm=triple("reconSpace", "fieldOfView_mm", float),
        e1_min=_find(enc, f"{lim}/minimum", source, default=0),
        e1_max=e1_max,
        e1_center=_find(enc, f"{lim}/center", source, default=enc_matrix[1] // 2),
        acceleration_e1=_find(enc, "parallelImaging/accelerationFactor/kspace_encoding_step_1",
                              source, required=False),
        calibration_mode=_find(enc, "parallelImaging/calibrationMode", source, str, required=False),
        e2_min=_find(enc, f"{lim2}/minimum", source, default=0),
        e2_max=_find(enc, f"{lim2}/maximum", source, default=enc_matrix[2] - 1),
        e2_center=_find(enc, f"{lim2}/center", source, default=enc_matrix[2] // 2),
        acceleration_e2=_find(enc, "parallelImaging/accelerationFactor/kspace_encoding_step_2",
                              source, required=False),
        receiver_channels=_find(root, "acquisitionSystemInformation/receiverChannels", source, required=False),
    )


def build_header_xml(*, encoded_matrix: tuple[int, int, int], recon_matrix: tuple[int, int, int],
                     encoded_fov_mm: tuple[float, float, float], recon_fov_mm: tuple[float, float, float],
                     e1_max: int, e1_center: int, num_coils: int, num_slices: int = 1,
                     acceleration_e1: int = 1, calibration_mode: str = "other",
                     field_strength_t: float = 3.0, system_vendor: str = "varnet-gadget simulation",
                     e2_max: int = 0, e2_center: int = 0, acceleration_e2: int = 1) -> str:
    """A minimal, schema-valid ISMRMRD header for a 2-D Cartesian multi-slice scan (or, with
    ``encoded_matrix[2] > 1`` and the ``e2_*`` limits, a 3-D Cartesian one)."""
    def xyz(tag, vals, fmt):
        return f"<{tag}>" + "".join(f"<{a}>{fmt(v)}</{a}>" for a, v in zip("xyz", vals)) + f"</{tag}>"

    def space(name, matrix, fov):
        return f"<{name}>{xyz('matrixSize', matrix, int)}{xyz('fieldOfView_mm', fov, lambda v: f'{v:g}')}</{name}>"

    limit = lambda name, mx, c: f"<{name}><minimum>0</minimum><maximum>{mx}</maximum><center>{c}</center></{name}>"  # noqa: E731
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<ismrmrdHeader xmlns="{ISMRMRD_NS}">'
        "<experimentalConditions><H1resonanceFrequency_Hz>"
        f"{int(round(42.577478e6 * field_strength_t))}</H1resonanceFrequency_Hz></experimentalConditions>"
        f"<acquisitionSystemInformation><systemVendor>{system_vendor}</systemVendor>"
        f"<systemFieldStrength_T>{field_strength_t:g}</systemFieldStrength_T>"
        f"<receiverChannels>{num_coils}</receiverChannels></acquisitionSystemInformation>"
        "<encoding>"
        + space("encodedSpace", encoded_matrix, encoded_fov_mm)
        + space("reconSpace", recon_matrix, recon_fov_mm)
        + "<encodingLimits>"
        + limit("kspace_encoding_step_1", e1_max, e1_center)
        + limit("kspace_encoding_step_2", e2_max, e2_center)
        + limit("slice", max(num_slices - 1, 0), max(num_slices - 1, 0) // 2)
        + "</encodingLimits><trajectory>cartesian</trajectory>"
        "<parallelImaging><accelerationFactor>"
        f"<kspace_encoding_step_1>{acceleration_e1}</kspace_encoding_step_1>"
        f"<kspace_encoding_step_2>{acceleration_e2}</kspace_encoding_step_2></accelerationFactor>"
        f"<calibrationMode>{calibration_mode}</calibrationMode></parallelImaging>"
        "</encoding></ismrmrdHeader>"
    )
