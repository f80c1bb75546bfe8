"""Out-of-distribution test sets that no `varnet synth` source or coil model produced
(docs/results/held-out-matrix.md).

* ``bart/``: BART's analytic phantoms in k-space with BART's own coil sensitivities
  (``bart phantom -k -s C -x N``; Shepp-Logan and the geometric phantom), no readout
  oversampling, complex Gaussian noise added at the given SNR (definition of
  :mod:`gadget.converters.simulate`); one slice per file.
* ``brain/``: real T1 intensities of INIA19 (``inia19-t1-brain.nii.gz``, an anatomy no training
  source contains), axial slices scaled to human size in a 256×256 field of view that holds the
  whole brain, times a 10-coil birdcage model (:func:`birdcage_sensitivities`), a smooth image phase,
  30 dB SNR; like a held-out brain slice of a real 10-coil scan (256×256); one slice per file.
* ``brain_clean/``: the same slices at 80 dB SNR (practically noise-free): a model that paints
  the noise floor of its training data into the background shows here.
* ``ismrmrd/``: ismrmrd-tools' Shepp-Logan raw files (``ismrmrd_generate_cartesian_shepp_logan``,
  2× readout oversampling, its own coil model and noise), converted with our ISMRMRD → fastMRI
  converter.

Both are fully sampled fastMRI-layout files; `varnet compare --acceleration R` undersamples them.
Usage: ``python experiments/generalisation/scripts/make_ood_data.py OUT_DIR`` (needs Debian ``bart`` and
``ismrmrd-tools``).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gadget.converters.simulate import (SimulatedVolume, centred_fft, correlated_noise, kspace_to_rss,
                                        noise_sigma, write_fastmri)
from gadget.baselines.bart import read_cfl, run_bart
from gadget.converters.heldout import birdcage_sensitivities, inia_t1_slice


def rss(kspace: np.ndarray) -> np.ndarray:
    """``(slice, coil, readout, phase)`` → RSS images ``(slice, readout, phase)`` float32, uncropped."""
    return np.stack([kspace_to_rss(k, k.shape[-2]) for k in kspace])


def bart_case(out: Path, name: str, size: int, coils: int, extra: list[str], snr_db: float, seed: int) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        run_bart(["phantom", "-k", "-s", str(coils), "-x", str(size), *extra, f"{tmp}/k"])
        k = read_cfl(f"{tmp}/k")                         # (x, y, coils) after dropping singletons
    k = np.moveaxis(k.reshape(size, size, -1), -1, 0)                    # (coil, read, phase)
    return write_noisy_slice(out / f"bart_{name}_{size}_{coils}ch.h5", k, snr_db, np.random.default_rng(seed),
                             f"BART_{name.upper()}", (220.0, 220.0), f"bart-{name}")


def write_noisy_slice(path: Path, kspace: np.ndarray, snr_db: float, rng: np.random.Generator, acquisition: str,
                      fov_mm: tuple[float, float], patient_id: str) -> Path:
    """One noise-free slice ``(coil, read, phase)``, scaled to max |k| = 1, with white coil noise
    at ``snr_db`` added, written as a fully sampled fastMRI file with both targets."""
    k = (kspace / np.abs(kspace).max())[None].astype(np.complex64)
    coils = k.shape[1]
    clean = rss(k)
    sigma = noise_sigma(clean, snr_db)
    cov = np.eye(coils) * sigma ** 2
    noisy = (k + correlated_noise(k.shape[1:], cov, rng)[None]).astype(np.complex64)
    vol = SimulatedVolume(noisy, clean, rss(noisy), correlated_noise((coils, 4096), cov, rng), cov,
                          acquisition=acquisition, fov_mm=fov_mm, snr_db=snr_db, sigma=sigma)
    write_fastmri(path, vol, patient_id=patient_id)
    return path


def brain_case(out: Path, fraction: float, size: int, coils: int, snr_db: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = inia_t1_slice(fraction, size)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    phase = (rng.uniform(-np.pi, np.pi) + rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx
             + rng.uniform(-1, 1) * yy * xx)
    coil_images = birdcage_sensitivities(size, coils) * (image * np.exp(1j * phase))[None]
    k = centred_fft(centred_fft(coil_images, -2), -1)
    return write_noisy_slice(out / f"brain_inia_t1_{int(round(fraction * 100)):02d}_{size}_{coils}ch.h5", k, snr_db,
                             rng, "INIA19_T1_BIRDCAGE", (float(size), float(size)), "inia19-t1")


def ismrmrd_case(out: Path, matrix: int, coils: int) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "sl.h5"
        subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-o", str(raw), "-m", str(matrix), "-c",
                        str(coils), "-n", "0.02", "-C"], check=True, capture_output=True)
        target = out / f"ismrmrd_sl_{matrix}_{coils}ch.h5"
        subprocess.run([sys.executable, "-m", "gadget.cli", "convert", "ismrmrd-to-fastmri", str(raw), str(target)],
                       check=True, capture_output=True)
    return sorted(out.glob(f"ismrmrd_sl_{matrix}_{coils}ch*.h5"))


def main(out_dir: str) -> None:
    out = Path(out_dir)
    (out / "bart").mkdir(parents=True, exist_ok=True)
    (out / "ismrmrd").mkdir(parents=True, exist_ok=True)
    for folder, snr_db in (("brain", 30.0), ("brain_clean", 80.0)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i, fraction in enumerate((0.45, 0.55, 0.65, 0.75)):
            print(brain_case(out / folder, fraction, 256, 10, snr_db, seed=10 + i))
    for i, (name, size, coils, extra) in enumerate([("shepplogan", 160, 8, []), ("shepplogan", 192, 8, ["-r", "3"]),
                                                     ("geometric", 192, 8, ["-G"])]):
        print(bart_case(out / "bart", name, size, coils, extra, 30.0, seed=i))
    for matrix, coils in ((128, 8), (192, 12)):
        for p in ismrmrd_case(out / "ismrmrd", matrix, coils):
            print(p)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/ood")
