"""fastMRI multicoil HDF5 → ISMRMRD raw file (one acquisition per acquired phase line per slice).

Order: noise-only acquisitions first (from a ``noise`` dataset when the file has one), then
slice by slice, phase lines in ascending ``kspace_encode_step_1``. Flags: FIRST/LAST_IN_SLICE,
LAST_IN_MEASUREMENT, IS_NOISE_MEASUREMENT; calibration lines (the dense centre block) carry
IS_PARALLEL_CALIBRATION when they are not on the undersampling pattern and
IS_PARALLEL_CALIBRATION_AND_IMAGING when they are. For a test-format input the pattern is
inferred: if the lines outside the centre are equispaced, centre lines on that grid belong to
the image; otherwise (random masks) every centre line is marked as calibration-and-imaging.

Geometry: read/phase/slice directions along x/y/z, slice positions centred on 0 and spaced
by the header's slice thickness (encoded FOV z). ``kspace_encode_step_1 = column - padding_left``
(fastMRI's padding from the header), ``center_sample = readout // 2``.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from gadget.data.fastmri_file import FastMRIFileError, open_volume
from gadget.data.mrd_file import MrdRawWriter, empty_heads, flag_mask
from gadget.mri.masks import MaskSampler, MaskSpec, center_block, contiguous_center_lines

from . import header_edit

log = logging.getLogger(__name__)

# ISMRMRD acquisition flag bits (ismrmrd constants.h)
FIRST_IN_SLICE, LAST_IN_SLICE, IS_NOISE = 7, 8, 19
IS_CALIBRATION, IS_CALIBRATION_AND_IMAGING, LAST_IN_MEASUREMENT = 20, 21, 25
_TICKS_PER_LINE = 4  # acquisition_time_stamp counts 2.5 ms ticks; a 10 ms TR per line


@dataclass(frozen=True)
class LinePlan:
    """Which phase columns to send and how to flag them; bool ``(phase,)`` each."""

    acquired: np.ndarray
    calibration: np.ndarray   # centre lines (subset of acquired)
    imaging: np.ndarray       # lines on the undersampling pattern
    acceleration: float
    num_low: int

    @property
    def fully_sampled(self) -> bool:
        return bool(self.acquired.all())


def file_seed(path: Path) -> tuple[int, ...]:
    """fastMRI's per-volume mask seed: the code points of the file name."""
    return tuple(map(ord, path.name))


def plan_from_spec(width: int, spec: MaskSpec, seed, padding: tuple[int, int]) -> LinePlan:
    center, outer, num_low = MaskSampler(spec).sample_parts(width, seed=seed)
    inside = np.zeros(width, bool)
    inside[max(padding[0], 0):padding[1]] = True
    acquired = (center | outer) & inside
    return LinePlan(acquired, center & inside, outer & inside, width / acquired.sum(), num_low)


def plan_from_file_mask(mask: np.ndarray, num_low: Optional[int], acceleration: Optional[float]) -> LinePlan:
    width = mask.size
    num_low = num_low or contiguous_center_lines(mask)
    center = center_block(width, num_low) & mask if num_low else np.zeros(width, bool)
    outer_cols = np.flatnonzero(mask & ~center)
    imaging = mask & ~center
    steps = np.diff(outer_cols)
    if outer_cols.size > 2 and np.all(steps == steps[0]):
        grid = np.zeros(width, bool)
        grid[outer_cols[0] % steps[0]::steps[0]] = True
        imaging = mask & grid
    else:
        imaging = mask.copy()
    return LinePlan(mask.copy(), center, imaging, acceleration or width / mask.sum(), num_low)


def full_plan(width: int, padding: tuple[int, int]) -> LinePlan:
    acquired = np.zeros(width, bool)
    acquired[max(padding[0], 0):padding[1]] = True
    return LinePlan(acquired, np.zeros(width, bool), acquired.copy(), 1.0, 0)


def convert_fastmri_to_ismrmrd(in_path, out_path, mask_kind: Optional[str] = None,
                               acceleration: Optional[float] = None, center_fraction: Optional[float] = None,
                               seed: Optional[int] = None,
                               progress: Optional[Callable[[int], None]] = None) -> LinePlan:
    """Convert one file; returns the line plan used. Output is written atomically."""
    in_path, out_path = Path(in_path), Path(out_path)
    with open_volume(in_path) as vol:
        n_slices, n_coils, readout, width = vol.kspace.shape
        padding = vol.encoding.padding
        if vol.mask is not None:
            if mask_kind is not None:
                raise FastMRIFileError(f"{in_path}: already undersampled (has 'mask'); do not pass --mask")
            plan = plan_from_file_mask(vol.mask, vol.num_low_frequency, vol.attrs.get("acceleration"))
        elif mask_kind is not None:
            if acceleration is None or center_fraction is None:
                raise ValueError("--mask needs --acceleration and --center-fraction")
            spec = MaskSpec(mask_kind, [center_fraction], [acceleration])
            plan = plan_from_spec(width, spec, seed if seed is not None else file_seed(in_path), padding)
        else:
            plan = full_plan(width, padding)
        xml = _output_header(vol.handle["ismrmrd_header"][()], vol.attrs, plan, n_slices)
        slice_mm = vol.encoding.encoded_fov_mm[2]
        uid = int.from_bytes(hashlib.sha1(in_path.name.encode()).digest()[:4], "little")
        with MrdRawWriter(out_path) as writer:
            writer.write_header(xml)
            counter = 0
            if "noise" in vol.handle:
                counter = _write_noise(writer, np.asarray(vol.handle["noise"][()]), readout, uid)
            columns = np.flatnonzero(plan.acquired)
            for s in range(n_slices):
                kspace = vol.kspace[s]  # (coil, readout, phase): one slice in memory
                heads = _line_heads(columns, plan, s, n_slices, slice_mm, padding[0], readout, n_coils,
                                    uid, counter)
                counter += len(columns)
                writer.append(heads, [np.ascontiguousarray(kspace[:, :, c]) for c in columns])
                if progress:
                    progress(1)
    log.info("%s -> %s: %d slices x %d lines, ACS %d, R=%.2f", in_path.name, out_path.name, n_slices,
             len(columns), plan.num_low, plan.acceleration)
    return plan


def _output_header(raw_xml, attrs: dict, plan: LinePlan, n_slices: int) -> str:
    xml = raw_xml.decode("utf-8", errors="replace") if isinstance(raw_xml, bytes) else str(raw_xml)
    root = header_edit.parse(xml)
    header_edit.set_limit(root, "slice", n_slices - 1, (n_slices - 1) // 2)
    if not plan.fully_sampled:
        header_edit.set_parallel_imaging(root, int(round(plan.acceleration)), "embedded")
    keep = {k: _plain(v) for k, v in attrs.items() if k in ("max", "norm", "acquisition", "patient_id",
                                                             "acceleration", "num_low_frequency")}
    if keep:
        header_edit.set_user_parameters(root, keep)
    return header_edit.to_string(root)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_noise(writer: MrdRawWriter, noise: np.ndarray, readout: int, uid: int) -> int:
    """Noise ``(coil, samples)`` → acquisitions of up to ``readout`` samples; returns how many."""
    pieces = [noise[:, i:i + readout] for i in range(0, noise.shape[1], readout)]
    heads = empty_heads(len(pieces))
    heads["flags"] = flag_mask(IS_NOISE)
    heads["measurement_uid"] = uid
    heads["scan_counter"] = np.arange(len(pieces))
    heads["available_channels"] = noise.shape[0]
    heads["sample_time_us"] = 5.0
    writer.append(heads, [p.astype(np.complex64) for p in pieces])
    return len(pieces)


def _line_heads(columns: np.ndarray, plan: LinePlan, s: int, n_slices: int, slice_mm: float,
                padding_left: int, readout: int, n_coils: int, uid: int, counter: int) -> np.ndarray:
    n = len(columns)
    heads = empty_heads(n)
    flags = np.zeros(n, np.uint64)
    cal = plan.calibration[columns]
    img = plan.imaging[columns]
    flags[cal & ~img] |= np.uint64(flag_mask(IS_CALIBRATION))
    flags[cal & img] |= np.uint64(flag_mask(IS_CALIBRATION_AND_IMAGING))
    flags[0] |= np.uint64(flag_mask(FIRST_IN_SLICE))
    flags[-1] |= np.uint64(flag_mask(LAST_IN_SLICE))
    if s == n_slices - 1:
        flags[-1] |= np.uint64(flag_mask(LAST_IN_MEASUREMENT))
    heads["flags"] = flags
    heads["measurement_uid"] = uid
    heads["scan_counter"] = counter + np.arange(n)
    heads["acquisition_time_stamp"] = (counter + np.arange(n)) * _TICKS_PER_LINE
    heads["available_channels"] = n_coils
    heads["center_sample"] = readout // 2
    heads["sample_time_us"] = 5.0
    heads["position"] = (0.0, 0.0, (s - (n_slices - 1) / 2) * slice_mm)
    heads["read_dir"] = (1.0, 0.0, 0.0)
    heads["phase_dir"] = (0.0, 1.0, 0.0)
    heads["slice_dir"] = (0.0, 0.0, 1.0)
    heads["idx"]["kspace_encode_step_1"] = columns - padding_left
    heads["idx"]["slice"] = s
    return heads
