"""Slice assembly: acquisition lines → complete multi-coil k-space slices.

Buffers are keyed by ``(slice, contrast, phase, repetition, set)``. Repeated acquisitions of a
line with different ``average`` (or the same) are averaged. A line goes to phase column
``kspace_encode_step_1 + padding_left`` (fastMRI's padding from the header's encoding
limits); its samples are placed so that ``center_sample`` lands on the middle of the
readout (asymmetric echo / readout partial Fourier); a ``center_sample`` of 0, which many files
leave unset, is read as the middle of the acquired samples. Readout oversampling is kept.

A buffer is complete at ACQ_LAST_IN_SLICE; ACQ_LAST_IN_REPETITION completes the buffers of
that repetition and ACQ_LAST_IN_MEASUREMENT all of them. At the end of the stream, buffers
never marked complete are returned by :meth:`SliceAssembler.flush` (flagged ``incomplete``).

Layouts: ``SliceData.kspace`` complex64 ``(coil, readout, phase)``; ``mask`` bool ``(phase,)``.
The buffer behind it is stored ``(phase, coil, readout)`` in C order: one line's ``(coil, samples)``
block is contiguous, exactly as it arrives on the wire, and ``SliceData.kspace`` is a transposed *view*.
Writing lines into a C-ordered ``(coil, readout, phase)`` array instead touches one cache line per
sample and made assembly 9x slower (79 vs 8 ms for a 32-coil 512x256 slice, 2-core dev machine).
Because a line's samples are contiguous in the buffer, a reader can receive them straight into place
(:meth:`SliceAssembler.landing_row`), which spares one copy of every byte of the stream.

**3-D Cartesian scans** (header ``encodedSpace/matrixSize/z`` > 1). A buffer holds the whole volume of a
key, ``(e2 row, phase, coil, readout)``; line ``kspace_encode_step_2`` goes to row ``e2 + encoded_z // 2 -
e2_center`` (the e1 rule along kz, so partial Fourier along kz stays zero). At completion the volume must
be *fully sampled along kz*: every e2 of the header's ``kspace_encoding_step_2`` limits holds every phase
column any partition holds (the sampling pattern is ``(phase mask) x (all e2)``, so undersampling along
e1 stays for the network); a header acceleration factor e2 > 1 or a missing (e1, e2) pair is an
:class:`AssemblyError` ("3-D scan undersampled along kz (e2)"), never an average. The volume then gets a
centred orthonormal inverse FFT along kz (``fftshift(ifft(ifftshift(., kz), norm="ortho"))``, the
convention of :mod:`gadget.mri.fft`), is cropped to the ``reconSpace`` z partitions (centred: slice
oversampling, encoded z > recon z, drops ``encoded_z // 2 - recon_z // 2`` partitions at the start), and
every partition becomes its own :class:`SliceData` (``partition`` = its index in the recon matrix), a 2-D
slice for the unchanged network path. Its geometry reference is a copy of the line nearest the k-space
centre (in e2, then e1) with ``position`` moved along ``slice_dir`` by ``(partition - recon_z // 2) x
thickness``, thickness = reconSpace FOV z / reconSpace matrix z (image index ``n // 2`` is the slab
centre in the centred FFT; partitions are assumed to run along +``slice_dir``). No landing for 3-D.

**Separate reference** (header ``calibrationMode`` ``separate``): a line flagged
ACQ_IS_PARALLEL_CALIBRATION but not ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING is reference only. It goes
to a reference buffer of its key (placed by its e1 like imaging lines, so a reference covering another
e1 range is zero-padded into the same grid), not into the imaging k-space; a line flagged
CALIBRATION_AND_IMAGING goes to both. Reference-only lines do not complete a slice with LAST_IN_SLICE or
LAST_IN_REPETITION (the reference usually precedes its imaging lines); LAST_IN_MEASUREMENT still
completes everything. A reference is matched to imaging lines by the full key (one acquired only in the
first repetition is not reused later); reference lines of a key that never gets imaging lines are dropped
with a warning. At completion the reference is compared with the imaging lines at the positions both hold
(CALIBRATION_AND_IMAGING lines, the same acquisitions, left out). When they agree (the difference beyond
the noise, :func:`systematic_difference`, at most :data:`SAME_CONTRAST_TOLERANCE`; at very low SNR the
noise hides small differences) the reference is the same contrast and sampling: its lines fill
the positions no imaging line holds, flagged as calibration, and the slice is an embedded-mode slice (no
``calibration_kspace``; ``num_calibration`` = the centre run of calibration columns). The network was
trained with its ACS block inside the measured data; without it an equispaced imaging mask leaves the
network folded images. A 3-D reference fills only columns it holds at every e2 (kz stays fully sampled).
Otherwise (another contrast, or no shared position to compare) the reference never enters the imaging
k-space: the slice carries it as ``calibration_kspace`` with ``num_calibration`` = the run of reference
columns containing the centre column, for the sensitivities only. Other calibration modes (embedded,
interleaved, ...) keep calibration lines in the imaging k-space as before.
"""
from __future__ import annotations

import cmath
import collections
import logging
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..data.mrd_file import HEADER_DTYPE, flag_mask
from ..data.mrd_header import EncodingInfo
from ..mri.masks import contiguous_center_lines
from .images import geometry_defaults
from .budget import BudgetExceeded, MemoryBudget
from .types import (AUXILIARY_FLAGS, FLAG_IS_CALIBRATION, FLAG_IS_CALIBRATION_AND_IMAGING, FLAG_IS_NOISE,
                    FLAG_IS_REVERSE, FLAG_LAST_IN_MEASUREMENT, FLAG_LAST_IN_REPETITION, FLAG_LAST_IN_SLICE, AcqLine)

log = logging.getLogger(__name__)
KEY_FIELDS = ("slice", "contrast", "phase", "repetition", "set")
SliceKey = tuple[int, int, int, int, int]
_AUXILIARY = flag_mask(*AUXILIARY_FLAGS)
_CALIBRATION = flag_mask(FLAG_IS_CALIBRATION, FLAG_IS_CALIBRATION_AND_IMAGING)
_CALIBRATION_ONLY, _CALIBRATION_AND_IMAGING = flag_mask(FLAG_IS_CALIBRATION), flag_mask(FLAG_IS_CALIBRATION_AND_IMAGING)
_REVERSE, _LAST_IN_SLICE = flag_mask(FLAG_IS_REVERSE), flag_mask(FLAG_LAST_IN_SLICE)
_LAST_IN_REPETITION, _LAST_IN_MEASUREMENT = flag_mask(FLAG_LAST_IN_REPETITION), flag_mask(FLAG_LAST_IN_MEASUREMENT)
_NOT_LANDED = _AUXILIARY | _REVERSE | flag_mask(FLAG_IS_NOISE)
#: A separate reference whose systematic difference from the imaging lines at the positions both hold
#: (:func:`systematic_difference`) is at most this is the same contrast and sampling, and is merged into the
#: imaging k-space. A gain of 1.3 or a phase of 0.2 rad reads 0.3 or 0.2.
SAME_CONTRAST_TOLERANCE = 0.15


def _fields_struct() -> struct.Struct:
    """Little-endian unpacker of flags, center_sample, kspace_encode_step_1 and the KEY_FIELDS (in that
    order, which is their order in HEADER_DTYPE); the bytes between them are skipped."""
    idx_type, idx_offset = HEADER_DTYPE.fields["idx"][:2]
    wanted = [(HEADER_DTYPE.fields["flags"][1], "Q"), (HEADER_DTYPE.fields["center_sample"][1], "H"),
              (idx_offset + idx_type.fields["kspace_encode_step_1"][1], "H")]
    wanted += [(idx_offset + idx_type.fields[f][1], "H") for f in KEY_FIELDS]
    fmt, pos = "<", 0
    for offset, code in wanted:
        assert offset >= pos, "fields must be listed in header order"
        fmt += f"{offset - pos}x{code}"
        pos = offset + struct.calcsize(code)
    return struct.Struct(f"{fmt}{HEADER_DTYPE.itemsize - pos}x")


_FIELDS = _fields_struct()


class AssemblyError(ValueError):
    """An acquisition does not fit the scan; the message names the acquisition and the slice."""


@dataclass
class SliceData:
    """A slice ready for reconstruction.

    ``calibration_kspace``: with a separate reference (header calibrationMode ``separate``) of another
    contrast, complex64 ``(coil, readout, phase)`` like ``kspace``, holding only the reference lines in their
    columns (zeros elsewhere); then ``num_calibration`` is the reference's line count (the run of reference
    columns containing the centre column) and ``kspace``/``mask`` hold imaging lines only. None otherwise,
    also for a reference that matches the imaging lines (merged into ``kspace``; module docstring).
    ``partition``: for a 3-D scan, the partition's index in the recon z matrix (None for 2-D); ``lines``
    then counts the lines of the whole volume."""

    key: SliceKey
    kspace: np.ndarray            # complex64 (coil, readout, phase), a view with readout contiguous
    mask: np.ndarray              # bool (phase,): lines that arrived
    num_calibration: Optional[int]  # ACS lines from the calibration flags (None: none flagged)
    reference: np.void            # header of the line nearest the k-space centre
    lines: int
    incomplete: bool = False
    calibration_kspace: Optional[np.ndarray] = None  # complex64 (coil, readout, phase): separate reference lines
    partition: Optional[int] = None                  # 3-D: partition index in the recon matrix

    @property
    def position(self) -> tuple:
        """Where the slice lies: its slice, contrast and set indices and the 3-D partition, not its repetition
        or cardiac phase, which acquire the same position again (coil maps are calibrated once per position:
        gadget.recon.refine.PositionCalibrations)."""
        slice_, contrast, _phase, _repetition, set_ = self.key
        return slice_, contrast, set_, self.partition

    def key_dict(self) -> dict[str, int]:
        out = dict(zip(KEY_FIELDS, self.key))
        if self.partition is not None:
            out["partition"] = self.partition
        return out


@dataclass
class _Buffer:
    kspace: np.ndarray            # complex64 (phase, coil, readout), C order; 3-D: (e2 row, phase, coil, readout)
    counts: np.ndarray            # int32 (phase,); 3-D: (e2 row, phase)
    calibration: np.ndarray       # bool, the shape of counts
    channels: int
    samples: int
    reference: Optional[np.void] = None
    ref_distance: int = 1 << 30
    lines: int = 0
    first_counter: int = 0
    landed: dict[int, np.ndarray] = field(default_factory=dict)  # phase column → row handed to a reader
    dirty: bool = False           # recycled memory: rows no line wrote still hold an old slice's samples


@dataclass
class SliceAssembler:
    encoding: EncodingInfo
    buffers: dict[SliceKey, _Buffer] = field(default_factory=dict)
    seen: int = 0
    max_spare: int = 2
    _last_landing: tuple = (None, None, None, None)  # (head, its fields, buffer, column) of the last landing_row
    _spare: collections.deque = field(default_factory=collections.deque)
    references: dict[SliceKey, _Buffer] = field(default_factory=dict)  # separate reference lines per key
    _checked_3d: bool = False
    budget: Optional[MemoryBudget] = None  # the process's budget for k-space buffers (gadget/stream/budget.py)
    owner: str = "scan"                    # names the scan in budget and log messages
    _reference_logged: bool = False        # the first separate reference's merge decision is logged at INFO

    def __post_init__(self) -> None:
        self._is_3d = self.encoding.is_3d
        self._separate = self.encoding.separate_reference

    @property
    def shape(self) -> tuple[int, int]:
        return self.encoding.encoded_matrix[0], self.encoding.encoded_matrix[1]

    def add(self, line: AcqLine) -> list[SliceData]:
        """Place one imaging line; returns the slices it completed (often none)."""
        self.seen += 1
        landed_head, fields, landed_buf, col = self._last_landing
        if landed_head is not line.head:
            fields, landed_buf = _line_fields(line.head), None
        flags, e1, center, key = fields
        if (landed_buf is not None and landed_buf.landed.get(col) is line.data
                and self.buffers.get(key) is landed_buf):
            # received into the row landing_row() handed out, which checked the line's place already
            _check_finite(line, key)
            del landed_buf.landed[col]
            self._count(landed_buf, line.head, flags, e1, col)
            if self._separate and flags & _CALIBRATION_AND_IMAGING:
                self._place(self._buffer(self.references, line, key), line, flags, e1, center, key)
            return self._completed_by(flags, key)
        if flags & _AUXILIARY:
            return []
        channels, samples = line.data.shape
        if channels == 0 or samples == 0:
            raise AssemblyError(f"{_what(line, key)}: empty data ({channels} channels x {samples} samples)")
        _check_finite(line, key)
        e2 = None
        if self._is_3d:
            if not self._checked_3d:
                _check_3d_header(self.encoding)
                self._checked_3d = True
            e2 = int(line.head["idx"]["kspace_encode_step_2"])
        if self._separate and flags & _CALIBRATION_ONLY and not flags & _CALIBRATION_AND_IMAGING:
            # reference only: never in the imaging k-space; only LAST_IN_MEASUREMENT completes anything
            self._place(self._buffer(self.references, line, key), line, flags, e1, center, key, e2)
            return self._completed_by(flags & _LAST_IN_MEASUREMENT, key)
        self._place(self._buffer(self.buffers, line, key), line, flags, e1, center, key, e2)
        if self._separate and flags & _CALIBRATION_AND_IMAGING:
            self._place(self._buffer(self.references, line, key), line, flags, e1, center, key, e2)
        return self._completed_by(flags, key)

    def _buffer(self, buffers: dict[SliceKey, _Buffer], line: AcqLine, key: SliceKey) -> _Buffer:
        """The buffer of ``key`` in ``buffers`` (imaging or reference), created at the key's first line."""
        channels, samples = line.data.shape
        buf = buffers.get(key)
        if buf is None:
            buf = buffers[key] = self._new_buffer(channels, samples)
        elif (channels, samples) != (buf.channels, buf.samples):
            kind = "reference data" if buffers is self.references else "slice"
            raise AssemblyError(f"{_what(line, key)}: {channels} channels x {samples} samples, but this {kind} "
                                f"started with {buf.channels} x {buf.samples}")
        return buf

    def _completed_by(self, flags: int, key: SliceKey) -> list[SliceData]:
        if flags & _LAST_IN_MEASUREMENT:
            return self._complete(list(self.buffers | self.references))
        if flags & _LAST_IN_REPETITION:
            return self._complete([k for k in self.buffers | self.references if k[3] == key[3]])
        if flags & _LAST_IN_SLICE:
            return self._complete([key])
        return []

    def landing_row(self, head: np.void, channels: int, samples: int) -> np.ndarray | None:
        """For :attr:`MessageReader.landing`: the buffer row ``(channels, samples)`` where this line's
        samples will end up, when they can be received there directly: an imaging line (not noise,
        auxiliary or reversed), the first at its phase position, spanning the whole readout, with the
        slice's channel count. Otherwise None, and :meth:`add` copies as usual. Validation stays in
        :meth:`add`; a row is handed out once, so a line read ahead can never overwrite another."""
        flags, e1, center, key = fields = _line_fields(head)
        self._last_landing = (head, fields, None, None)  # add() of this line reuses the unpacked fields
        enc = self.encoding
        if flags & _NOT_LANDED or channels == 0 or not enc.e1_min <= e1 <= enc.e1_max or self._is_3d:
            return None
        if self._separate and flags & _CALIBRATION_ONLY and not flags & _CALIBRATION_AND_IMAGING:
            return None  # reference only: goes to the reference buffer, not an imaging row
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = self._new_buffer(channels, samples)
        col = e1 + enc.padding[0]
        if ((channels, samples) != (buf.channels, buf.samples) or samples != buf.kspace.shape[2]
                or (center or samples // 2) != samples // 2 or not 0 <= col < buf.kspace.shape[0]
                or buf.counts[col] or col in buf.landed):
            return None
        row = buf.landed[col] = buf.kspace[col]
        self._last_landing = (head, fields, buf, col)
        return row

    def flush(self) -> list[SliceData]:
        """End of stream: every non-empty buffer, marked incomplete."""
        out = self._complete(list(self.buffers | self.references))
        for s in out:
            s.incomplete = True
        return out

    def recycle(self, done: SliceData) -> None:
        """Give back a slice whose k-space is no longer used (its images are built): the next slice of
        that shape is assembled in the same memory. Writing into never-touched memory costs a page
        fault per 4 KiB, which was a third of assembly time for 32 coils x 512 samples. The memory is
        not cleared here: rows that no line of the next slice fills are zeroed when it completes, and a
        row a line fills only in part is zeroed before that line is written. Thread-safe."""
        storage = done.kspace.base
        if storage is not None and storage.flags.c_contiguous and len(self._spare) < self.max_spare:
            self._spare.append(storage)

    def _new_buffer(self, channels: int, samples: int) -> _Buffer:
        readout, width = self.shape
        if self._is_3d:  # the whole volume; recycled 2-D memory does not fit it
            depth = self.encoding.encoded_matrix[2]
            return _Buffer(self._storage((depth, width, channels, max(readout, samples)), reuse=False)[0],
                           np.zeros((depth, width), np.int32), np.zeros((depth, width), bool), channels, samples)
        shape = (width, channels, max(readout, samples))
        kspace, dirty = self._storage(shape, reuse=True)
        return _Buffer(kspace, np.zeros(width, np.int32), np.zeros(width, bool), channels, samples, dirty=dirty)

    def _storage(self, shape: tuple[int, ...], reuse: bool) -> tuple[np.ndarray, bool]:
        """``(complex64 buffer, dirty)``: with ``reuse``, a recycled buffer of ``shape`` (dirty: it holds an
        old slice's samples); else a zeroed one, its bytes reserved in the memory budget (when there is
        one) until it is freed. While the budget has no room, a buffer this scan recycles meanwhile is
        taken instead (its own earlier slices are often what holds the budget)."""
        wait = self.budget.wait_s if self.budget is not None else 0.0
        if self.budget is not None and np.prod(shape) * 8 > self.budget.capacity:
            try:  # can never fit: the budget's own error, at once
                self.budget.reserve(int(np.prod(shape)) * 8, f"{self.owner}: a k-space buffer {shape}")
            except BudgetExceeded as exc:
                raise AssemblyError(str(exc)) from None
        deadline = time.monotonic() + wait
        while True:
            if reuse:
                spare = self._pop_spare(shape)
                if spare is not None:
                    return spare, True
            if self.budget is None:
                return np.zeros(shape, np.complex64), False
            try:
                return self.budget.zeros(shape, np.complex64, f"{self.owner}: a k-space buffer {shape}",
                                         wait_s=min(0.05, max(deadline - time.monotonic(), 0.0))), False
            except BudgetExceeded as exc:
                if time.monotonic() >= deadline:
                    raise AssemblyError(f"{exc} (waited {wait:g} s)") from None

    def _pop_spare(self, shape: tuple[int, ...]) -> Optional[np.ndarray]:
        """A recycled buffer of ``shape``; spares of another shape are dropped (freed)."""
        while True:
            try:
                spare = self._spare.pop()
            except IndexError:
                return None
            if spare.shape == shape:
                return spare

    def _place(self, buf: _Buffer, line: AcqLine, flags: int, e1: int, center: int, key: SliceKey,
               e2: Optional[int] = None) -> None:
        """Write one line into ``buf`` at phase column ``e1 + padding_left`` (3-D: at e2 row ``e2 +
        e2_padding`` too) and count it."""
        enc = self.encoding
        if not enc.e1_min <= e1 <= enc.e1_max:
            raise AssemblyError(f"{_what(line, key)}: kspace_encode_step_1={e1} outside the encoding limits "
                                f"[{enc.e1_min}, {enc.e1_max}]")
        col = e1 + enc.padding[0]
        width, readout = buf.kspace.shape[-3], buf.kspace.shape[-1]
        if not 0 <= col < width:
            raise AssemblyError(f"{_what(line, key)}: kspace_encode_step_1={e1} maps outside the {width} "
                                "phase columns of the encoded matrix")
        data = line.data[:, ::-1] if flags & _REVERSE else line.data
        center = center or buf.samples // 2
        start = readout // 2 - center
        if start < 0 or start + buf.samples > readout:
            raise AssemblyError(f"{_what(line, key)}: center_sample {center} with {buf.samples} samples does not fit a "
                                f"readout of {readout}")
        pos: tuple[int, ...] = (col,) if e2 is None else (self._e2_row(line, key, e2), col)
        buf.landed.pop(col, None)  # handed out for this line, but its samples changed since (prewhitening)
        if buf.counts[pos]:
            buf.kspace[pos][:, start:start + buf.samples] += data
        else:  # first arrival: a plain write spares reading the fresh zero pages (one page fault, not two)
            if buf.dirty and buf.samples != readout:
                buf.kspace[pos] = 0  # the readout outside this line's samples
            buf.kspace[pos][:, start:start + buf.samples] = data
        self._count(buf, line.head, flags, e1, pos, e2)

    def _e2_row(self, line: AcqLine, key: SliceKey, e2: int) -> int:
        """Row of ``kspace_encode_step_2 = e2`` in a 3-D buffer; AssemblyError outside the limits."""
        enc = self.encoding
        if not enc.e2_min <= e2 <= enc.e2_max:
            raise AssemblyError(f"{_what(line, key)}: kspace_encode_step_2={e2} outside the encoding limits "
                                f"[{enc.e2_min}, {enc.e2_max}]")
        return e2 + enc.e2_padding

    def _count(self, buf: _Buffer, head: np.void, flags: int, e1: int, pos, e2: Optional[int] = None) -> None:
        """Bookkeeping for a line whose samples are in place at ``pos`` (phase column, or (e2 row,
        phase column) for 3-D)."""
        buf.counts[pos] += 1
        buf.lines += 1
        if flags & _CALIBRATION:
            buf.calibration[pos] = True
        distance = abs(e1 - self.encoding.e1_center)
        if e2 is not None:  # nearest the centre partition first, then the centre line
            distance += abs(e2 - self.encoding.e2_center) * (buf.counts.shape[-1] + 1)
        if distance < buf.ref_distance:
            buf.reference, buf.ref_distance = head, distance  # the line's own header; not shared

    def _complete(self, keys: list[SliceKey]) -> list[SliceData]:
        out = []
        for key in sorted(set(keys)):
            buf, ref = self.buffers.pop(key, None), self.references.pop(key, None)
            if buf is None or buf.lines == 0:
                if ref is not None:
                    log.warning("slice %s: %d separate reference lines but no imaging lines; reference dropped",
                                dict(zip(KEY_FIELDS, key)), ref.lines)
                continue
            _finish(buf)
            if ref is not None:
                _finish(ref)
                if ref.kspace.shape != buf.kspace.shape:
                    raise AssemblyError(f"slice {dict(zip(KEY_FIELDS, key))}: separate reference k-space "
                                        f"{ref.kspace.shape} does not match the imaging k-space {buf.kspace.shape} "
                                        "(coils or readout samples differ)")
                if self._merge_reference(key, buf, ref):
                    ref = None
            if self._is_3d:
                out += self._partitions(key, buf, ref)
                continue
            if ref is not None:
                cal_kspace, num_cal = ref.kspace.transpose(1, 2, 0), contiguous_center_lines(ref.counts > 0)
            else:
                cal_kspace = None
                num_cal = contiguous_center_lines(buf.calibration) if buf.calibration.any() else None
            out.append(SliceData(key, buf.kspace.transpose(1, 2, 0), buf.counts > 0, num_cal or None,
                                 buf.reference, buf.lines, calibration_kspace=cal_kspace))
        return out

    def _merge_reference(self, key: SliceKey, buf: _Buffer, ref: _Buffer) -> bool:
        """Write the finished reference ``ref`` into the finished imaging buffer ``buf`` when it is the same
        contrast and sampling (module docstring); True when merged."""
        held, refd = buf.counts > 0, ref.counts > 0
        compared = held & refd & ~buf.calibration  # imaging lines flagged calibration are the reference's own
        fill = refd & ~held
        if self._is_3d:  # whole kz columns only, so the merged volume stays fully sampled along kz
            enc = self.encoding
            rows = slice(enc.e2_min + enc.e2_padding, enc.e2_max + enc.e2_padding + 1)
            fill &= refd[rows].all(axis=0)
        where = dict(zip(KEY_FIELDS, key))
        if not compared.any():
            self._log_reference("slice %s: no imaging line at a separate reference position to compare the "
                                "reference with; kept apart for the sensitivities only", where)
            return False
        difference = systematic_difference(buf.kspace[compared], ref.kspace[compared])
        if not difference <= SAME_CONTRAST_TOLERANCE:
            self._log_reference("slice %s: the separate reference differs from the %d imaging lines at its "
                                "positions by %.3g (beyond the noise, > %g): another contrast, kept apart for the "
                                "sensitivities only", where, int(compared.sum()), difference,
                                SAME_CONTRAST_TOLERANCE)
            return False
        buf.kspace[fill] = ref.kspace[fill]
        buf.counts[fill] = 1  # both buffers are finished: repeated lines are averaged already
        buf.calibration |= refd & (held | fill)  # the reference's positions the slice now holds
        buf.lines += int(ref.counts[fill].sum())
        self._log_reference("slice %s: the separate reference matches the %d imaging lines at its positions "
                            "(difference beyond the noise %.3g <= %g): its %d other lines join the imaging k-space as "
                            "calibration lines", where, int(compared.sum()), difference, SAME_CONTRAST_TOLERANCE,
                            int(fill.sum()))
        return True

    def _log_reference(self, text: str, *args) -> None:
        """The merge decision: at INFO for the scan's first reference, at DEBUG after that."""
        level = logging.DEBUG if self._reference_logged else logging.INFO
        self._reference_logged = True
        log.log(level, "%s: " + text, self.owner, *args)

    def _partitions(self, key: SliceKey, buf: _Buffer, ref: Optional[_Buffer]) -> list[SliceData]:
        """A finished 3-D volume → one :class:`SliceData` per recon partition (module docstring)."""
        enc = self.encoding
        rows = slice(enc.e2_min + enc.e2_padding, enc.e2_max + enc.e2_padding + 1)
        columns = _check_kz_sampling(buf.counts[rows] > 0, key, enc)
        depth, count = enc.encoded_matrix[2], enc.recon_matrix[2]
        start = depth // 2 - count // 2
        images = _kz_partitions(buf.kspace, start, count)  # count arrays (phase, coil, readout)
        if ref is not None:
            ref_images = _kz_partitions(ref.kspace, start, count)
            num_cal = contiguous_center_lines(ref.counts[rows].any(axis=0))
        else:
            calibration = buf.calibration[rows].any(axis=0)
            num_cal = contiguous_center_lines(calibration) if calibration.any() else None
        slice_dir = geometry_defaults(buf.reference).slice
        out = []
        for p in range(count):
            head = np.array(buf.reference, dtype=buf.reference.dtype)[()]  # own copy: positions differ
            offset = (p - count // 2) * enc.partition_thickness_mm
            head["position"] = np.asarray(head["position"], np.float64) + offset * slice_dir
            cal = None if ref is None else ref_images[p].transpose(1, 2, 0)
            out.append(SliceData(key, images[p].transpose(1, 2, 0), columns.copy(), num_cal or None, head,
                                 buf.lines, calibration_kspace=cal, partition=p))
        return out


def systematic_difference(imaging: np.ndarray, reference: np.ndarray) -> float:
    """How much ``reference`` differs from ``imaging`` (complex ``(line, coil, readout)``, the same positions)
    beyond their independent noise, relative to the signal: ``sqrt(max(D - N, 0) / S)`` with ``D`` the energy of
    the difference, ``N`` its noise energy (the mean of the outer eighth of the acquired readout on each side,
    where k-space holds little signal, times the sample count) and ``S`` the imaging lines' energy less their
    noise (``N / 2``). 0 for the same signal; a gain ``g`` reads ``|g - 1|``; inf without signal."""
    diff = reference - imaging
    acquired = np.flatnonzero((imaging != 0).any(axis=(0, 1)) | (reference != 0).any(axis=(0, 1)))
    if acquired.size == 0:
        return math.inf
    lo, hi = int(acquired[0]), int(acquired[-1]) + 1
    band = max((hi - lo) // 8, 1)
    outer = np.concatenate([diff[..., lo:lo + band], diff[..., hi - band:hi]], axis=-1)
    noise = float(np.mean(np.abs(outer) ** 2)) * diff[..., lo:hi].size
    signal = float(np.vdot(imaging, imaging).real) - noise / 2
    if not signal > 0:
        return math.inf
    return math.sqrt(max(float(np.vdot(diff, diff).real) - noise, 0.0) / signal)


def _finish(buf: _Buffer) -> None:
    """Zero the rows of ``buf`` no counted line wrote, and average repeated lines (in place)."""
    # Rows no line was counted in: in recycled memory all of them hold an old slice's samples; in
    # fresh (zero) memory only those handed to a reader for a line add() then refused need zeros.
    if buf.dirty:
        stale = buf.counts == 0  # includes the landed rows: a counted line leaves buf.landed
        if stale.any():
            buf.kspace[stale] = 0
    else:
        for col in buf.landed:
            buf.kspace[col] = 0
    repeated = buf.counts > 1
    if repeated.any():
        buf.kspace[repeated] /= buf.counts[repeated][:, None, None]


def _check_3d_header(enc: EncodingInfo) -> None:
    """What this pipeline can reconstruct of a 3-D Cartesian scan, from its header (AssemblyError)."""
    if enc.acceleration_e2 is not None and enc.acceleration_e2 > 1:
        raise AssemblyError(f"3-D scan undersampled along kz (e2): the header's acceleration factor "
                            f"kspace_encoding_step_2 is {enc.acceleration_e2}; reconstructing a kz-undersampled 3-D "
                            "scan is not supported (the 2-D network reconstructs each partition after an inverse "
                            "FFT along kz, which needs kz fully sampled)")
    depth, count = enc.encoded_matrix[2], enc.recon_matrix[2]
    if count > depth:
        raise AssemblyError(f"3-D scan: reconSpace matrix z {count} > encodedSpace matrix z {depth} "
                            "(interpolated partitions) is not supported")
    encoded, recon = enc.encoded_fov_mm[2] / depth, enc.partition_thickness_mm
    if not abs(encoded - recon) <= 0.01 * abs(recon):
        raise AssemblyError(f"3-D scan: partition thickness differs between encodedSpace ({enc.encoded_fov_mm[2]:g} "
                            f"mm / {depth} = {encoded:.4g} mm) and reconSpace ({enc.recon_fov_mm[2]:g} mm / {count} = "
                            f"{recon:.4g} mm); only a crop of oversampled partitions is supported")
    if not 0 <= enc.e2_min + enc.e2_padding <= enc.e2_max + enc.e2_padding < depth:
        raise AssemblyError(f"3-D scan: kspace_encoding_step_2 limits [{enc.e2_min}, {enc.e2_max}] with centre "
                            f"{enc.e2_center} do not fit the encoded matrix z {depth}")


def _check_kz_sampling(sampled: np.ndarray, key: SliceKey, enc: EncodingInfo) -> np.ndarray:
    """``sampled`` bool ``(e2 in the limits, phase)``: which (e2, e1) pairs hold a line. Fully sampled
    along kz means every e2 holds every phase column any e2 holds; returns those columns (the
    partitions' mask), else AssemblyError naming the missing partitions."""
    columns = sampled.any(axis=0)
    missing = columns[None, :] & ~sampled
    if missing.any():
        e2s = (np.flatnonzero(missing.any(axis=1)) + enc.e2_min).tolist()
        shown = ", ".join(map(str, e2s[:12])) + (", ..." if len(e2s) > 12 else "")
        raise AssemblyError(
            f"3-D scan undersampled along kz (e2): slice {dict(zip(KEY_FIELDS, key))}: {int(missing.sum())} of "
            f"{int(columns.sum()) * sampled.shape[0]} (e1, e2) positions of the acquired e1 lines are missing, at "
            f"e2 = {shown}; reconstructing a kz-undersampled 3-D scan is not supported (each partition is "
            "reconstructed by the 2-D network after an inverse FFT along kz, which needs every e2 in the encoding "
            f"limits [{enc.e2_min}, {enc.e2_max}] for every acquired e1 line); partitions are never averaged")
    return columns


def _kz_partitions(volume: np.ndarray, start: int, count: int) -> list[np.ndarray]:
    """``(kz, phase, coil, readout)`` k-space → ``count`` complex64 ``(phase, coil, readout)`` arrays:
    partitions ``start .. start + count - 1`` of the centred orthonormal inverse FFT along kz (axis 0),
    each one its own C-contiguous array (no view keeps the volume alive; recycling sees 2-D shapes)."""
    x = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(volume, axes=0), axis=0, norm="ortho"), axes=0)
    return [np.array(x[p], np.complex64, order="C") for p in range(start, start + count)]


def _check_finite(line: AcqLine, key: SliceKey) -> None:
    # sum |x|^2 is finite unless a sample is NaN/Inf (or it overflows: then the exact check decides);
    # 4 us for 32x512 samples against 27 us for np.isfinite(x).all()
    if not cmath.isfinite(np.vdot(line.data, line.data)) and not np.isfinite(line.data).all():
        raise AssemblyError(f"{_what(line, key)}: data contains NaN or Inf")


def _line_fields(head: np.void) -> tuple[int, int, int, SliceKey]:
    """``(flags, kspace_encode_step_1, center_sample, slice key)`` in one unpack of the header bytes
    (numpy field access costs ~2 us per field, 11 us for these)."""
    flags, center, e1, *key = _FIELDS.unpack(head.tobytes())
    return flags, e1, center, tuple(key)


def _what(line: AcqLine, key: SliceKey) -> str:
    """Names an acquisition in error messages (built only when there is an error)."""
    return f"acquisition {int(line.head['scan_counter'])} (slice {key[0]}, repetition {key[3]})"
