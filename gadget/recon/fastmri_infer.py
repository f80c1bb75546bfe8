"""fastMRI challenge-style inference over test-format files (undersampled ``kspace`` + ``mask``).

Matches fastMRI's pretrained-VarNet inference path: the mask is zeroed outside the header's
acquired phase range, the image is center-cropped to ``reconSpace`` — or to ``(W, W)`` when
the image is narrower than the crop (some brain FLAIR files).
"""
from __future__ import annotations

import logging
from typing import Callable, Literal, Optional

import numpy as np

from ..data.fastmri_file import FastMRIFileError, FastMRIVolume
from ..mri.masks import AcsLinesError, acs_lines
from ..mri.metrics import center_crop
from ..mri.parallel import in_workers
from .engine import Reconstructor

log = logging.getLogger(__name__)
AcsSource = Literal["auto", "attrs", "mask"]


def crop_size_for(image_shape: tuple[int, int], recon_size: tuple[int, int]) -> tuple[int, int]:
    h, w = recon_size
    if image_shape[-1] < w:
        return image_shape[-1], image_shape[-1]
    return h, w


def acquired_mask(volume: FastMRIVolume) -> np.ndarray:
    """The file's mask restricted to the header's acquired phase range, bool ``(phase,)``."""
    if volume.mask is None:
        raise FastMRIFileError(f"{volume.path}: no 'mask' dataset; inference expects test-format "
                               "(undersampled) files")
    left, right = volume.encoding.padding
    mask = volume.mask.copy()
    mask[:max(left, 0)] = False
    mask[max(right, 0):] = False
    return mask


def acs_count(volume: FastMRIVolume, mask: np.ndarray, source: AcsSource = "auto") -> int:
    """ACS lines: ``attrs`` = the file's ``num_low_frequency``; ``mask`` = fastMRI's detection
    (``2*min(left, right)``, reproduces the reference); ``auto`` = the attribute when present, else the
    run of sampled columns containing the centre column ``W // 2`` (the whole width for a full mask,
    where detection gives 1), else — centre column unsampled — detection, logged. The rule is
    :func:`gadget.mri.masks.acs_lines`."""
    def logged():
        log.warning("%s: no num_low_frequency attribute and the centre column %d is not sampled: ACS count from "
                    "fastMRI's detection", volume.path.name, mask.size // 2)

    given = volume.num_low_frequency if source in ("auto", "attrs") else None
    try:
        return acs_lines(mask, given, required=source == "attrs",
                         fallback="run-or-detect" if source == "auto" else "detect", on_detect=logged)
    except AcsLinesError:  # only "missing": neither fallback raises
        raise FastMRIFileError(f"{volume.path}: attribute 'num_low_frequency' missing (use --acs mask)") from None


def reconstruct_volume(engine: Reconstructor, volume: FastMRIVolume, batch_size: int = 1,
                       acs_source: AcsSource = "auto",
                       on_batch: Optional[Callable[[int], None]] = None, workers: int = 1) -> np.ndarray:
    """Reconstruct every slice; returns float32 ``(slice, H, W)`` cropped as fastMRI does. ``engine``: any
    callable ``engine(kspace, mask, acs) -> images``: a :class:`Reconstructor` (the network's images) or a
    :class:`gadget.recon.refine_stage.RefinedEngine` (the network, then the refine stage). ``workers``:
    batches reconstructed side by side (:func:`gadget.mri.parallel.in_workers`; the engine must allow that
    many concurrent forwards, else they queue)."""
    mask = acquired_mask(volume)
    num_low = acs_count(volume, mask, acs_source)
    log.info("%s: %d slices, kspace %s, %d of %d lines sampled, ACS %d (%s)", volume.path.name,
             volume.num_slices, tuple(volume.kspace.shape), int(mask.sum()), mask.size, num_low, acs_source)

    def batch(start: int) -> tuple[int, int, np.ndarray]:
        stop = min(start + batch_size, volume.num_slices)
        return start, stop, engine(volume.kspace[start:stop], mask, num_low)

    out = None
    for start, stop, images in in_workers(batch, range(0, volume.num_slices, batch_size), workers):
        crop = crop_size_for(images.shape[-2:], volume.encoding.recon_size)
        if out is None:
            out = np.full((volume.num_slices, *crop), np.nan, np.float32)  # NaN exposes a missed write
        out[start:stop] = center_crop(images, crop)
        if on_batch:
            on_batch(stop - start)
    return out
