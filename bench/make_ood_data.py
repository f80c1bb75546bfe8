"""Out-of-distribution test sets that no `varnet synth` source or coil model produced (issue 13).

* ``bart/``: BART's analytic phantoms in k-space with BART's own coil sensitivities
  (``bart phantom -k -s C -x N``; Shepp-Logan and the geometric phantom), no readout
  oversampling, complex Gaussian noise added at the given SNR (definition of
  :mod:`converters.simulate`); one slice per file.
* ``ismrmrd/``: ismrmrd-tools' Shepp-Logan raw files (``ismrmrd_generate_cartesian_shepp_logan``,
  2× readout oversampling, its own coil model and noise), converted with our ISMRMRD → fastMRI
  converter.

Both are fully sampled fastMRI-layout files; `varnet compare --acceleration R` undersamples them.
Usage: ``python bench/make_ood_data.py OUT_DIR`` (needs Debian ``bart`` and ``ismrmrd-tools``).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from converters.simulate import SimulatedVolume, correlated_noise, kspace_to_rss, noise_sigma, write_fastmri
from gadget.baselines.bart import read_cfl, run_bart


def rss(kspace: np.ndarray) -> np.ndarray:
    """``(slice, coil, readout, phase)`` → RSS images ``(slice, readout, phase)`` float32, uncropped."""
    return np.stack([kspace_to_rss(k, k.shape[-2]) for k in kspace])


def bart_case(out: Path, name: str, size: int, coils: int, extra: list[str], snr_db: float, seed: int) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        run_bart(["phantom", "-k", "-s", str(coils), "-x", str(size), *extra, f"{tmp}/k"])
        k = read_cfl(f"{tmp}/k")                         # (x, y, coils) after dropping singletons
    k = np.moveaxis(k.reshape(size, size, -1), -1, 0)[None].astype(np.complex64)   # (1, coil, read, phase)
    k /= np.abs(k).max()
    clean = rss(k)
    sigma = noise_sigma(clean, snr_db)
    rng = np.random.default_rng(seed)
    cov = np.eye(coils) * sigma ** 2
    noisy = (k + correlated_noise(k.shape[1:], cov, rng)[None]).astype(np.complex64)
    vol = SimulatedVolume(noisy, clean, rss(noisy), correlated_noise((coils, 4096), cov, rng), cov,
                          acquisition=f"BART_{name.upper()}", fov_mm=(220.0, 220.0), snr_db=snr_db, sigma=sigma)
    path = out / f"bart_{name}_{size}_{coils}ch.h5"
    write_fastmri(path, vol, patient_id=f"bart-{name}")
    return path


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
    for i, (name, size, coils, extra) in enumerate([("shepplogan", 160, 8, []), ("shepplogan", 192, 8, ["-r", "3"]),
                                                     ("geometric", 192, 8, ["-G"])]):
        print(bart_case(out / "bart", name, size, coils, extra, 30.0, seed=i))
    for matrix, coils in ((128, 8), (192, 12)):
        for p in ismrmrd_case(out / "ismrmrd", matrix, coils):
            print(p)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/ood")
