"""BART (Berkeley Advanced Reconstruction Toolbox) ``pics`` L1-wavelet reconstruction, run as a program.

BART is a separate C program (Debian/Ubuntu package ``bart``; tested with 0.8.00). This module
writes the k-space to BART's file format in a temporary directory, runs

    bart ecalib -m1 [-c CROP] [-r CALIB] kspace maps            # ESPIRiT maps, one set
    bart pics -S -l1 -r LAMBDA -i ITERS kspace maps image        # L1-wavelet compressed sensing

and reads the image back. ``-S`` rescales the result to the units of the input data (pics
normalises the data internally), so ``|image|`` is comparable with an RSS image.
BART runs with ``OMP_NUM_THREADS`` = ``threads`` (default 1): on 2 cores its OpenMP threads
otherwise make it about 9× slower.

File format (``.hdr`` + ``.cfl``): the header is the text ``# Dimensions\\n`` followed by the
dimensions separated by spaces; the data is complex64 (interleaved float32 real/imag) in
column-major (Fortran) order. BART's dimension 0 is readout, 1 phase, 2 partition (3-D phase),
3 coil — so one slice ``(coil, readout, phase)`` is stored as ``(readout, phase, 1, coil)``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .espirit import calibration_kernel

INSTALL_HINT = "install it with 'apt-get install bart' (Debian/Ubuntu) or from https://mrirecon.github.io/bart/"


class BartError(RuntimeError):
    """BART is missing or one of its commands failed; the message says which and why."""


@dataclass(frozen=True)
class BartConfig:
    """``lam``: L1-wavelet weight (``pics -r``, relative to BART's internal data scaling);
    ``iterations``: ``pics -i``; ``crop``: ``ecalib -c`` eigenvalue crop (None: BART's default);
    ``calib``: ``ecalib -r`` calibration size (None: BART's default, 24); ``threads``: OMP threads;
    ``binary``: program name or path; ``timeout``: seconds per command."""

    lam: float = 0.005   # the weight the project's quality bar names for BART pics-L1 (docs/results/held-out-matrix.md)
    iterations: int = 50
    crop: Optional[float] = None
    calib: Optional[int] = None
    threads: int = 1
    binary: str = "bart"
    timeout: float = 600.0


def find_bart(binary: str = "bart") -> Optional[str]:
    """Full path of the BART program, or ``None`` when it is not installed."""
    return shutil.which(binary)


def require_bart(binary: str = "bart") -> str:
    path = find_bart(binary)
    if path is None:
        raise BartError(f"BART program '{binary}' not found on PATH; {INSTALL_HINT}")
    return path


# ----------------------------------------------------------------------------- file format


def write_cfl(base: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` (any shape, BART's axis order) as ``base.hdr`` + ``base.cfl``."""
    array = np.asarray(array)
    dims = list(array.shape) or [1]
    with open(f"{base}.hdr", "w") as f:
        f.write("# Dimensions\n" + " ".join(str(d) for d in dims) + " \n")
    np.asarray(array, dtype=np.complex64).ravel(order="F").tofile(f"{base}.cfl")


def read_cfl(base: str | os.PathLike) -> np.ndarray:
    """Read ``base.hdr`` + ``base.cfl`` into a complex64 array of the header's dimensions
    (trailing singleton dimensions dropped)."""
    with open(f"{base}.hdr") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    try:
        at = lines.index("# Dimensions")
        dims = [int(d) for d in lines[at + 1].split()]
    except (ValueError, IndexError):
        raise BartError(f"{base}.hdr: no '# Dimensions' line followed by sizes") from None
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(f"{base}.cfl", dtype=np.complex64)
    if data.size != int(np.prod(dims)):
        raise BartError(f"{base}.cfl holds {data.size} values, header says {dims}")
    return data.reshape(dims, order="F")


def to_bart_slice(kspace: np.ndarray) -> np.ndarray:
    """``(coil, readout, phase)`` → BART ``(readout, phase, 1, coil)``."""
    k = np.asarray(kspace)
    if k.ndim != 3:
        raise ValueError(f"expected one slice (coil, readout, phase), got shape {k.shape}")
    return np.transpose(k, (1, 2, 0))[:, :, None, :]


# ----------------------------------------------------------------------------- running


def run_bart(args: Sequence[str], config: BartConfig = BartConfig(), cwd: Optional[str] = None) -> str:
    """Run ``bart ARGS...`` with ``OMP_NUM_THREADS`` set; returns stdout, raises :class:`BartError`."""
    exe = require_bart(config.binary)
    env = dict(os.environ, OMP_NUM_THREADS=str(config.threads))
    try:
        done = subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=config.timeout)
    except subprocess.TimeoutExpired:
        raise BartError(f"'bart {' '.join(args)}' did not finish in {config.timeout:.0f} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise BartError(f"'bart {' '.join(args)}' failed (exit {done.returncode}): "
                        f"{detail[-1] if detail else 'no output'}")
    return done.stdout


DEFAULT_ECALIB_KERNEL = 6  # BART ecalib's default kernel width


def pics_l1(kspace: np.ndarray, config: BartConfig = BartConfig(), num_low: Optional[int] = None) -> np.ndarray:
    """BART ESPIRiT + ``pics`` L1-wavelet of one slice.

    Args:
        kspace: complex ``(coil, readout, phase)``, zeros at unsampled positions (BART infers the
            sampling pattern from the zeros; ecalib finds the fully sampled centre itself).
        num_low: width of the fully sampled centre, when known; with fewer than 10 lines ecalib's kernel
            is shrunk as our ESPIRiT's is (:func:`gadget.baselines.espirit.calibration_kernel`).

    Returns:
        complex64 image ``(readout, phase)`` in the units of ``kspace`` (``|image|`` ~ RSS).
    """
    require_bart(config.binary)
    with tempfile.TemporaryDirectory(prefix="varnet-bart-") as tmp:
        write_cfl(Path(tmp) / "kspace", to_bart_slice(kspace))
        ecalib = ["ecalib", "-m1"]
        if config.crop is not None:
            ecalib += ["-c", f"{config.crop:g}"]
        if config.calib is not None:
            ecalib += ["-r", str(int(config.calib))]
        if num_low is not None and num_low < 2:
            raise BartError(f"BART ESPIRiT needs at least 2 fully sampled centre lines, got {num_low}")
        # ours and BART's ESPIRiT alike: a kernel nearly as wide as the ACS block leaves the maps cropped
        # inside the head (one as wide as 5 lines aborts BART 0.8)
        ksize = DEFAULT_ECALIB_KERNEL if num_low is None else calibration_kernel(num_low, DEFAULT_ECALIB_KERNEL)
        if ksize < DEFAULT_ECALIB_KERNEL:
            ecalib += ["-k", f"{ksize}:{ksize}:1"]
        run_bart([*ecalib, "kspace", "maps"], config, cwd=tmp)
        run_bart(["pics", "-S", "-l1", "-r", f"{config.lam:g}", "-i", str(int(config.iterations)),
                  "kspace", "maps", "image"], config, cwd=tmp)
        image = read_cfl(Path(tmp) / "image")
    return image.reshape(image.shape[0], image.shape[1])
