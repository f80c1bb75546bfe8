"""Noise prewhitening from noise-measurement acquisitions (the step Gadgetron's NoiseAdjustGadget does).

Noise lines (ACQ_IS_NOISE_MEASUREMENT) are collected and consumed; at the first other
acquisition the coil noise covariance ``C_n = X Xᴴ / (N - 1)`` (X: complex ``(coil, samples)``)
is estimated and every later line's data becomes ``W · data``. A scan without noise lines
passes unchanged.

What the whitening scales to (``units``):

* ``"scan"`` (the pipeline's; the default): ``W = sqrt(mean(diag C_n)) · L⁻¹`` with
  ``C_n = L Lᴴ`` (Cholesky). Whitened imaging noise has covariance ``mean(diag C_a) · I``,
  where ``C_a`` is the imaging lines' own noise covariance: coils decorrelated, the imaging
  data's average per-coil noise variance unchanged. ``W`` does not change when ``C_n`` is
  multiplied by a constant, so this level is the same whether the noise scan was measured at
  the imaging dwell time or at another one (receiver noise variance ∝ 1/dwell: ``C_a = C_n ·
  d_n / d_a``): the dwell times and the receiver noise bandwidth cancel exactly and need no
  correction here. They are still read, checked and logged (with Gadgetron's factor below).
* ``"gadgetron"`` (NoiseAdjustGadget's absolute scaling, for comparison with Gadgetron output):
  ``W = s · L⁻¹`` with ``s = sqrt(2 · d_a / d_n · b)``, ``d_a``/``d_n`` the imaging/noise dwell
  times (AcquisitionHeader ``sample_time_us``), ``b`` the relative receiver noise bandwidth;
  ``s = 1`` when either dwell time is 0. With ``C_a = C_n · d_n / d_a`` the whitened imaging
  noise covariance is ``2 · b · I`` whatever the noise dwell time.
  (Source of the formula, a fact: Gadgetron ``NoiseAdjustGadget.cpp``, ``calculate_scale_factor``
  / ``noise_bw_scale_factor_``; ``b`` from the header's
  ``acquisitionSystemInformation/relativeReceiverNoiseBandwidth``, default 0.793.)
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Iterator, Optional

import numpy as np

from .types import FLAG_IS_NOISE, AcqLine

log = logging.getLogger(__name__)

UNITS = ("scan", "gadgetron")
BANDWIDTH_PATH = "acquisitionSystemInformation/relativeReceiverNoiseBandwidth"


class NoiseError(ValueError):
    pass


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """``samples`` complex ``(coil, N)`` → Hermitian ``(coil, coil)`` (complex128)."""
    x = samples.astype(np.complex128)
    x = x - x.mean(axis=1, keepdims=True)
    return (x @ x.conj().T) / max(x.shape[1] - 1, 1)


def _cholesky(cov: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise NoiseError("noise covariance is not positive definite (too few noise samples or a dead "
                         "channel); disable prewhitening or fix the noise scan") from None


def whitening_matrix(cov: np.ndarray, scale: float | None = None) -> np.ndarray:
    """``W = scale · L⁻¹`` (``C = L Lᴴ``), so ``W C Wᴴ = scale² · I``; complex64 ``(coil, coil)``. The default
    scale ``sqrt(mean(diag C))`` gives the ``"scan"`` units (``W C Wᴴ = mean(diag C) · I``)."""
    if scale is None:
        scale = float(np.sqrt(np.mean(np.real(np.diag(cov)))))
    return (scale * np.linalg.inv(_cholesky(cov))).astype(np.complex64)


def dwell_scale(acq_dwell_us: float, noise_dwell_us: float, bandwidth_ratio: float) -> float:
    """Gadgetron's noise bandwidth factor ``sqrt(2 · acq_dwell / noise_dwell · bandwidth_ratio)``
    (dimensionless; dwell times in µs); 1.0 when either dwell time is 0 (unknown), as Gadgetron does."""
    if acq_dwell_us < 0 or noise_dwell_us < 0 or not 0 < bandwidth_ratio <= 1:
        raise NoiseError(f"dwell times must be >= 0 and the receiver noise bandwidth ratio in (0, 1]; got "
                         f"acquisition {acq_dwell_us} us, noise {noise_dwell_us} us, ratio {bandwidth_ratio}")
    if acq_dwell_us == 0 or noise_dwell_us == 0:
        return 1.0
    return math.sqrt(2.0 * acq_dwell_us / noise_dwell_us * bandwidth_ratio)


def receiver_noise_bandwidth(header_xml: str | bytes, default: float, source: str = "header") -> tuple[float, str]:
    """``(ratio, where it came from)``: the header's ``relativeReceiverNoiseBandwidth`` when present,
    else ``default`` (ReconConfig.noise_bandwidth_ratio). A present but unusable value is an error."""
    from ..data.mrd_header import parse_xml

    el = parse_xml(header_xml, source).find(BANDWIDTH_PATH)
    if el is None or el.text is None or not el.text.strip():
        return float(default), "config noise_bandwidth_ratio"
    try:
        value = float(el.text.strip())
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise NoiseError(f"{source}: header field '{BANDWIDTH_PATH}' = {el.text.strip()!r} is not a number in (0, 1]")
    return value, "header"


def _dwell(line: AcqLine) -> float:
    return float(line.head["sample_time_us"])


class _Whitener:
    """The matrices for one noise scan: one per imaging dwell time (only ``"gadgetron"`` units differ)."""

    def __init__(self, noise: list[AcqLine], enabled: bool, bandwidth_ratio: float, units: str):
        samples = np.concatenate([n.data for n in noise], axis=1)
        dwells = sorted({_dwell(n) for n in noise})
        if len(dwells) > 1:
            log.warning("noise lines have different dwell times %s us; the first line's (%g us) is used, as "
                        "Gadgetron does", dwells, _dwell(noise[0]))
        self.noise_dwell = _dwell(noise[0])
        self.cov = noise_covariance(samples)
        self.enabled, self.bandwidth_ratio, self.units = enabled, bandwidth_ratio, units
        self._by_dwell: dict[float, np.ndarray] = {}
        log.info("noise: %d samples x %d coils, dwell %g us, receiver noise bandwidth ratio %g, prewhitening %s",
                 samples.shape[1], self.cov.shape[0], self.noise_dwell, bandwidth_ratio,
                 f"on ({units} units)" if enabled else "off (config)")

    def matrix(self, acq_dwell: float) -> np.ndarray:
        """complex64 ``(coil, coil)`` for imaging lines of dwell time ``acq_dwell`` (µs)."""
        found = self._by_dwell.get(acq_dwell)
        if found is None:
            s = dwell_scale(acq_dwell, self.noise_dwell, self.bandwidth_ratio)
            found = whitening_matrix(self.cov, s if self.units == "gadgetron" else None)
            self._by_dwell[acq_dwell] = found
            log.info("noise: imaging dwell %g us, noise dwell %g us: Gadgetron's factor sqrt(2*%g/%g*%g) = %.4f %s",
                     acq_dwell, self.noise_dwell, acq_dwell, self.noise_dwell, self.bandwidth_ratio, s,
                     "applied" if self.units == "gadgetron" else
                     "not needed (scan units: the whitened imaging noise keeps the imaging data's mean coil variance)")
        return found


def prewhiten(lines: Iterable, enabled: bool = True, bandwidth_ratio: float = 0.793,
              units: str = "scan") -> Iterator:
    """Generator stage over pipeline items: consumes noise lines, whitens the acquisitions after
    them, passes everything else through unchanged. ``bandwidth_ratio``: the relative receiver noise
    bandwidth (:func:`receiver_noise_bandwidth`); ``units``: what the whitened noise level is (module
    docstring)."""
    if units not in UNITS:
        raise NoiseError(f"prewhitening units {units!r} must be one of {', '.join(UNITS)}")
    dwell_scale(0.0, 0.0, bandwidth_ratio)  # validates the ratio before any line is read
    noise: list[AcqLine] = []
    whitener: Optional[_Whitener] = None
    for item in lines:
        if not isinstance(item, AcqLine):
            yield item
            continue
        if item.has_flag(FLAG_IS_NOISE):
            if whitener is not None:
                log.warning("noise acquisition after imaging data ignored")
            else:
                noise.append(item)
            continue
        if noise and whitener is None:
            channels = {n.data.shape[0] for n in noise}
            if len(channels) != 1 or item.data.shape[0] not in channels:
                raise NoiseError(f"noise scan has {sorted(channels)} channels but data has {item.data.shape[0]}")
            whitener = _Whitener(noise, enabled, bandwidth_ratio, units)
            noise = []
        if whitener is not None and enabled:
            matrix = whitener.matrix(_dwell(item))
            if item.data.shape[0] != matrix.shape[0]:
                raise NoiseError(f"acquisition has {item.data.shape[0]} channels, noise scan had {matrix.shape[0]}")
            item = AcqLine(item.head, matrix @ item.data, item.traj)
        yield item
