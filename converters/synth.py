"""The ``varnet synth`` job: write N simulated multi-coil volumes (fastMRI or ISMRMRD files).

Volume ``i`` is simulated by :func:`gadget.converters.simulate.simulate_volume` with its own seed drawn
from ``SeedSequence([seed, i])`` (so volumes differ, and any one is reproducible alone), and
written to ``OUT_DIR/synth_<source>_<orientation>_<iii>.h5``.

fastMRI format, per file (train/val layout, see :mod:`gadget.converters.simulate`): ``kspace`` complex64
``(slice, coil, 2·matrix, matrix)`` fully sampled; ``reconstruction_rss`` and
``target_noise_free`` float32 ``(slice, matrix, matrix)``; ``noise`` complex64 ``(coil, samples)``;
``ismrmrd_header``; attrs ``max``, ``norm``, ``acquisition`` (e.g. ``SIM_MNI_T1``), ``patient_id``.
With ``accelerations`` the k-space is undersampled with a fastMRI mask (one acceleration per
volume, drawn from the list; mask seeded per volume, shared by all slices) and the file also
carries ``mask`` and attrs ``acceleration``, ``num_low_frequency`` — the targets are kept.

ISMRMRD format: the fastMRI file is written to a temporary folder inside ``OUT_DIR`` and converted
by :func:`gadget.converters.fastmri_to_ismrmrd.convert_fastmri_to_ismrmrd` (the mask applied there).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .anatomy import CONTRASTS, SOURCES, load_anatomy
from .coils import check_num_coils
from .geometry import ORIENTATIONS
from .simulate import DEFAULT_SNR_DB, simulate_volume, write_fastmri

FORMATS = ("fastmri", "ismrmrd")
MASK_KINDS = ("random", "equispaced", "equispaced-fraction")
NOISE_READOUTS = 8  # noise-only samples per coil = NOISE_READOUTS × readout length


@dataclass(frozen=True)
class SynthConfig:
    """What to write. Sizes in voxels, SNR in dB (definition in :mod:`gadget.converters.simulate`)."""

    out_dir: Path
    source: str = "mni"
    volumes: int = 1
    slices: int = 16
    orientation: str = "axial"
    coils: int = 12
    matrix: int = 320
    snr_db: float = DEFAULT_SNR_DB
    seed: int = 0
    format: str = "fastmri"
    accelerations: tuple[float, ...] = ()
    mask: str = "equispaced-fraction"
    center_fraction: float = 0.08
    contrast: str = "t1w"
    fov_mm: Optional[float] = None
    threads: int = 1
    head: bool = False                          # domain-randomised whole heads (gadget.converters.headsim)
    head_sources: tuple[str, ...] = ("mni", "colin")
    matrix_limits: tuple[int, int] = (96, 384)  # head mode: image matrix range
    coil_limits: tuple[int, int] = (8, 32)      # head mode: coil count range
    snr_limits_db: tuple[float, float] = (15.0, 40.0)
    brain_only_fraction: float = 0.0            # head mode: share of skull-stripped volumes

    def __post_init__(self) -> None:
        _choice("source", self.source, SOURCES)
        _choice("orientation", self.orientation, tuple(ORIENTATIONS))
        _choice("format", self.format, FORMATS)
        _choice("mask", self.mask, MASK_KINDS)
        _choice("contrast", self.contrast, CONTRASTS)
        check_num_coils(self.coils)
        for name, low in (("volumes", 1), ("slices", 1), ("matrix", 16), ("threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.matrix % 2:
            raise ValueError(f"matrix must be even, got {self.matrix}")
        if not np.isfinite(self.snr_db):
            raise ValueError(f"SNR must be a finite number of dB, got {self.snr_db}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 < self.center_fraction < 1:
            raise ValueError(f"center fraction must be in (0, 1), got {self.center_fraction}")
        if not 0 <= self.brain_only_fraction <= 1:
            raise ValueError(f"brain-only fraction must be in [0, 1], got {self.brain_only_fraction}")
        for r in self.accelerations:
            if not r >= 1:
                raise ValueError(f"acceleration must be >= 1, got {r}")
        if self.head:
            from .tissue import HEAD_SOURCES

            if not self.head_sources:
                raise ValueError(f"no head source given; choose from {', '.join(HEAD_SOURCES)}")
            for src in self.head_sources:
                _choice("head source", src, HEAD_SOURCES)
        if self.fov_mm is not None and not self.fov_mm > 0:
            raise ValueError(f"field of view must be > 0 mm, got {self.fov_mm}")


def _choice(name: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")


def volume_name(config: SynthConfig, index: int) -> str:
    if config.head:
        return f"synth_head_{'-'.join(config.head_sources)}_{config.seed}_{index:04d}.h5"
    return f"synth_{config.source}_{config.orientation}_{index:03d}.h5"


def volume_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 32-bit seed for volume ``index`` (``stream`` 0: simulation, 1: mask)."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1)[0])


def volume_mask(config: SynthConfig, index: int, width: Optional[int] = None) -> tuple[np.ndarray, int, float] | None:
    """``(mask bool (width,), num_low_frequency, acceleration)`` for volume ``index`` (``width``
    phase columns, ``config.matrix`` when None), or None for full data."""
    if not config.accelerations:
        return None
    from gadget.mri.masks import MaskSampler, MaskSpec

    rng = np.random.default_rng(volume_seed(config.seed, index, 1))
    acceleration = float(config.accelerations[int(rng.integers(len(config.accelerations)))])
    acceleration = int(acceleration) if acceleration.is_integer() else acceleration
    sampler = MaskSampler(MaskSpec(config.mask, [config.center_fraction], [acceleration]))
    mask, num_low = sampler(width or config.matrix, seed=volume_seed(config.seed, index, 2))
    return mask, int(num_low), float(acceleration)


def run_synth(config: SynthConfig, progress: Optional[Callable[[int], None]] = None) -> list[Path]:
    """Write ``config.volumes`` files into ``config.out_dir``; returns their paths.

    Raises ``ValueError`` for bad settings, :class:`gadget.converters.anatomy.AnatomyUnavailable` when the
    anatomy files are missing, ``ImportError`` when the ISMRMRD converter is unavailable.
    """
    if not config.head:  # head sources are checked by SynthConfig; their files load per volume
        load_anatomy(config.source, config.contrast)  # fail before creating anything
    for index in range(config.volumes):
        volume_mask(config, index)                  # validate mask settings up front
    convert = _converter() if config.format == "ismrmrd" else None
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(config.volumes):
        path = out_dir / volume_name(config, index)
        (_write_head_volume if config.head else _write_volume)(config, index, path, convert, progress)
        written.append(path)
    return written


def _converter():
    from .fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd

    return convert_fastmri_to_ismrmrd


def _write_volume(config: SynthConfig, index: int, path: Path, convert, progress) -> None:
    vol = simulate_volume(
        config.slices, config.coils, (config.matrix, config.matrix), config.snr_db,
        seed=volume_seed(config.seed, index), noise_samples=NOISE_READOUTS * 2 * config.matrix,
        source=config.source, orientation=config.orientation, contrast=config.contrast,
        fov_mm=config.fov_mm, workers=config.threads, progress=progress)
    _write_simulated(config, index, path, vol, convert)


def _write_simulated(config: SynthConfig, index: int, path: Path, vol, convert) -> None:
    patient = f"synth-{'head' if config.head else config.source}-{config.seed}-{index:03d}"
    undersampling = volume_mask(config, index, vol.kspace.shape[-1])
    if convert is None:
        if undersampling is None:
            write_fastmri(path, vol, patient_id=patient, with_noise=True)
        else:
            mask, num_low, acceleration = undersampling
            write_fastmri(path, vol, mask=mask, num_low_frequency=num_low, acceleration=acceleration,
                          patient_id=patient, keep_targets=True, with_noise=True)
        return
    tmp_dir = Path(tempfile.mkdtemp(prefix=".synth-", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        write_fastmri(tmp, vol, patient_id=patient, with_noise=True)
        if undersampling is None:
            convert(tmp, path)
        else:
            convert(tmp, path, mask_kind=config.mask, acceleration=undersampling[2],
                    center_fraction=config.center_fraction, seed=volume_seed(config.seed, index, 2))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_head_volume(config: SynthConfig, index: int, path: Path, convert, progress) -> None:
    from .headsim import random_head_scan, simulate_head_volume

    rng = np.random.default_rng(volume_seed(config.seed, index))
    scan = random_head_scan(rng, config.head_sources, config.matrix_limits, config.coil_limits, config.snr_limits_db,
                            config.brain_only_fraction)
    vol = simulate_head_volume(scan, config.slices, rng, noise_samples=NOISE_READOUTS * 512,
                               workers=config.threads, progress=progress)
    _write_simulated(config, index, path, vol, convert)
