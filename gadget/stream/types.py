"""The unit that flows through the streaming pipeline: one acquisition line.

``AcqLine`` is lighter than ``ismrmrd.Acquisition``: the 340-byte MRD acquisition header as a
numpy structured scalar (``HEADER_DTYPE``, the layout ISMRMRD defines) and the samples as
complex64 ``(channels, samples)``. Convert from/to ``ismrmrd.Acquisition`` at the doors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.mrd_file import HEADER_DTYPE

assert HEADER_DTYPE.itemsize == 340, "ISMRMRD acquisition header must be 340 packed bytes"

# ISMRMRD acquisition flag bits (1-based, ismrmrd/constants.h)
FLAG_LAST_IN_SLICE = 8
FLAG_LAST_IN_REPETITION = 14
FLAG_IS_NOISE = 19
FLAG_IS_CALIBRATION = 20
FLAG_IS_CALIBRATION_AND_IMAGING = 21
FLAG_IS_REVERSE = 22
FLAG_LAST_IN_MEASUREMENT = 25
AUXILIARY_FLAGS = (23, 24, 26, 27, 28, 29, 30, 31)  # navigator, phasecorr, feedback, dummy, ...
COMPRESSION_FLAGS = (53, 54, 55, 56)


@dataclass
class AcqLine:
    """One acquisition: ``head`` (np.void of HEADER_DTYPE), ``data`` complex64 ``(channels, samples)``,
    ``traj`` float32 ``(samples, traj_dims)`` or empty."""

    head: np.void
    data: np.ndarray
    traj: np.ndarray | None = None

    def has_flag(self, bit: int) -> bool:
        return bool(int(self.head["flags"]) >> (bit - 1) & 1)  # ISMRMRD flag bits are 1-based

    @property
    def idx(self) -> np.void:
        return self.head["idx"]

    @classmethod
    def from_ismrmrd(cls, acq: Any) -> "AcqLine":
        head = np.frombuffer(bytes(acq.getHead()), dtype=HEADER_DTYPE)[0].copy()
        traj = np.asarray(acq.traj, np.float32) if acq.traj.size else None
        return cls(head, np.asarray(acq.data, np.complex64), traj)

    def to_ismrmrd(self):
        import ismrmrd

        acq = ismrmrd.Acquisition.from_array(self.data, self.traj)
        hdr = ismrmrd.AcquisitionHeader.from_buffer_copy(self.head.tobytes())
        acq.setHead(hdr)
        return acq


def make_head(**fields: Any) -> np.void:
    """A zeroed header (version 1) with the given top-level fields set; ``idx`` may be a dict."""
    head = np.zeros((), dtype=HEADER_DTYPE)
    head["version"] = 1
    for name, value in fields.items():
        if name == "idx":
            for key, v in value.items():
                head["idx"][key] = v
        else:
            head[name] = value
    return head[()]
