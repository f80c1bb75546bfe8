"""Training/validation slices from fastMRI-layout multicoil files, undersampled on the fly.

One sample (:class:`TrainSample`) per (file, slice):

==================  =============================  =====================================================
field               layout                         meaning
==================  =============================  =====================================================
masked_kspace       (coil, readout, phase)         complex64, unsampled columns exactly 0
mask                (phase,)                       bool, restricted to the header's acquired range
num_low_frequencies int                            dense centre lines (0 → the model detects them)
target              (H, W)                         float32, the file's target dataset for this slice
max_value           float                          volume maximum of the target (SSIM data range)
crop_size           (h, w)                         ``reconSpace`` matrix of the header
fname, slice_num    str, int                       where the sample came from
sens_maps           (coil, readout, phase) | None  complex64 fixed ESPIRiT maps of the sample's ACS lines
                                                   (only with ``maps``: the fixed-map model variants)
==================  =============================  =====================================================

Masks follow fastMRI's ``VarNetDataTransform``: :class:`gadget.mri.masks.MaskSampler` draws a
mask over the phase columns and columns outside ``encoding.padding`` are cleared. With
``fixed_masks`` (validation) the draw is seeded with ``tuple(map(ord, fname))`` so every slice of a
volume, in every epoch, shares one mask — bit-identical to fastMRI with ``use_seed=True``. Without
it (training) each draw is seeded with ``(seed, epoch, index)``: a new mask per slice and epoch, as
fastMRI's unseeded training masks, but reproducible and independent of the worker that loads it
(so nothing about the masks needs saving for an exact resume). Test-layout files (with ``mask``)
keep their own mask and ``num_low_frequency`` attribute.

Fixed sensitivity maps (model variants ``vn``, ``vnu``, ``vnu-k``): :class:`FixedMapsCache` runs
ESPIRiT on the sample's ACS lines only (the centre block of ``num_low_frequencies`` columns, nothing
else of the mask), so the maps depend on (file, slice, ACS count) alone; each is computed once and
kept in a per-process in-memory LRU and, when given a directory, on disk (shared by DataLoader
workers, epochs, runs and the variants of ``varnet ablate``).

Files are opened lazily: one read-only h5py handle per file per process (workers reopen theirs).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.fastmri_file import FastMRIFileError, open_volume
from ..mri.lru import ByteLRU
from ..mri.masks import MaskSampler, MaskSpec, center_block, contiguous_center_lines

log = logging.getLogger(__name__)

NOISE_FREE_TARGET = "target_noise_free"   # written by `varnet synth` (gadget.converters.simulate)
FASTMRI_TARGET = "reconstruction_rss"
AUTO_TARGET = "auto"


class TrainSample(NamedTuple):
    masked_kspace: torch.Tensor   # complex64 (coil, readout, phase) — batched: (b, coil, readout, phase)
    mask: torch.Tensor            # bool (phase,) — batched: (b, 1, 1, phase)
    num_low_frequencies: Any      # int — batched: long (b,)
    target: torch.Tensor          # float32 (H, W) — batched: (b, H, W)
    max_value: Any                # float — batched: float32 (b,)
    crop_size: tuple              # (h, w) — batched: one (h, w) for the batch
    fname: Any                    # str — batched: list[str]
    slice_num: Any                # int — batched: long (b,)
    sens_maps: Any = None         # complex64 (coil, readout, phase) or None — batched: (b, coil, readout, phase)


@dataclass(frozen=True)
class VolumeInfo:
    """What the index needs from one file (read once, when the dataset is built)."""

    path: Path
    num_slices: int
    kspace_shape: tuple[int, int, int]   # (coil, readout, phase)
    padding: tuple[int, int]             # acquired phase columns [left, right)
    crop_size: tuple[int, int]           # header reconSpace matrix (h, w)
    target_shape: Optional[tuple[int, int]]  # (H, W) of the target dataset
    target_key: Optional[str]
    max_value: Optional[float]
    file_mask: Optional[np.ndarray]      # bool (phase,) for test-layout files
    num_low_frequency: int               # test-layout attribute (0: unknown)


def list_files(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Sorted ``*.h5`` files of every directory (a path to a file is taken as is)."""
    files: list[Path] = []
    for entry in dirs:
        p = Path(entry)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(p.glob("*.h5"))
            if not found:
                raise FastMRIFileError(f"{p}: no .h5 files")
            files.extend(found)
        else:
            raise FastMRIFileError(f"{p}: no such directory")
    return files


def resolve_target_key(names: Sequence[str], wanted: str) -> Optional[str]:
    """``auto`` → :data:`NOISE_FREE_TARGET` when present, else :data:`FASTMRI_TARGET`, else None."""
    if wanted != AUTO_TARGET:
        return wanted if wanted in names else None
    for key in (NOISE_FREE_TARGET, FASTMRI_TARGET):
        if key in names:
            return key
    return None


def read_volume_info(path: Path, target: str = AUTO_TARGET, require_target: bool = True) -> VolumeInfo:
    """Validate one file (kspace, header) and read its metadata and target volume maximum.

    ``max_value`` is the file attribute ``max`` when the target is ``reconstruction_rss`` (as
    fastMRI), otherwise the maximum of the target dataset."""
    with open_volume(path) as vol:
        key = resolve_target_key(list(vol.handle.keys()), target)
        if key is None and require_target:
            raise FastMRIFileError(f"{path}: no target dataset '{target}'"
                                   + (f" (looked for {NOISE_FREE_TARGET}, {FASTMRI_TARGET})"
                                      if target == AUTO_TARGET else ""))
        max_value, target_shape = None, None
        if key is not None:
            ds = vol.handle[key]
            if ds.ndim != 3 or ds.shape[0] != vol.num_slices:
                raise FastMRIFileError(f"{path}: target '{key}' must be (slice, H, W) with "
                                       f"{vol.num_slices} slices, got {ds.shape}")
            if key == FASTMRI_TARGET and "max" in vol.attrs:
                max_value = float(vol.attrs["max"])
            else:
                max_value = float(np.max(ds[()]))
            target_shape = tuple(int(n) for n in ds.shape[1:])
        return VolumeInfo(path=path, num_slices=vol.num_slices,
                          kspace_shape=tuple(int(s) for s in vol.kspace.shape[1:]),
                          padding=vol.encoding.padding, crop_size=vol.encoding.recon_size,
                          target_shape=target_shape, target_key=key, max_value=max_value, file_mask=vol.mask,
                          num_low_frequency=vol.num_low_frequency or 0)


class MixedMaskSampler:
    """Masks from one of several :class:`MaskSpec` (e.g. random and equispaced-fraction kinds),
    the spec drawn per call from the call's seed, so a seeded mask stays reproducible. With one
    spec it is exactly :class:`MaskSampler` (fastMRI's masks bit for bit)."""

    def __init__(self, specs: MaskSpec | Sequence[MaskSpec]):
        self.samplers = [MaskSampler(s) for s in ([specs] if isinstance(specs, MaskSpec) else specs)]
        if not self.samplers:
            raise ValueError("at least one mask spec is needed")

    def __call__(self, num_cols: int, seed) -> tuple[np.ndarray, int]:
        sampler = self.samplers[0]
        if len(self.samplers) > 1:
            entropy = list(seed) if isinstance(seed, (tuple, list)) else [int(seed)]
            pick = np.random.default_rng(np.random.SeedSequence([*entropy, 7919])).integers(len(self.samplers))
            sampler = self.samplers[int(pick)]
        return sampler(num_cols, seed=seed)


def restrict_to_padding(mask: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    """Clear the columns outside ``[left, right)`` (fastMRI's ``apply_mask(padding=...)``)."""
    mask = np.asarray(mask, dtype=bool).copy()
    left, right = padding
    mask[:max(left, 0)] = False
    mask[max(right, 0):] = False
    return mask


# ----------------------------------------------------------------------------- fixed maps

def default_fixed_maps(kspace, mask, num_low: int):
    """:func:`gadget.baselines.espirit.fixed_maps` (ESPIRiT on the ACS block), imported when first used."""
    from ..baselines.espirit import fixed_maps

    return fixed_maps(kspace, mask, num_low)


class FixedMapsCache:
    """Fixed (ESPIRiT) sensitivity maps of a slice's ACS lines, computed once per (file, slice,
    ACS count).

    Args:
        directory: on-disk cache (``.npy`` complex64 per entry, written atomically, so concurrent
            workers and later runs share it); None: memory only.
        memory_mb: per-process in-memory LRU budget (0: none).
        compute: ``compute(acs_kspace, acs_mask, num_low)`` → complex maps ``(coil, readout, phase)``;
            default :func:`default_fixed_maps`.

    A disk entry's name holds a digest of the file's resolved path, size and modification time,
    so a regenerated file never reads stale maps. ``computed``/``memory_hits``/``disk_hits`` count
    this process's lookups; ``compute_seconds`` is the time spent in ``compute``.
    """

    FORMAT = 2  # 2: ESPIRiT's narrower kernel with fewer than 10 ACS lines (espirit.calibration_kernel)

    def __init__(self, directory: Optional[str | os.PathLike] = None, memory_mb: float = 256,
                 compute: Optional[Callable] = None):
        self.directory = Path(directory) if directory else None
        self.memory_bytes = int(memory_mb * 2 ** 20)
        self.compute = compute
        self._memory = ByteLRU(self.memory_bytes)
        self.computed = self.memory_hits = self.disk_hits = 0
        self.compute_seconds = 0.0

    def key(self, path: str | os.PathLike, slice_num: int, num_low: int) -> str:
        path = Path(path).resolve()
        st = path.stat()
        digest = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{self.FORMAT}".encode()).hexdigest()[:16]
        return f"{path.stem}-{digest}-s{int(slice_num)}-acs{int(num_low)}"

    def get(self, path: str | os.PathLike, slice_num: int, num_low: int, kspace,
            padding: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Maps complex64 ``(coil, readout, phase)`` for ``kspace`` (that slice, complex ``(coil,
        readout, phase)``, fully sampled or undersampled with its ACS block intact); only its
        ``num_low`` centre columns (within ``padding``) are read."""
        if int(num_low) < 2:
            raise ValueError(f"{Path(path).name} slice {slice_num}: fixed maps need an ACS block of >= 2 "
                             f"lines, got {num_low}")
        key = self.key(path, slice_num, num_low)
        maps = self._memory.get(key)
        if maps is not None:
            self.memory_hits += 1
            return maps
        shape = tuple(kspace.shape)
        maps = self._load(key, shape)
        if maps is None:
            maps = self._compute(kspace, int(num_low), padding)
            self._store(key, maps)
        self._memory.put(key, maps)
        return maps

    def _compute(self, kspace, num_low: int, padding) -> torch.Tensor:
        k = kspace.detach().cpu().numpy() if isinstance(kspace, torch.Tensor) else np.asarray(kspace)
        acs = center_block(k.shape[-1], num_low)
        if padding is not None:
            acs = restrict_to_padding(acs, padding)
        start = time.perf_counter()
        maps = (self.compute or default_fixed_maps)(np.where(acs, k, 0).astype(np.complex64), acs, num_low)
        self.compute_seconds += time.perf_counter() - start
        self.computed += 1
        maps = torch.as_tensor(maps).to(torch.complex64)
        if tuple(maps.shape) != tuple(k.shape):
            raise ValueError(f"fixed maps have shape {tuple(maps.shape)}, k-space {tuple(k.shape)}")
        return maps

    def _load(self, key: str, shape: tuple) -> Optional[torch.Tensor]:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.npy"
        try:
            array = np.load(path)
        except (OSError, ValueError):
            return None
        if array.shape != shape or array.dtype != np.complex64:
            log.warning("maps cache %s: shape %s / %s, expected %s complex64; recomputing",
                        path, array.shape, array.dtype, shape)
            return None
        self.disk_hits += 1
        return torch.from_numpy(array)

    def _store(self, key: str, maps: torch.Tensor) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.npy"
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        np.save(tmp, maps.numpy())
        os.replace(tmp, path)

    def stats(self) -> dict:
        return {"computed": self.computed, "memory_hits": self.memory_hits, "disk_hits": self.disk_hits,
                "compute_seconds": round(self.compute_seconds, 3)}


class SliceDataset(Dataset):
    """Every slice of every file in ``dirs`` (see the module docstring for the sample layout).

    Args:
        dirs: directories of ``*.h5`` files (or files).
        mask_spec: how to undersample fully sampled files (None: test-layout files only); a
            list of specs draws one per mask (:class:`MixedMaskSampler`).
        target: target dataset name, or ``auto``.
        fixed_masks: seed each volume's mask from its file name (validation); else a new
            mask per slice and epoch, seeded with ``(seed, epoch, index)``.
        seed: base seed of the training masks.
        maps: a :class:`FixedMapsCache`: each sample then carries ``sens_maps`` (fixed-map variants).
    """

    def __init__(self, dirs: Sequence[str | os.PathLike], mask_spec: Optional[MaskSpec | Sequence[MaskSpec]],
                 target: str = AUTO_TARGET, fixed_masks: bool = False, seed: int = 0,
                 maps: Optional[FixedMapsCache] = None):
        self.volumes = [read_volume_info(p, target) for p in list_files(dirs)]
        if not self.volumes:
            raise FastMRIFileError(f"no files in {', '.join(map(str, dirs))}")
        self.sampler = MixedMaskSampler(mask_spec) if mask_spec is not None else None
        self.fixed_masks = fixed_masks
        self.maps = maps
        self.seed = int(seed)
        self.epoch = 0
        self.index = [(v, s) for v, info in enumerate(self.volumes) for s in range(info.num_slices)]
        if self.sampler is None:
            missing = [str(v.path) for v in self.volumes if v.file_mask is None]
            if missing:
                raise FastMRIFileError(f"{missing[0]}: fully sampled file but no mask settings given")
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    # --------------------------------------------------------------------- bookkeeping

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Training masks depend on the epoch; call before each epoch's DataLoader iterator."""
        self.epoch = int(epoch)

    @property
    def target_keys(self) -> list[str]:
        return sorted({v.target_key for v in self.volumes if v.target_key})

    def shapes(self) -> dict[tuple, list[str]]:
        """File names by ``(k-space shape, target shape, crop size)``; batches > 1 need one entry."""
        groups: dict[tuple, list[str]] = {}
        for v in self.volumes:
            groups.setdefault((v.kspace_shape, v.target_shape, tuple(v.crop_size)), []).append(v.path.name)
        return groups

    def volume_slices(self, volume: int) -> list[int]:
        """Dataset indices of the slices of volume ``volume``, in slice order."""
        start = sum(v.num_slices for v in self.volumes[:volume])
        return list(range(start, start + self.volumes[volume].num_slices))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # h5py handles do not cross process boundaries
        return state

    def _file(self, volume: int) -> h5py.File:
        if self._pid != os.getpid():  # forked worker: never reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(volume)
        if handle is None:
            handle = self._handles[volume] = h5py.File(self.volumes[volume].path, "r")
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    # --------------------------------------------------------------------- samples

    def mask_for(self, index: int) -> tuple[np.ndarray, int]:
        """``(mask bool (phase,), num_low_frequencies)`` of dataset item ``index``."""
        volume, _ = self.index[index]
        info = self.volumes[volume]
        if info.file_mask is not None:
            return restrict_to_padding(info.file_mask, info.padding), info.num_low_frequency
        seed = tuple(map(ord, info.path.name)) if self.fixed_masks else (self.seed, self.epoch, index)
        mask, num_low = self.sampler(info.kspace_shape[-1], seed=seed)
        return restrict_to_padding(mask, info.padding), int(num_low)

    def __getitem__(self, index: int) -> TrainSample:
        volume, slice_num = self.index[index]
        info = self.volumes[volume]
        handle = self._file(volume)
        kspace = torch.from_numpy(np.asarray(handle["kspace"][slice_num], dtype=np.complex64))
        mask, num_low = self.mask_for(index)
        mask_t = torch.from_numpy(mask)
        masked = torch.where(mask_t, kspace, torch.zeros((), dtype=kspace.dtype))
        target = torch.from_numpy(np.asarray(handle[info.target_key][slice_num], dtype=np.float32))
        maps = None
        if self.maps is not None:
            maps = self.maps.get(info.path, slice_num, num_low or contiguous_center_lines(mask), masked,
                                 info.padding)
        return TrainSample(masked_kspace=masked, mask=mask_t, num_low_frequencies=num_low, target=target,
                           max_value=info.max_value, crop_size=tuple(info.crop_size),
                           fname=info.path.name, slice_num=slice_num, sens_maps=maps)


def collate(samples: Sequence[TrainSample]) -> TrainSample:
    """Stack samples into a batch (see :class:`TrainSample` for the batched layouts). All
    samples must share k-space, target and crop shapes."""
    first = samples[0]
    for s in samples[1:]:
        if (s.masked_kspace.shape != first.masked_kspace.shape or s.target.shape != first.target.shape
                or tuple(s.crop_size) != tuple(first.crop_size)):
            raise ValueError(
                f"batch_size > 1 needs slices of one shape: {first.fname} has k-space "
                f"{tuple(first.masked_kspace.shape)}, target {tuple(first.target.shape)}, "
                f"crop {first.crop_size}; {s.fname} has {tuple(s.masked_kspace.shape)}, "
                f"{tuple(s.target.shape)}, {s.crop_size} (use data.batch_size=1)")
    return TrainSample(
        masked_kspace=torch.stack([s.masked_kspace for s in samples]),
        mask=torch.stack([s.mask for s in samples]).view(len(samples), 1, 1, -1),
        num_low_frequencies=torch.tensor([int(s.num_low_frequencies) for s in samples], dtype=torch.long),
        target=torch.stack([s.target for s in samples]),
        max_value=torch.tensor([float(s.max_value) for s in samples], dtype=torch.float32),
        crop_size=tuple(int(c) for c in first.crop_size),
        fname=[s.fname for s in samples],
        slice_num=torch.tensor([int(s.slice_num) for s in samples], dtype=torch.long),
        sens_maps=None if first.sens_maps is None else torch.stack([s.sens_maps for s in samples]))


class EpochSampler(Sampler[int]):
    """Indices for one epoch on one rank: a permutation seeded with ``seed + epoch`` (or the
    identity without ``shuffle``), padded by wrap-around to a multiple of ``num_replicas`` and
    split ``rank::num_replicas`` (as ``DistributedSampler``), optionally skipping the first
    ``skip`` indices (a resumed, half-finished epoch)."""

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 rank: int = 0, num_replicas: int = 1, skip: int = 0):
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, seed, epoch
        self.rank, self.num_replicas, self.skip = rank, num_replicas, skip
        self.per_rank = math.ceil(length / num_replicas)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / self.length))[:total]
        return order[self.rank:total:self.num_replicas][self.skip:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)


def worker_init(worker_id: int) -> None:
    """DataLoader workers: one torch thread each (the main process does the model's maths)."""
    torch.set_num_threads(1)


__all__ = ["SliceDataset", "FixedMapsCache", "default_fixed_maps", "MixedMaskSampler", "TrainSample", "VolumeInfo",
           "EpochSampler", "collate", "list_files",
           "read_volume_info", "resolve_target_key", "restrict_to_padding", "NOISE_FREE_TARGET",
           "FASTMRI_TARGET", "worker_init"]
