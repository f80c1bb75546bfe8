"""Siemens twix raw data (``meas.dat``: VB, and VD/VE/XA multi-raid) → ISMRMRD raw file.

The twix file is parsed with ``twixtools`` (protocol buffers and measurement data headers, MDHs);
the samples are read here, one MDH at a time, from the offsets twixtools found. The mapping
follows what ``siemens_to_ismrmrd`` (its ``main.cpp`` and ``IsmrmrdParameterMap_Siemens.xsl``)
writes, field by field, except where stated below.

Measurements (raids). A VD/VE/XA file holds several measurements; the last one is the scan, the
earlier ones are adjustments. Noise-adjust lines (MDH ``NOISEADJSCAN``) of earlier measurements are
written first, as noise acquisitions, when they carry the scan's receive channels (reordered to the
scan's channel order); other lines of earlier measurements are skipped and listed in the report. A VB
file holds one measurement. The header is built from the scan's protocol.

Acquisitions, one per MDH of the scan (and per noise MDH of earlier measurements), in file order:

* ``SYNCDATA`` blocks (physiology/trajectory payloads, not readouts) and ``ACQEND`` are not written;
  the report counts the skipped SYNCDATA blocks.
* Flags: NOISEADJSCAN → IS_NOISE_MEASUREMENT (19); PATREFANDIMASCAN → IS_PARALLEL_CALIBRATION_AND_IMAGING
  (21), else PATREFSCAN → IS_PARALLEL_CALIBRATION (20); REFLECT → IS_REVERSE (22);
  FIRSTSCANINSLICE / LASTSCANINSLICE → FIRST/LAST_IN_SLICE (7, 8); LASTSCANINMEAS and RETRO_ENDOFMEAS →
  LAST_IN_MEASUREMENT (25); PHASCOR → IS_PHASECORR_DATA (24); RTFEEDBACK → IS_NAVIGATION_DATA (23) and
  IS_RTFEEDBACK_DATA (28); HPFEEDBACK → IS_HPFEEDBACK_DATA (26); RETRO_DUMMYSCAN → IS_DUMMYSCAN_DATA
  (27); REFPHASESTABSCAN / PHASESTABSCAN → IS_PHASE_STABILIZATION_REFERENCE / IS_PHASE_STABILIZATION
  (30, 31); MDH bit 60 (twixtools' FID navigator category) → IS_NAVIGATION_DATA (23). The
  reconstruction pipeline drops the auxiliary ones (DESIGN §4b).
  Differences from siemens_to_ismrmrd: it maps RAWDATACORRECTION (MDH bit 10, "scale this line by the
  channel's raw-data correction factor") to IS_SURFACECOILCORRECTIONSCAN_DATA (29), which would make a
  pipeline drop every line of scans that set it on all lines; here the bit sets no flag, and the
  correction factor is not applied (twixtools does not apply it by default either). It does not set
  the phase-stabilisation flags.
* Reflected lines (REFLECT): the samples are written as stored, in acquisition order, with IS_REVERSE
  set, as siemens_to_ismrmrd writes them; a consumer reverses them (this repository's slice
  assembly does).
* Counters: kspace_encode_step_1 = Lin, kspace_encode_step_2 = Par, slice = Sli, average = Ave,
  contrast = Eco, phase = Phs, repetition = Rep, set = Set, segment = Seg, user[0..4] = Ida..Ide,
  user[5] / user[6] = the MDH's k-space centre line / partition.
* center_sample = the MDH's k-space centre column; discard_pre/post = its cut-off; available_channels =
  the protocol's ``iMaxNoOfRxChannels`` (the scan's channel count without it); scan_counter,
  measurement_uid, acquisition_time_stamp (2.5 ms ticks) and physiology_time_stamp[0] copied;
  user_int[0..6] = IceProgramPara[0..6], user_int[7] = time since the last RF pulse,
  user_float[0..7] = IceProgramPara[8..15]; sample_time_us = the measurement's ``alDwellTime[0]`` / 1000
  (for noise lines too: siemens_to_ismrmrd estimates a noise dwell time from the sample count
  instead; a different noise dwell time changes only the overall scale of prewhitened data).
* Geometry: position = the MDH slice position (Sag, Cor, Tra) in mm, the patient coordinate system
  of the protocol. The MDH quaternion is stored scalar first, (w, x, y, z); its rotation matrix
  (the standard one of a unit quaternion) has the phase-encoding, readout and slice-normal
  directions as its three columns, in that order: phase_dir = column 0, read_dir = column 1,
  slice_dir = column 2 (siemens_to_ismrmrd's convention). For a transversal slice the quaternion
  (√½, 0, 0, √½) gives phase_dir (0, 1, 0), read_dir (−1, 0, 0), slice_dir (0, 0, 1); slice_dir is
  the protocol's slice normal.

Header (``ismrmrdHeader``, valid against the ISMRMRD schema), from the scan's protocol as
siemens_to_ismrmrd takes it:

* encodedSpace: x = ``iNoOfFourierColumns`` (the readout with its oversampling), y = ``iPEFTLength``,
  z = ``i3DFTLength`` for a 3-D scan (``lPartitions`` > 1) else 1; FOV x = readout FOV ×
  ``flReadoutOSFactor``, y = phase FOV × (1 + phase oversampling), z = slice thickness (× (1 + slice
  oversampling) in 3-D). reconSpace: x = encoded x / ``flReadoutOSFactor``, y = ``NImageLins``
  (encoded y / (1 + phase oversampling) where the data rebuilt encoded y), z = ``lImagesPerSlab`` in
  3-D else 1; FOV = the protocol's readout FOV, phase FOV and thickness.
* encodingLimits: kspace_encoding_step_1 minimum 0, maximum ``iNoOfFourierLines`` − 1, centre
  ``lPhaseEncodingLines`` / 2 (the same rule along step 2 with ``iNoOfFourierPartitions`` and
  ``lPartitions``); slice, contrast, average, phase, repetition, set from the protocol's counts.
* Where the MDHs contradict the protocol, the data decide and the header says so: the readout is
  wider than ``iNoOfFourierColumns``; the Lin (Par) counters run past the encoding limits or outside
  the matrix placed around the centre; the MDHs agree on a non-zero k-space centre line that is not
  the protocol's; a counter exceeds the protocol's count. Each such field is logged as a warning,
  listed in the report and written as ``userParameterString`` ``twix_override_<field>`` (value:
  protocol and data). Sequences that write their own protocol (Pulseq, some research sequences)
  need this; a product sequence normally needs none.
* acquisitionSystemInformation: vendor, model, ``flMagneticFieldStrength`` (T), relative receiver noise
  bandwidth 0.793, receiverChannels = the scan's channel count, one coilLabel per channel (coilNumber =
  position in the acquisitions, coilName = ``tCoilID:tElement`` of the coil element whose
  ``lADCChannelConnected`` − 1 — in VB, ``lRxChannelConnected`` − 1 — is the channel's ChannelId;
  an unmatched channel is named ``ChannelId_<id>`` and listed in the report), institution.
* experimentalConditions: ``lFrequency`` (Hz). measurementInformation: measurementID
  (``<DeviceSerialNumber>_<MeasUID>``; siemens_to_ismrmrd adds patient and study ids this file
  reader does not parse), patientPosition, protocolName.
* sequenceParameters: TR (the first ``alTR`` and any further non-zero ones, ms), TE (the first
  ``lContrasts`` non-zero ``alTE``, ms), TI (non-zero ``alTI``, ms), flipAngle_deg (non-zero
  ``adFlipAngleDegree``). parallelImaging: ``lAccelFactPE`` / ``lAccelFact3D``; calibrationMode from
  ``ucRefScanMode`` (1 other, 2 embedded, 4/8 separate, 16/32/64 interleaved).
* userParameters: ``twix_format`` (VB or VD), ``twix_software`` (the scanner's software version).
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import struct
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from gadget.data.mrd_file import MrdRawWriter, empty_heads
from gadget.data.mrd_header import ISMRMRD_NS

log = logging.getLogger(__name__)

# ISMRMRD acquisition flag bits (ismrmrd constants.h; 1-based)
FIRST_IN_SLICE, LAST_IN_SLICE, IS_NOISE = 7, 8, 19
IS_CALIBRATION, IS_CALIBRATION_AND_IMAGING, IS_REVERSE = 20, 21, 22
IS_NAVIGATION, IS_PHASECORR, LAST_IN_MEASUREMENT = 23, 24, 25
IS_HPFEEDBACK, IS_DUMMYSCAN, IS_RTFEEDBACK = 26, 27, 28
IS_PHASE_STABILIZATION_REFERENCE, IS_PHASE_STABILIZATION = 30, 31

# MDH EvalInfoMask bit (twixtools' names, 0-based) → ISMRMRD flag bits it sets.
MDH_TO_ISMRMRD: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("NOISEADJSCAN", (IS_NOISE,)),
    ("PATREFANDIMASCAN", (IS_CALIBRATION_AND_IMAGING,)),
    ("REFLECT", (IS_REVERSE,)),
    ("FIRSTSCANINSLICE", (FIRST_IN_SLICE,)),
    ("LASTSCANINSLICE", (LAST_IN_SLICE,)),
    ("LASTSCANINMEAS", (LAST_IN_MEASUREMENT,)),
    ("RETRO_ENDOFMEAS", (LAST_IN_MEASUREMENT,)),
    ("PHASCOR", (IS_PHASECORR,)),
    ("RTFEEDBACK", (IS_NAVIGATION, IS_RTFEEDBACK)),
    ("HPFEEDBACK", (IS_HPFEEDBACK,)),
    ("RETRO_DUMMYSCAN", (IS_DUMMYSCAN,)),
    ("REFPHASESTABSCAN", (IS_PHASE_STABILIZATION_REFERENCE,)),
    ("PHASESTABSCAN", (IS_PHASE_STABILIZATION,)),
    ("noname60", (IS_NAVIGATION,)),
)
# PATREFSCAN sets IS_PARALLEL_CALIBRATION only without PATREFANDIMASCAN (as siemens_to_ismrmrd).
_NOISE = 1 << (IS_NOISE - 1)
_CALIBRATION = (1 << (IS_CALIBRATION - 1)) | (1 << (IS_CALIBRATION_AND_IMAGING - 1))
_REVERSE = 1 << (IS_REVERSE - 1)
_AUXILIARY = sum(1 << (b - 1) for b in (IS_NAVIGATION, IS_PHASECORR, IS_HPFEEDBACK, IS_DUMMYSCAN, IS_RTFEEDBACK,
                                        IS_PHASE_STABILIZATION_REFERENCE, IS_PHASE_STABILIZATION))

CALIBRATION_MODES = {1: "other", 2: "embedded", 4: "separate", 8: "separate", 16: "interleaved",
                     32: "interleaved", 64: "interleaved"}
TRAJECTORIES = {1: "cartesian", 2: "radial", 4: "spiral", 8: "propellor"}
PATIENT_POSITIONS = {"HFP", "HFS", "HDR", "HDL", "FFP", "FFS", "FDR", "FDL"}
RELATIVE_RECEIVER_NOISE_BANDWIDTH = 0.793  # what siemens_to_ismrmrd writes for Siemens receivers
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAX_RAIDS = 64  # entries of the VD multi-raid file header


class TwixError(ValueError):
    """A file is not a readable Siemens twix file, or its content cannot be converted; the message
    names the file."""


@dataclass
class RaidSummary:
    """One measurement of the file: what its MDHs carry."""

    index: int
    protocol: str
    mdbs: int                       # MDHs, SYNCDATA included, ACQEND excluded
    flags: dict[str, int]           # MDH flag name → number of MDHs carrying it
    samples: tuple[int, ...]        # distinct SamplesInScan of its readouts
    channels: tuple[int, ...]       # distinct UsedChannels of its readouts
    role: str                       # "scan", "noise" (its noise lines written), "skipped"


@dataclass
class TwixReport:
    """What :func:`convert_twix_to_ismrmrd` found and wrote."""

    path: Path
    format: str                      # "VB" or "VD" (VD, VE and XA share the multi-raid layout)
    software: str
    raids: list[RaidSummary]
    acquisitions: int = 0
    noise: int = 0
    calibration: int = 0             # IS_PARALLEL_CALIBRATION or ..._AND_IMAGING
    reverse: int = 0
    auxiliary: int = 0               # navigator, phase correction, feedback, dummy, phase stabilisation
    skipped_syncdata: int = 0
    channels: int = 0
    encoded_matrix: tuple[int, int, int] = (0, 0, 0)
    recon_matrix: tuple[int, int, int] = (0, 0, 0)
    trajectory: str = ""
    notes: list[str] = field(default_factory=list)

    def count(self, flags: np.ndarray) -> None:
        """Add written acquisitions with these ISMRMRD ``flags`` to the counts."""
        flags = np.asarray(flags, np.uint64)
        self.acquisitions += flags.size
        for attr, mask in (("noise", _NOISE), ("calibration", _CALIBRATION), ("reverse", _REVERSE),
                           ("auxiliary", _AUXILIARY)):
            setattr(self, attr, getattr(self, attr) + int(((flags & np.uint64(mask)) != 0).sum()))

    def summary(self) -> str:
        parts = [f"{self.format} file, {len(self.raids)} measurement(s): " + "; ".join(
            f"#{r.index} '{r.protocol}' {r.mdbs} MDHs ({r.role})" for r in self.raids)]
        parts.append(f"{self.acquisitions} acquisitions written ({self.noise} noise, {self.calibration} reference, "
                     f"{self.reverse} reversed, {self.auxiliary} auxiliary), {self.channels} channels, encoded "
                     f"matrix {'x'.join(map(str, self.encoded_matrix))}, {self.trajectory}")
        if self.skipped_syncdata:
            parts.append(f"{self.skipped_syncdata} SYNCDATA blocks skipped")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# file identification and parsing


def sniff_twix(path: str | os.PathLike) -> str:
    """``"VB"`` or ``"VD"`` when ``path`` has the layout of a twix file, else :class:`TwixError`
    saying what was expected. Checks the multi-raid header (VD) or the measurement header (VB) and
    the first protocol buffer's name, without parsing the data."""
    path = Path(path)
    expected = "expected a Siemens twix raw-data file (meas.dat: VB, or VD/VE/XA multi-raid)"
    if not path.is_file():
        raise TwixError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head.startswith(_HDF5_SIGNATURE):
            raise TwixError(f"{path}: is an HDF5 file, not twix; {expected}")
        if len(head) < 16:
            raise TwixError(f"{path}: {size} bytes, too short for a twix file; {expected}")
        first, second = struct.unpack("<II", head[:8])
        if first < 10000 and 1 <= second <= _MAX_RAIDS:  # VD: MrParcRaidFileHeader (hdSize_, count_)
            fmt, offsets = "VD", []
            for k in range(second):
                fh.seek(8 + 152 * k + 8)
                off, length = struct.unpack("<QQ", fh.read(16))
                if not 0 < off < size:
                    raise TwixError(f"{path}: multi-raid header entry {k} points to offset {off} outside the "
                                    f"file ({size} bytes); {expected}")
                offsets.append(off)
        else:
            fmt, offsets = "VB", [0]
        for off in offsets:
            fh.seek(off)
            meas_head = fh.read(8 + 48)
            if len(meas_head) < 56:
                raise TwixError(f"{path}: measurement header at offset {off} is truncated; {expected}")
            hdr_len, n_buffers = struct.unpack("<II", meas_head[:8])
            name = meas_head[8:].split(b"\x00", 1)[0]
            if not (32 <= hdr_len and 1 <= n_buffers <= 64 and len(name) >= 4 and name.isalnum()):
                raise TwixError(f"{path}: no twix measurement header at offset {off} (header length {hdr_len}, "
                                f"{n_buffers} protocol buffers); {expected}")
            if hdr_len >= size - off:
                raise TwixError(f"{path}: truncated: the measurement at offset {off} declares a {hdr_len}-byte "
                                f"protocol header, the file holds {size - off} bytes from there")
    return fmt


def _read_twix(path: Path) -> tuple[str, list[dict]]:
    """``(format, twixtools' scan list)``, twixtools' console output sent to the log."""
    import twixtools

    fmt = sniff_twix(path)
    source = path
    with contextlib.ExitStack() as stack:
        if path.suffix == "":  # read_twix appends ".dat" to a name without one
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            source = tmp / "meas.dat"
            source.symlink_to(path.resolve())
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                scans = twixtools.read_twix(str(source), verbose=False, parse_pmu=False, parse_geometry=False,
                                            keep_syncdata=True, keep_acqend=False)
        except Exception as exc:  # twixtools raises bare ValueError/KeyError/struct errors on damage
            raise TwixError(f"{path}: twixtools could not parse the file ({type(exc).__name__}: {exc})") from None
        finally:
            for line in out.getvalue().splitlines():
                if line.strip():
                    log.debug("twixtools: %s", line.strip())
    scans = [s for s in scans if isinstance(s, dict)]
    if not scans:
        raise TwixError(f"{path}: no measurement found")
    return fmt, scans


# --------------------------------------------------------------------------------------------------
# protocol values


def _value(d, *keys, default=None):
    """A nested protocol value (dicts and lists), or ``default`` where missing or empty."""
    for key in keys:
        if isinstance(d, dict) and key in d:
            d = d[key]
        elif isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d):
            d = d[key]
        else:
            return default
    return default if d is None or (isinstance(d, str) and not d.strip()) else d


def _number(d, *keys, default=None) -> Optional[float]:
    v = _value(d, *keys)
    if v is None:
        return default
    try:
        return float(int(v, 16)) if isinstance(v, str) and v.lower().startswith("0x") else float(v)
    except (TypeError, ValueError):
        return default


def _text(d, *keys, default: str = "") -> str:
    v = _value(d, *keys)
    return default if v is None else str(v).strip().strip('"')


def _numbers(d, *keys) -> list[float]:
    v = _value(d, *keys)
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    out = []
    for item in items:
        try:
            out.append(float(item))
        except (TypeError, ValueError):
            pass
    return out


def coil_elements(hdr: dict, is_vb: bool) -> list[dict]:
    """Selected receive coil elements of the protocol: ``{"channel_id", "coil", "element"}``.
    The channel id is ``lADCChannelConnected − 1`` (VD/VE/XA) or ``lRxChannelConnected − 1`` (VB)."""
    yaps = hdr.get("MeasYaps", {})
    lists = []
    for sel in _value(yaps, "sCoilSelectMeas", "aRxCoilSelectData", default=[]) or []:
        lists.append(_value(sel, "asList", default=[]))
    for sel in _value(yaps, "asCoilSelectMeas", default=[]) or []:
        lists.append(_value(sel, "asList", default=[]))
    key = "lRxChannelConnected" if is_vb else "lADCChannelConnected"
    out = []
    for entries in lists:
        for e in entries or []:
            if not isinstance(e, dict) or _number(e, "lElementSelected", default=1) != 1:
                continue
            ch = _number(e, key)
            if ch is None and not is_vb:
                ch = _number(e, "lRxChannelConnected")
            if ch is None:
                continue
            out.append({"channel_id": int(ch) - 1, "coil": _text(e, "sCoilElementID", "tCoilID"),
                        "element": _text(e, "sCoilElementID", "tElement")})
        if out:
            break  # the first coil selection (the receive nucleus) only
    return out


# --------------------------------------------------------------------------------------------------
# MDH arrays


@dataclass
class _Lines:
    """The readouts of one measurement, one row per MDH (SYNCDATA excluded)."""

    mdbs: list
    eval_mask: np.ndarray       # uint64
    counters: dict[str, np.ndarray]
    samples: np.ndarray
    channels: np.ndarray
    center_col: np.ndarray
    center_lin: np.ndarray
    center_par: np.ndarray
    syncdata: int


_COUNTERS = ("Lin", "Ave", "Sli", "Par", "Eco", "Phs", "Rep", "Set", "Seg", "Ida", "Idb", "Idc", "Idd", "Ide")


def _lines(scan: dict) -> _Lines:
    from twixtools import mdh_def

    sync_bit = 1 << mdh_def.mask_dict["SYNCDATA"]
    acqend_bit = 1 << mdh_def.mask_dict["ACQEND"]
    mdbs, syncdata = [], 0
    for mdb in scan.get("mdb", []):
        mask = int(mdb.mdh.EvalInfoMask)
        if mask & sync_bit:
            syncdata += 1
        elif not mask & acqend_bit:
            mdbs.append(mdb)
    hdrs = [m.mdh for m in mdbs]
    return _Lines(
        mdbs=mdbs,
        eval_mask=np.array([int(h.EvalInfoMask) for h in hdrs], np.uint64),
        counters={c: np.array([getattr(h.Counter, c) for h in hdrs], np.int64) for c in _COUNTERS},
        samples=np.array([h.SamplesInScan for h in hdrs], np.int64),
        channels=np.array([h.UsedChannels for h in hdrs], np.int64),
        center_col=np.array([h.CenterCol for h in hdrs], np.int64),
        center_lin=np.array([h.CenterLin for h in hdrs], np.int64),
        center_par=np.array([h.CenterPar for h in hdrs], np.int64),
        syncdata=syncdata,
    )


def _has(mask: np.ndarray, name: str) -> np.ndarray:
    from twixtools import mdh_def

    return (mask & np.uint64(1 << mdh_def.mask_dict[name])) != 0


def ismrmrd_flags(eval_mask) -> np.ndarray:
    """ISMRMRD flags (uint64) of MDH EvalInfoMasks, by :data:`MDH_TO_ISMRMRD`."""
    mask = np.atleast_1d(np.asarray(eval_mask, np.uint64))
    flags = np.zeros(mask.shape, np.uint64)
    for name, bits in MDH_TO_ISMRMRD:
        on = _has(mask, name)
        for bit in bits:
            flags[on] |= np.uint64(1 << (bit - 1))
    ref_only = _has(mask, "PATREFSCAN") & ~_has(mask, "PATREFANDIMASCAN")
    flags[ref_only] |= np.uint64(1 << (IS_CALIBRATION - 1))
    return flags


def _flag_counts(lines: _Lines) -> dict[str, int]:
    from twixtools import mdh_def

    counts = {}
    for bit, name in enumerate(mdh_def.mask_id):
        n = int(_has(lines.eval_mask, name).sum()) if lines.eval_mask.size else 0
        if n:
            counts[name] = n
    if lines.syncdata:
        counts["SYNCDATA"] = lines.syncdata
    return counts


def quaternion_to_directions(quat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(read_dir, phase_dir, slice_dir)`` of a Siemens MDH quaternion stored (w, x, y, z): the
    columns of its rotation matrix are (phase, read, slice) in that order (see the module docstring)."""
    w, x, y, z = (float(v) for v in quat)
    rot = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])
    return rot[:, 1], rot[:, 0], rot[:, 2]


class _Reader:
    """Samples and channel ids of MDHs, read with one open file handle."""

    def __init__(self, path: Path, is_vb: bool):
        from twixtools import mdh_def

        self.path = path
        self.fh = open(path, "rb")
        if is_vb:  # every channel: a full 128-byte MDH, then its samples
            self.first, self.chan_hdr = 0, ctypes.sizeof(mdh_def.VB17_header)
            self.id_offset = mdh_def.VB17_header.ChannelId.offset
        else:  # one scan header, then per channel a channel header and its samples
            self.first, self.chan_hdr = ctypes.sizeof(mdh_def.Scan_header), ctypes.sizeof(mdh_def.Channel_header)
            self.id_offset = mdh_def.Channel_header.ChannelId.offset

    def read(self, mdb, index: int) -> tuple[np.ndarray, np.ndarray]:
        """complex64 ``(channels, samples)`` and the channels' ids."""
        ns, nc = int(mdb.mdh.SamplesInScan), int(mdb.mdh.UsedChannels)
        block = self.chan_hdr + 8 * ns
        self.fh.seek(int(mdb.mem_pos) + self.first)
        raw = self.fh.read(nc * block)
        if len(raw) < nc * block:
            raise TwixError(f"{self.path}: readout {index} (scan counter {mdb.mdh.ScanCounter}) is truncated: "
                            f"{len(raw)} of {nc * block} bytes")
        dt = np.dtype({"names": ["id", "data"], "formats": ["<u2", ("<c8", (ns,))],
                       "offsets": [self.id_offset, self.chan_hdr], "itemsize": block})
        rec = np.frombuffer(raw, dtype=dt, count=nc)
        return np.array(rec["data"], np.complex64).reshape(nc, ns), rec["id"].astype(np.int64)

    def close(self) -> None:
        self.fh.close()


# --------------------------------------------------------------------------------------------------
# encoding


@dataclass
class _Axis:
    matrix: int
    maximum: int
    center: int


def _fit_axis(name: str, axis: str, what: str, matrix: Optional[int], maximum: Optional[int],
              center: Optional[int], mdh_centers: np.ndarray, lo: int, hi: int, notes: dict[str, str]) -> _Axis:
    """Matrix size, maximum and centre of one phase-encoding axis: the protocol's, unless the data's
    counters (``lo``..``hi``) or the MDHs' common centre contradict it (recorded in ``notes``).

    Without a usable centre from the MDHs, a matrix rebuilt from the data assumes the counters start
    at the first line: centre ``(hi + 1) // 2``. The rebuilt matrix is the smallest even size that
    holds ``lo``..``hi`` placed around the centre (line ``e`` at row ``e + matrix // 2 − centre``)."""
    centers = np.unique(mdh_centers)
    mdh_center = int(centers[0]) if centers.size == 1 and centers[0] > 0 else None
    if mdh_center is not None and mdh_center != center:
        notes[f"encodingLimits.{name}.center"] = f"protocol {center}, MDH k-space centre {what} {mdh_center}"
        center = mdh_center
    if matrix is None or center is None or not 0 <= lo + matrix // 2 - center <= hi + matrix // 2 - center < matrix:
        protocol = f"protocol matrix {matrix} with centre {center}"
        if mdh_center is None:
            center = (hi + 1) // 2
        matrix = 2 * max(center - lo, hi + 1 - center)
        notes[f"encodedSpace.matrixSize.{axis}"] = (f"{protocol} cannot hold the {what} counters {lo}..{hi}; "
                                                    f"data: matrix {matrix}, centre {center}")
    if maximum is None or hi > maximum:
        notes[f"encodingLimits.{name}.maximum"] = f"protocol {maximum}, data {what} counter up to {hi}"
        maximum = hi
    return _Axis(int(matrix), int(maximum), int(center))


def _encoding(hdr: dict, lines: _Lines, imaging: np.ndarray, notes: dict[str, str]) -> dict:
    meas, yaps, config = hdr.get("Meas", {}), hdr.get("MeasYaps", {}), hdr.get("Config", {})
    ks = _value(yaps, "sKSpace", default={})
    sl0 = _value(yaps, "sSliceArray", "asSlice", 0, default={})
    samples = int(lines.samples[imaging].max())
    cols = _number(meas, "iNoOfFourierColumns")
    base = _number(ks, "lBaseResolution")
    os_factor = _number(meas, "flReadoutOSFactor")
    if os_factor is None or os_factor <= 0:
        os_factor = cols / base if cols and base else 1.0
        notes["flReadoutOSFactor"] = (f"missing from the protocol; {os_factor:g} "
                                      "(iNoOfFourierColumns / lBaseResolution)")
    if cols is None or samples > cols:
        notes["encodedSpace.matrixSize.x"] = (f"protocol iNoOfFourierColumns {cols and int(cols)}, "
                                              f"readouts of {samples} samples")
        cols = samples
    enc_x = int(cols)
    recon_x = int(round(enc_x / os_factor))

    lin = lines.counters["Lin"][imaging]
    pe_lines = _number(ks, "lPhaseEncodingLines")
    e1_max = _number(meas, "iNoOfFourierLines")
    e1 = _fit_axis("kspace_encoding_step_1", "y", "Lin", _int(_number(meas, "iPEFTLength")),
                   None if e1_max is None else int(e1_max) - 1,
                   None if pe_lines is None else int(pe_lines) // 2,
                   lines.center_lin[imaging], int(lin.min()), int(lin.max()), notes)
    y_overridden = "encodedSpace.matrixSize.y" in notes
    phase_os = _number(ks, "dPhaseOversamplingForDialog", default=0.0)
    image_lines = _number(config, "NImageLins")
    if y_overridden or image_lines is None:
        recon_y = int(round(e1.matrix / (1 + phase_os)))
    else:
        recon_y = int(image_lines)

    par = lines.counters["Par"][imaging]
    partitions = _number(ks, "lPartitions", default=1)
    is_3d = partitions > 1 or par.max() > 0
    if is_3d:
        e2_max = _number(meas, "iNoOfFourierPartitions")
        e2 = _fit_axis("kspace_encoding_step_2", "z", "Par", _int(_number(meas, "i3DFTLength")),
                       None if e2_max is None else int(e2_max) - 1, int(partitions) // 2,
                       lines.center_par[imaging], int(par.min()), int(par.max()), notes)
        slice_os = _number(ks, "dSliceOversamplingForDialog", default=0.0)
        recon_z = _int(_number(ks, "lImagesPerSlab")) or e2.matrix
    else:
        e2, slice_os, recon_z = _Axis(1, 0, 0), 0.0, 1

    fov_read = _number(sl0, "dReadoutFOV")
    fov_phase = _number(sl0, "dPhaseFOV")
    thickness = _number(sl0, "dThickness")
    if fov_read is None or fov_phase is None or thickness is None:
        raise TwixError("protocol lacks the slice FOV (sSliceArray.asSlice[0] dReadoutFOV / dPhaseFOV / dThickness)")
    return dict(
        trajectory=TRAJECTORIES.get(int(_number(ks, "ucTrajectory", default=1)), "other"),
        encoded_matrix=(enc_x, e1.matrix, e2.matrix), recon_matrix=(recon_x, recon_y, recon_z),
        encoded_fov=(fov_read * os_factor, fov_phase * (1 + phase_os), thickness * (1 + slice_os)),
        recon_fov=(fov_read, fov_phase, thickness), e1=e1, e2=e2, os_factor=os_factor)


def _int(v: Optional[float]) -> Optional[int]:
    return None if v is None else int(v)


# --------------------------------------------------------------------------------------------------
# header XML


def _sub(parent: ET.Element, tag: str, text=None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = f"{text:g}" if isinstance(text, float) else str(text)
    return el


def _xyz(parent: ET.Element, tag: str, values) -> None:
    el = _sub(parent, tag)
    for axis, v in zip("xyz", values):
        _sub(el, axis, float(v) if tag == "fieldOfView_mm" else int(v))


def _limit(parent: ET.Element, tag: str, maximum: int, center: int = 0, minimum: int = 0) -> None:
    el = _sub(parent, tag)
    _sub(el, "minimum", int(minimum))
    _sub(el, "maximum", int(maximum))
    _sub(el, "center", int(center))


def build_header(hdr: dict, enc: dict, lines: _Lines, imaging: np.ndarray, channel_ids: np.ndarray,
                 fmt: str, notes: dict[str, str], coil_notes: list[str]) -> str:
    """The ISMRMRD XML header of the scan (see the module docstring)."""
    meas, yaps, dicom, config = (hdr.get(k, {}) for k in ("Meas", "MeasYaps", "Dicom", "Config"))
    root = ET.Element("ismrmrdHeader", {"xmlns": ISMRMRD_NS})

    mi = _sub(root, "measurementInformation")
    serial = _text(dicom, "DeviceSerialNumber") or _text(meas, "DeviceSerialNumber")
    meas_uid = _number(config, "MeasUID") or _number(meas, "MeasUID")
    if meas_uid is None and lines.mdbs:
        meas_uid = float(lines.mdbs[0].mdh.MeasUID)
    _sub(mi, "measurementID", f"{serial.split('.')[0] if serial else 'unknown'}_{int(meas_uid or 0)}")
    position = _text(dicom, "tPatientPosition") or _text(meas, "tPatientPosition") or _text(config, "PatientPosition")
    if position not in PATIENT_POSITIONS:
        raise TwixError(f"protocol patient position {position!r} is not one of {sorted(PATIENT_POSITIONS)}")
    _sub(mi, "patientPosition", position)
    protocol = _text(yaps, "tProtocolName") or _text(meas, "tProtocolName")
    if protocol:
        _sub(mi, "protocolName", protocol)

    asi = _sub(root, "acquisitionSystemInformation")
    vendor = _text(dicom, "Manufacturer") or _text(meas, "Manufacturer")
    if vendor:
        _sub(asi, "systemVendor", vendor)
    model = _text(dicom, "ManufacturersModelName") or _text(meas, "ManufacturersModelName")
    if model:
        _sub(asi, "systemModel", model)
    field_t = _number(meas, "flMagneticFieldStrength") or _number(dicom, "flMagneticFieldStrength")
    if field_t is None:
        field_t = _number(yaps, "sProtConsistencyInfo", "flNominalB0")
        if field_t is not None:
            notes["systemFieldStrength_T"] = "no flMagneticFieldStrength; sProtConsistencyInfo.flNominalB0"
    if field_t is not None:
        _sub(asi, "systemFieldStrength_T", float(field_t))
    _sub(asi, "relativeReceiverNoiseBandwidth", RELATIVE_RECEIVER_NOISE_BANDWIDTH)
    _sub(asi, "receiverChannels", len(channel_ids))
    elements = {e["channel_id"]: e for e in coil_elements(hdr, fmt == "VB")}
    for number, cid in enumerate(channel_ids):
        label = _sub(asi, "coilLabel")
        _sub(label, "coilNumber", number)
        e = elements.get(int(cid))
        if e is None:
            coil_notes.append(f"channel {number} (ChannelId {int(cid)}): no selected coil element in the protocol")
            _sub(label, "coilName", f"ChannelId_{int(cid)}")
        else:
            _sub(label, "coilName", f"{e['coil']}:{e['element']}")
    institution = _text(dicom, "InstitutionName") or _text(meas, "InstitutionName")
    if institution:
        _sub(asi, "institutionName", institution)

    ec = _sub(root, "experimentalConditions")
    freq = (_number(dicom, "lFrequency") or _number(meas, "lFrequency")
            or _number(yaps, "sTXSPEC", "asNucleusInfo", 0, "lFrequency"))
    if freq is None:
        raise TwixError("protocol lacks the resonance frequency (lFrequency)")
    _sub(ec, "H1resonanceFrequency_Hz", int(freq))

    e = _sub(root, "encoding")
    es = _sub(e, "encodedSpace")
    _xyz(es, "matrixSize", enc["encoded_matrix"])
    _xyz(es, "fieldOfView_mm", enc["encoded_fov"])
    rs = _sub(e, "reconSpace")
    _xyz(rs, "matrixSize", enc["recon_matrix"])
    _xyz(rs, "fieldOfView_mm", enc["recon_fov"])
    lim = _sub(e, "encodingLimits")
    e1, e2 = enc["e1"], enc["e2"]
    _limit(lim, "kspace_encoding_step_1", e1.maximum, e1.center)
    _limit(lim, "kspace_encoding_step_2", e2.maximum, e2.center)
    counts = {  # ISMRMRD limit → (protocol maximum, MDH counter)
        "average": (_number(yaps, "lAverages", default=1) - 1, "Ave"),
        "slice": (_number(yaps, "sSliceArray", "lSize", default=1) - 1, "Sli"),
        "contrast": (_number(yaps, "lContrasts", default=1) - 1, "Eco"),
        "phase": (_number(yaps, "sPhysioImaging", "lPhases", default=1) - 1, "Phs"),
        "repetition": (_number(yaps, "lRepetitions", default=0), "Rep"),
        "set": (_number(meas, "iNSet", default=1) - 1, "Set"),
        "segment": (0.0, "Seg"),
    }
    for tag, (prot_max, counter) in counts.items():
        data_max = int(lines.counters[counter][imaging].max())
        maximum = int(prot_max)
        if data_max > maximum:
            if tag != "segment":
                notes[f"encodingLimits.{tag}.maximum"] = f"protocol {maximum}, data {counter} counter up to {data_max}"
            maximum = data_max
        _limit(lim, tag, maximum)
    _sub(e, "trajectory", enc["trajectory"])
    pat = _value(yaps, "sPat", default={})
    pi = _sub(e, "parallelImaging")
    af = _sub(pi, "accelerationFactor")
    _sub(af, "kspace_encoding_step_1", int(_number(pat, "lAccelFactPE", default=1)))
    _sub(af, "kspace_encoding_step_2", int(_number(pat, "lAccelFact3D", default=1)))
    _sub(pi, "calibrationMode", CALIBRATION_MODES.get(int(_number(pat, "ucRefScanMode", default=1)), "other"))

    sp = _sub(root, "sequenceParameters")
    trs = _numbers(yaps, "alTR")
    for i, tr in enumerate(trs):
        if i == 0 or tr > 0:
            _sub(sp, "TR", tr / 1000.0)
    contrasts = int(_number(yaps, "lContrasts", default=1))
    for te in [t for t in _numbers(yaps, "alTE")[:contrasts] if t > 0]:
        _sub(sp, "TE", te / 1000.0)
    for ti in [t for t in _numbers(yaps, "alTI") if t > 0]:
        _sub(sp, "TI", ti / 1000.0)
    for fa in [a for a in _numbers(yaps, "adFlipAngleDegree") if a > 0]:
        _sub(sp, "flipAngle_deg", float(fa))

    up = _sub(root, "userParameters")
    strings = [("twix_format", fmt), ("twix_software", _text(dicom, "SoftwareVersions") or "unknown")]
    strings += [(f"twix_override_{k}", v) for k, v in notes.items()]
    for name, value in strings:
        p = _sub(up, "userParameterString")
        _sub(p, "name", name)
        _sub(p, "value", value)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


# --------------------------------------------------------------------------------------------------
# conversion


def convert_twix_to_ismrmrd(in_path, out_path, group: str = "dataset",
                            progress: Optional[Callable[[int], None]] = None, chunk: int = 512) -> TwixReport:
    """Convert one twix file (its last measurement, with the noise of earlier ones) to an ISMRMRD raw
    file, written atomically. Returns what was found and written; protocol values the data
    contradicted are in ``report.notes`` (and logged as warnings)."""
    in_path, out_path = Path(in_path), Path(out_path)
    fmt, scans = _read_twix(in_path)
    hdr = scans[-1].get("hdr") or {}
    if not hdr.get("MeasYaps"):
        raise TwixError(f"{in_path}: the scan's protocol (MeasYaps) is missing or unreadable")
    lines = [_lines(s) for s in scans]
    scan = lines[-1]
    if not scan.mdbs:
        raise TwixError(f"{in_path}: the scan (measurement {len(scans) - 1}) holds no readouts")
    imaging = (ismrmrd_flags(scan.eval_mask) & np.uint64(_NOISE | _AUXILIARY)) == 0
    if not imaging.any():
        raise TwixError(f"{in_path}: the scan holds no imaging readouts (only noise or auxiliary ones)")

    reader = _Reader(in_path, fmt == "VB")
    try:
        first = int(np.flatnonzero(imaging)[0])
        channel_ids = reader.read(scan.mdbs[first], first)[1]
        notes: dict[str, str] = {}
        enc = _encoding(hdr, scan, imaging, notes)
        coil_notes: list[str] = []
        xml = build_header(hdr, enc, scan, imaging, channel_ids, fmt, notes, coil_notes)
        report = TwixReport(in_path, fmt, _text(hdr.get("Dicom", {}), "SoftwareVersions") or "unknown", [],
                            channels=len(channel_ids), encoded_matrix=enc["encoded_matrix"],
                            recon_matrix=enc["recon_matrix"], trajectory=enc["trajectory"])
        report.notes = [f"{k}: {v}" for k, v in notes.items()] + coil_notes
        for note in report.notes:
            log.warning("%s: %s", in_path, note)
        plan = _plan(in_path, scans, lines, reader, channel_ids, report)
        report.skipped_syncdata = sum(ln.syncdata for ln in lines)
        dwell_us = [_number(s.get("hdr", {}).get("MeasYaps", {}), "sRXSPEC", "alDwellTime", 0, default=0.0) / 1000.0
                    for s in scans]
        available = int(_number(hdr.get("Meas", {}), "iMaxNoOfRxChannels", default=len(channel_ids)))
        with MrdRawWriter(out_path, group) as writer:
            writer.write_header(xml)
            for k, indices in plan:
                ln = lines[k]
                flags = ismrmrd_flags(ln.eval_mask)
                for start in range(0, len(indices), chunk):
                    part = indices[start:start + chunk]
                    heads = empty_heads(len(part))
                    data = []
                    for row, i in enumerate(part.tolist()):
                        samples, ids = reader.read(ln.mdbs[i], i)
                        data.append(_in_channel_order(in_path, k, i, samples, ids, channel_ids))
                        _fill_head(heads[row], ln.mdbs[i], int(flags[i]), available, dwell_us[k])
                    writer.append(heads, data)
                    report.count(heads["flags"])
                    if progress:
                        progress(len(part))
    finally:
        reader.close()
    return report


def _plan(path: Path, scans: list[dict], lines: list[_Lines], reader: _Reader, channel_ids: np.ndarray,
          report: TwixReport) -> list[tuple[int, np.ndarray]]:
    """``(measurement, MDH indices)`` to write: the noise readouts of earlier measurements that carry
    the scan's channels, then every readout of the scan. Fills ``report.raids``."""
    plan = []
    last = len(scans) - 1
    for k, (s, ln) in enumerate(zip(scans, lines)):
        protocol = _text(s.get("hdr", {}).get("MeasYaps", {}), "tProtocolName") or "?"
        summary = RaidSummary(k, protocol, len(ln.mdbs) + ln.syncdata, _flag_counts(ln),
                              tuple(sorted(set(ln.samples.tolist()))), tuple(sorted(set(ln.channels.tolist()))),
                              "scan" if k == last else "skipped")
        report.raids.append(summary)
        if k == last:
            plan.append((k, np.arange(len(ln.mdbs))))
            continue
        noise = np.flatnonzero((ismrmrd_flags(ln.eval_mask) & np.uint64(_NOISE)) != 0)
        if noise.size == 0:
            report.notes.append(f"measurement {k} ('{protocol}'): no noise readouts; its {len(ln.mdbs)} readouts "
                                "are not written")
            continue
        ids = reader.read(ln.mdbs[int(noise[0])], int(noise[0]))[1]
        if sorted(ids.tolist()) != sorted(channel_ids.tolist()):
            report.notes.append(f"measurement {k} ('{protocol}'): its noise readouts carry channels {ids.tolist()}, "
                                f"the scan {channel_ids.tolist()}; not written")
            log.warning("%s: %s", path, report.notes[-1])
            continue
        summary.role = "noise"
        plan.append((k, noise))
    return plan


def _in_channel_order(path: Path, k: int, i: int, samples: np.ndarray, ids: np.ndarray,
                      channel_ids: np.ndarray) -> np.ndarray:
    """``samples`` with its channels in the scan's order (``channel_ids``)."""
    if np.array_equal(ids, channel_ids):
        return samples
    if sorted(ids.tolist()) != sorted(channel_ids.tolist()):
        raise TwixError(f"{path}: measurement {k} readout {i} carries channels {ids.tolist()}, the scan's first "
                        f"imaging readout {channel_ids.tolist()}")
    row = {int(c): j for j, c in enumerate(ids)}
    return samples[[row[int(c)] for c in channel_ids]]


def _fill_head(head: np.void, mdb, flags: int, max_channels: int, dwell_us: float) -> None:
    h = mdb.mdh
    c = h.Counter
    head["flags"] = flags
    head["measurement_uid"] = int(h.MeasUID) & 0xFFFFFFFF
    head["scan_counter"] = int(h.ScanCounter)
    head["acquisition_time_stamp"] = int(h.TimeStamp)
    head["physiology_time_stamp"][0] = int(h.PMUTimeStamp)
    head["available_channels"] = max_channels
    head["discard_pre"] = int(h.CutOff.Pre)
    head["discard_post"] = int(h.CutOff.Post)
    head["center_sample"] = int(h.CenterCol)
    head["sample_time_us"] = dwell_us
    pos = h.SliceData.SlicePos
    head["position"] = (pos.Sag, pos.Cor, pos.Tra)
    read, phase, slice_ = quaternion_to_directions(h.SliceData.Quaternion)
    head["read_dir"], head["phase_dir"], head["slice_dir"] = read, phase, slice_
    if mdb.version_is_ve:
        head["patient_table_position"] = (h.PTABPosX, h.PTABPosY, h.PTABPosZ)
    else:
        head["patient_table_position"] = (0.0, 0.0, float(h.PTABPosNeg))
    idx = head["idx"]
    idx["kspace_encode_step_1"], idx["kspace_encode_step_2"] = c.Lin, c.Par
    idx["average"], idx["slice"], idx["contrast"], idx["phase"] = c.Ave, c.Sli, c.Eco, c.Phs
    idx["repetition"], idx["set"], idx["segment"] = c.Rep, c.Set, c.Seg
    idx["user"][:7] = (c.Ida, c.Idb, c.Idc, c.Idd, c.Ide, h.CenterLin, h.CenterPar)
    para = np.asarray(h.IceProgramPara, np.int64)
    n_int = min(7, para.size)
    head["user_int"][:n_int] = para[:n_int]
    head["user_int"][7] = int(h.TimeSinceLastRF) & 0x7FFFFFFF
    if para.size > 8:
        floats = para[8:16]
        head["user_float"][:floats.size] = floats
