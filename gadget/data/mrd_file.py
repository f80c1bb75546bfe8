"""ISMRMRD HDF5 raw-data files, read and written in bulk with h5py.

Layout (ISMRMRD 1.x): group ``/<dataset>`` holds ``xml`` (one variable-length string, the
header) and ``data`` (compound records: ``head`` = the 340-byte acquisition header,
``traj`` = float32 ``[samples × traj_dims]``, ``data`` = float32 pairs of complex64
``[channels × samples]``). Records are read in chunks (much faster than one
``ismrmrd.Acquisition`` at a time) and the acquisition payload is returned as complex64
``(channels, samples)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype

from .h5 import open_readonly

HEADER_DTYPE = acquisition_header_dtype
RECORD_DTYPE = acquisition_dtype
COMPRESSION_BITS = (53, 54, 55, 56)


class MrdFileError(ValueError):
    """An ISMRMRD file is missing, unreadable or malformed; the message names file and item."""


def flag_mask(*bits: int) -> int:
    """ISMRMRD flag bits are 1-based: bit ``b`` is ``1 << (b - 1)``."""
    mask = 0
    for bit in bits:
        mask |= 1 << (bit - 1)
    return mask


def has_flag(flags, bit: int):
    """Elementwise test of one flag bit on a scalar or array of uint64 flags."""
    return (np.asarray(flags, np.uint64) & np.uint64(flag_mask(bit))) != 0


@dataclass
class AcquisitionChunk:
    """Consecutive acquisitions: ``heads`` structured ``(n,)`` of :data:`HEADER_DTYPE`,
    ``data`` list of complex64 ``(channels, samples)``, ``first_index`` of the first record."""

    heads: np.ndarray
    data: list[np.ndarray]
    first_index: int


def _open(path: Path, group: str) -> tuple[h5py.File, h5py.Group]:
    handle = open_readonly(path, MrdFileError)
    if group not in handle:
        groups = ", ".join(handle.keys()) or "none"
        handle.close()
        raise MrdFileError(f"{path}: no ISMRMRD group '{group}' (groups: {groups})")
    return handle, handle[group]


def read_header_xml(path: str | os.PathLike, group: str = "dataset") -> str:
    handle, grp = _open(Path(path), group)
    with handle:
        if "xml" not in grp:
            raise MrdFileError(f"{path}: group '{group}' has no 'xml' header")
        raw = grp["xml"][0]
    return (raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)).rstrip("\x00")


def count_acquisitions(path: str | os.PathLike, group: str = "dataset") -> int:
    handle, grp = _open(Path(path), group)
    with handle:
        return int(grp["data"].shape[0]) if "data" in grp else 0


def read_heads(path: str | os.PathLike, group: str = "dataset") -> np.ndarray:
    """All acquisition headers, structured ``(n,)`` of :data:`HEADER_DTYPE`, without the payloads."""
    path = Path(path)
    handle, grp = _open(path, group)
    with handle:
        if "data" not in grp:
            raise MrdFileError(f"{path}: group '{group}' has no acquisitions ('data')")
        try:
            return np.asarray(grp["data"].fields("head")[()]).astype(HEADER_DTYPE)
        except (OSError, ValueError, KeyError) as exc:
            raise MrdFileError(f"{path}: acquisition headers unreadable ({exc})") from None


def iter_acquisitions(path: str | os.PathLike, group: str = "dataset",
                      chunk_size: int = 2048) -> Iterator[AcquisitionChunk]:
    """Stream acquisitions in chunks; memory is bounded by one chunk."""
    path = Path(path)
    handle, grp = _open(path, group)
    with handle:
        if "data" not in grp:
            raise MrdFileError(f"{path}: group '{group}' has no acquisitions ('data')")
        records = grp["data"]
        if records.dtype.names is None or "head" not in records.dtype.names:
            raise MrdFileError(f"{path}: '{group}/data' is not an ISMRMRD acquisition table")
        for start in range(0, records.shape[0], chunk_size):
            try:
                block = records[start:start + chunk_size]
            except OSError as exc:
                raise MrdFileError(f"{path}: acquisitions {start}..{start + chunk_size - 1} unreadable ({exc})") \
                    from None
            heads = np.asarray(block["head"]).astype(HEADER_DTYPE)
            yield AcquisitionChunk(heads, [_payload(path, start + i, h, d) for i, (h, d) in
                                           enumerate(zip(heads, block["data"]))], start)


def _payload(path: Path, index: int, head: np.void, flat: np.ndarray) -> np.ndarray:
    channels, samples = int(head["active_channels"]), int(head["number_of_samples"])
    if any(has_flag(head["flags"], b) for b in COMPRESSION_BITS):
        raise MrdFileError(f"{path}: acquisition {index} carries a compressed payload (flags 53-56); "
                           "decompress it before reconstruction")
    if flat.size != 2 * channels * samples:
        raise MrdFileError(f"{path}: acquisition {index} has {flat.size // 2} complex samples, header says "
                           f"{channels} channels x {samples} samples")
    return np.asarray(flat, np.float32).view(np.complex64).reshape(channels, samples)


class MrdRawWriter:
    """Write an ISMRMRD raw file under a temporary name; ``close()`` renames it into place,
    ``abort()`` (or an exception inside ``with``) deletes it."""

    def __init__(self, path: str | os.PathLike, group: str = "dataset"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._file = h5py.File(self._tmp, "w")
        self._group = self._file.create_group(group)
        self._data = self._group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=RECORD_DTYPE,
                                                chunks=(256,))
        self.count = 0

    def write_header(self, xml: str) -> None:
        ds = self._group.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        ds[0] = xml.encode("utf-8")

    def append(self, heads: np.ndarray, data: list[np.ndarray]) -> None:
        """Append acquisitions: ``heads`` structured ``(n,)``, ``data`` complex64 ``(channels, samples)`` each.
        ``number_of_samples``, ``active_channels`` and ``trajectory_dimensions`` are set from the data."""
        n = len(data)
        records = np.empty(n, dtype=RECORD_DTYPE)
        heads = heads.copy()
        for i, d in enumerate(data):
            d = np.ascontiguousarray(d, np.complex64)
            heads[i]["active_channels"], heads[i]["number_of_samples"] = d.shape
            heads[i]["trajectory_dimensions"] = 0
            records[i] = (heads[i], np.zeros(0, np.float32), d.view(np.float32).reshape(-1))
        self._data.resize(self.count + n, axis=0)
        self._data[self.count:] = records
        self.count += n

    def close(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "MrdRawWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def empty_heads(n: int, version: int = 1) -> np.ndarray:
    heads = np.zeros(n, dtype=HEADER_DTYPE)
    heads["version"] = version
    return heads


