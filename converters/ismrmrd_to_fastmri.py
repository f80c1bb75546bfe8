"""ISMRMRD raw file → fastMRI multicoil HDF5.

Mapping (decided here, documented in the README):

* ``slice`` → the fastMRI slice axis (sorted by index);
* ``average`` → averaged: repeated acquisitions of the same line are summed and divided by their count;
* ``repetition``, ``contrast``, ``phase``, ``set`` → one output file each; when more than one
  combination occurs the file names get ``_rep{r}``/``_contrast{c}``/``_phase{p}``/``_set{s}``
  for the indices that vary;
* noise acquisitions → a ``noise`` dataset ``(coil, samples)``; navigator, phase-correction,
  feedback and dummy-scan acquisitions are skipped (counted in the log);
* lines go to column ``kspace_encode_step_1 + padding_left`` (fastMRI's padding from the header);
  readout samples are placed so that ``center_sample`` lands on ``encoded_x // 2`` (asymmetric echo);
* a volume with every line of the encoded range is written in train layout (``kspace``,
  ``reconstruction_rss``); otherwise in test layout (``kspace`` with zeros, ``mask``, attrs
  ``acceleration`` and ``num_low_frequency`` = the lines flagged as calibration).

Two passes over the file: headers only (validation, grouping), then one volume at a time —
memory is one volume plus one chunk of acquisitions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from gadget.data.fastmri_file import write_atomic_h5
from gadget.data.mrd_file import (COMPRESSION_BITS, MrdFileError, has_flag, iter_acquisitions, read_header_xml,
                                  read_heads)
from gadget.data.mrd_header import EncodingInfo, HeaderError, parse_encoding
from gadget.mri.coils import rss
from gadget.mri.fft import ifft2c
from gadget.mri.masks import contiguous_center_lines
from gadget.mri.metrics import center_crop_at_most

from . import header_edit

log = logging.getLogger(__name__)

NOISE, CAL, CAL_AND_IMAGING = 19, 20, 21
SKIPPED_KINDS = {23: "navigation", 24: "phase correction", 26: "HP feedback", 27: "dummy scan",
                 28: "RT feedback", 29: "surface coil correction", 30: "phase stabilisation reference",
                 31: "phase stabilisation"}
VOLUME_KEYS = ("repetition", "contrast", "phase", "set")
_SUFFIX = {"repetition": "rep", "contrast": "contrast", "phase": "phase", "set": "set"}


@dataclass
class ScanLayout:
    """What pass 1 learned: the acquisitions of each output volume and the common sizes."""

    channels: int
    samples: int
    volumes: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)  # key → acquisition indices
    noise: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def scan_layout(path: Path, heads: np.ndarray, enc: EncodingInfo) -> ScanLayout:
    """Validate every acquisition header and group the imaging lines into volumes."""
    flags = heads["flags"]
    for bit in COMPRESSION_BITS:
        bad = np.flatnonzero(has_flag(flags, bit))
        if bad.size:
            raise MrdFileError(f"{path}: acquisition {bad[0]} carries a compressed payload (flag {bit})")
    noise = has_flag(flags, NOISE)
    skip = np.zeros(len(heads), bool)
    skipped = {}
    for bit, name in SKIPPED_KINDS.items():
        hit = has_flag(flags, bit) & ~noise & ~skip
        if hit.any():
            skipped[name] = int(hit.sum())
            skip |= hit
    lines = np.flatnonzero(~noise & ~skip)
    if lines.size == 0:
        raise MrdFileError(f"{path}: no imaging acquisitions (only noise/auxiliary data)")
    h = heads[lines]
    for name in ("active_channels", "number_of_samples"):
        values = h[name]
        if values[0] == 0:
            raise MrdFileError(f"{path}: acquisition {lines[0]} has zero {name}")
        changed = np.flatnonzero(values != values[0])
        if changed.size:
            i = changed[0]
            raise MrdFileError(f"{path}: acquisition {lines[i]} has {name}={values[i]} but earlier "
                               f"acquisitions have {values[0]} (counts must not change within a scan)")
    e1 = h["idx"]["kspace_encode_step_1"].astype(int)
    out = np.flatnonzero((e1 < enc.e1_min) | (e1 > enc.e1_max))
    if out.size:
        i = out[0]
        raise MrdFileError(f"{path}: acquisition {lines[i]} has kspace_encode_step_1={e1[i]} outside the "
                           f"header's encoding limits [{enc.e1_min}, {enc.e1_max}]")
    left = enc.padding[0]
    cols = e1 + left
    bad = np.flatnonzero((cols < 0) | (cols >= enc.encoded_matrix[1]))
    if bad.size:
        raise MrdFileError(f"{path}: acquisition {lines[bad[0]]} maps to phase column {cols[bad[0]]} outside "
                           f"the encoded matrix width {enc.encoded_matrix[1]}")
    if np.any(h["idx"]["kspace_encode_step_2"] != 0):
        raise MrdFileError(f"{path}: 3-D acquisitions (kspace_encode_step_2 > 0) are not supported")
    keys = np.stack([h["idx"][k].astype(int) for k in VOLUME_KEYS], axis=1)
    layout = ScanLayout(int(h["active_channels"][0]), int(h["number_of_samples"][0]),
                        noise=list(np.flatnonzero(noise)), skipped=skipped)
    for key in sorted({tuple(k) for k in keys}):
        layout.volumes[key] = lines[np.all(keys == key, axis=1)]
    return layout


def output_paths(out_path: Path, keys: list[tuple[int, ...]]) -> dict[tuple[int, ...], Path]:
    if len(keys) == 1:
        return {keys[0]: out_path}
    varying = [i for i in range(len(VOLUME_KEYS)) if len({k[i] for k in keys}) > 1]
    return {k: out_path.with_name(out_path.stem + "".join(f"_{_SUFFIX[VOLUME_KEYS[i]]}{k[i]}" for i in varying)
                                  + out_path.suffix) for k in keys}


def convert_ismrmrd_to_fastmri(in_path, out_path, group: str = "dataset", chunk_size: int = 2048,
                               progress: Optional[Callable[[int], None]] = None) -> list[Path]:
    """Convert one ISMRMRD file; returns the fastMRI files written (see the module docstring)."""
    in_path, out_path = Path(in_path), Path(out_path)
    xml = read_header_xml(in_path, group)
    try:
        enc = parse_encoding(xml, source=str(in_path))
    except HeaderError as exc:
        raise MrdFileError(str(exc)) from None
    heads = read_heads(in_path, group)
    layout = scan_layout(in_path, heads, enc)
    for name, count in layout.skipped.items():
        log.info("%s: skipped %d %s acquisitions", in_path.name, count, name)
    root = header_edit.parse(xml)
    stored_attrs = header_edit.pop_user_parameters(root)
    header_out = header_edit.to_string(root)
    noise = _collect(in_path, group, chunk_size, set(layout.noise)) if layout.noise else None
    written = []
    for key, path in output_paths(out_path, list(layout.volumes)).items():
        kspace, mask, calib = _assemble(in_path, group, chunk_size, heads, layout.volumes[key], layout, enc)
        _write_volume(path, kspace, mask, calib, enc, header_out, stored_attrs, noise)
        written.append(path)
        if progress:
            progress(1)
        log.info("%s -> %s: kspace %s, %d/%d lines", in_path.name, path.name, kspace.shape, mask.sum(), mask.size)
    return written


def _collect(path: Path, group: str, chunk_size: int, wanted: set[int]) -> np.ndarray:
    """Noise acquisitions concatenated along samples: complex64 ``(coil, samples)``."""
    pieces = []
    for chunk in iter_acquisitions(path, group, chunk_size):
        pieces += [d for i, d in enumerate(chunk.data, chunk.first_index) if i in wanted]
    channels = {p.shape[0] for p in pieces}
    if len(channels) != 1:
        raise MrdFileError(f"{path}: noise acquisitions have differing channel counts {sorted(channels)}")
    return np.concatenate(pieces, axis=1)


def _assemble(path: Path, group: str, chunk_size: int, heads: np.ndarray, indices: np.ndarray,
              layout: ScanLayout, enc: EncodingInfo):
    """One volume: k-space ``(slice, coil, readout, phase)``, acquired mask ``(phase,)``, calibration columns."""
    readout, width = enc.encoded_matrix[0], enc.encoded_matrix[1]
    slices = np.unique(heads["idx"]["slice"][indices])
    slice_pos = {int(s): i for i, s in enumerate(slices)}
    kspace = np.zeros((len(slices), layout.channels, max(readout, layout.samples), width), np.complex64)
    counts = np.zeros((len(slices), width), np.int32)
    calib = np.zeros(width, bool)
    wanted = set(int(i) for i in indices)
    left = enc.padding[0]
    for chunk in iter_acquisitions(path, group, chunk_size):
        for i, data in enumerate(chunk.data, chunk.first_index):
            if i not in wanted:
                continue
            h = heads[i]
            col = int(h["idx"]["kspace_encode_step_1"]) + left
            s = slice_pos[int(h["idx"]["slice"])]
            start = kspace.shape[2] // 2 - int(h["center_sample"])
            if start < 0 or start + data.shape[1] > kspace.shape[2]:
                raise MrdFileError(f"{path}: acquisition {i}: center_sample {int(h['center_sample'])} with "
                                   f"{data.shape[1]} samples does not fit the readout of {kspace.shape[2]}")
            kspace[s, :, start:start + data.shape[1], col] += data
            counts[s, col] += 1
            if has_flag(h["flags"], CAL) or has_flag(h["flags"], CAL_AND_IMAGING):
                calib[col] = True
    averaged = counts > 1
    if averaged.any():
        kspace[:, :, :, :] /= np.maximum(counts, 1)[:, None, None, :]
    mask = counts.any(axis=0)
    partial = (counts > 0) != mask[None]
    if partial.any():
        log.warning("%s: some slices lack lines that others have; those lines are zero", path.name)
    return kspace, mask, calib


def _write_volume(path: Path, kspace: np.ndarray, mask: np.ndarray, calib: np.ndarray, enc: EncodingInfo,
                  header: str, stored: dict, noise: Optional[np.ndarray]) -> None:
    left, right = enc.padding
    full_range = np.zeros(mask.size, bool)
    full_range[max(left, 0):right] = True
    attrs = {"acquisition": stored.get("acquisition", "ISMRMRD"), "patient_id": stored.get("patient_id", "")}
    data = {"kspace": kspace, "ismrmrd_header": header}
    if noise is not None:
        data["noise"] = noise
    if np.array_equal(mask, full_range):
        rss = _rss_target(kspace, enc.recon_size)
        data["reconstruction_rss"] = rss
        attrs.update(max=float(rss.max()), norm=float(np.linalg.norm(rss)))
    else:
        data["mask"] = mask.astype(np.float32)
        num_low = contiguous_center_lines(calib) if calib.any() else 0
        accel = enc.acceleration_e1 if enc.acceleration_e1 and enc.acceleration_e1 > 1 else mask.size / mask.sum()
        attrs.update(acceleration=float(accel), num_low_frequency=int(num_low))
    for key in ("max", "norm", "acceleration", "num_low_frequency"):
        if key in stored:
            attrs[key] = stored[key]
    write_atomic_h5(path, data, attrs)


def _rss_target(kspace: np.ndarray, recon_size: tuple[int, int]) -> np.ndarray:
    """fastMRI's ``reconstruction_rss``: RSS of the centered inverse FFT, center-cropped.
    Computed slice by slice so memory stays at one volume plus one slice."""
    return np.stack([center_crop_at_most(rss(ifft2c(torch.from_numpy(coils)), dim=0).numpy(), recon_size)
                     for coils in kspace]).astype(np.float32)
