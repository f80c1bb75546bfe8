"""Parallel-imaging refinement of the network's image ("pi" refine).

Why: on held-out simulated anatomy the shipped network stays far from BART pics-L1 where parallel
imaging alone is reliable (high SNR, smooth coils, 4×; docs/results/refinement.md). Its six cascades
take six gradient steps on the data; a SENSE solve takes as many as the coils need. This stage
finishes what the cascades started, with the network's image as the prior:

    x̂ = argmin_x ||M F S x − y||² + λ ||x − x₀||²   ⇔   (AᴴA + λ I) x = Aᴴ y + λ x₀,   A = M F S,

solved by conjugate gradients (how: "The solve" below), where

- ``S`` are ESPIRiT's maps from the measured calibration lines where they cover the network's object
  (:func:`choose_maps`), else maps taken from the network's own final coil images: on whole heads
  with elements close to the scalp ESPIRiT's maps are cropped inside the brain and SENSE returns a
  dark interior. Those are the coil images low-passed by a Gaussian of width ``smooth`` × the matrix
  in k-space, divided by their RSS. Either way ``Σ|S|² = 1`` where there is signal and ``||AᴴA|| ≤ 1``;
- ``x₀ = Σ conj(S) · c`` is the network's coil images ``c`` combined with those maps;
- λ is ``lam``, or with ``lam = 0`` ("auto") ``κ · (σ / s)²`` clipped to [floor, ``lam_max``], the
  floor ``lam_min`` with ESPIRiT's maps and ``lam_min_network`` with the network's, with σ the noise
  level estimated from the outer readout samples of the measured lines (a robust median: |n| of
  complex Gaussian noise has median σ·√ln2; exact zeros, never measured, left out) and s the mean of
  |x₀| over the object: noisy data lean on the network, clean data on the measurements.

The image sent blends two readings of the solve, weighted by ``w = floor / λ`` (≤ 1): ``w · |x̂|``
plus ``(1 − w)`` times the network's RSS image with the change the solve made to the magnitude,
``rss + |x̂| − |x₀|`` (≥ 0). The second keeps the network's background where the maps vanish, and the
noise it removed there; on noisy data (λ large, w small) it is what is sent. On noise-free data (λ at
its floor, w = 1) the measurements are trusted outright and ``|x̂|`` is sent: there the solve's own
image beat the second reading. It gains most on clean data with smooth coils and costs a little on
noisy whole heads (measured noise put back where the network had removed it, and ESPIRiT's maps of
elements at the scalp); the gains and costs per held-out set, and the sweeps behind every default
below, are in docs/results/refinement.md.

The solve. The mask selects phase columns and every readout sample of a sampled column is measured, so
after a Fourier transform along the readout the problem falls apart into one independent 1-D SENSE
problem per readout row (:class:`RowSense`). CG runs on all rows at once but with each row's own step
lengths and stopping point (:func:`row_conjugate_gradient`: a row leaves once its residual fell to
:data:`ROW_TOLERANCE` of its first, at the latest after ``iterations`` steps), started from the
network's image ``x₀``; each step is two 1-D transforms per coil, no centring shifts (the rolled frame,
:class:`RowSense`). Rows where the maps are zero (ESPIRiT's outside the calibrated object, e.g. across
the readout oversampling) have ``x₀ = 0``, which is their solution (:func:`solve_rows`), so ``x₀`` and
``Aᴴy`` are formed on the solve's rows alone (:func:`rolled_row_images`; the prior from the network's own
final coil images where the engine hands them over). Each row is solved on its few virtual coils, the
leading singular vectors of its maps (:func:`row_coil_basis`: coil sensitivities are smooth along a row).
The result is the 2-D CG's solution (tests/test_refine.py); the cost against the former 2-D CG from zero
and the unchanged figures are in docs/results/performance.md, "The refinement". Slices of fewer than
:data:`SERIAL_REFINE_BELOW` coil-stack values are refined on one intra-op thread, larger ones on all.

Layouts: k-space and coil tensors complex ``(batch, coil, readout, phase)``; mask bool, broadcastable
to it (``(phase,)`` or ``(batch, 1, 1, phase)``); images real ``(batch, readout, phase)``.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage
from scipy.special import gammaincinv

from ..baselines.espirit import (MIN_PHASE_POSITIONS, Calibration, EspiritConfig, calibrated_maps,
                                 espirit_calibration, hermitian_eigh, per_slice_counts)
from ..mri.coils import noise_level, outer_readout
from ..mri.fft import ifft2c
from ..mri.masks import contiguous_center_lines
from ..model.checkpoint import REFINE_MODES
from ..mri.parallel import serial
from . import sparse

log = logging.getLogger(__name__)

#: The stage's modes: the two a config or checkpoint may name, and ``cs`` (:mod:`gadget.recon.sparse`), whose
#: weights a scan's own lines choose (``adapt: solve``; gadget/train/solve_calibration.py).
STAGE_MODES = REFINE_MODES + ("cs",)
MAP_SOURCES = ("auto", "network", "espirit")
#: What the ``cs`` stage sends where its maps vanish (ESPIRiT's, cropped outside the calibrated object): the
#: network's image, or that image capped at the noise floor (:func:`noise_floor`) outside the region the maps
#: enclose and a margin (:func:`map_exterior`). ESPIRiT finds no coil-consistent signal there, so what rises
#: above the noise there is the network's aliasing, unless the crop cut into the object: a scan's held-back
#: lines choose (gadget/train/solve_calibration.py). Holes inside the maps' region (at 8× ESPIRiT's eigenvalue can
#: dip inside an object) keep the network's image either way.
CS_OUTSIDE = ("network", "capped")
#: The quantile of the RSS of pure noise :func:`noise_floor` gives: a pixel of noise alone exceeds it once
#: in a thousand.
NOISE_FLOOR_QUANTILE = 0.999
#: Pixels beside the maps' region that :func:`map_exterior` leaves out: ESPIRiT's crop can fall a pixel or two
#: inside the object's edge, and capping right up to the maps cut into the head of a held-out brain at 8×
#: (docs/results/adaptation.md, "Where the maps vanish").
EXTERIOR_MARGIN = 2
#: ESPIRiT as the baselines run it, except: the eigenproblems on a 4× coarser grid of at most 48 points
#: per axis (the maps barely move and ESPIRiT gets several times cheaper), the calibration's
#: eigen-decomposition in complex64 (the same maps, half the work), and the maps cropped where the top
#: eigenvalue is below 0.9, not 0.95. With 10 calibration lines (8×) the eigenvalue falls below 0.95 inside the object's edge, and the
#: solve leaves bright folded bands there; 0.9 was best at 8× and close to best at 4× (the crop sweep:
#: docs/results/refinement.md). Its kernel shrinks only to the calibration block (``phase_positions`` 1):
#: the ``pi`` stage's map choice was measured so, and with the baselines' narrower kernel for few lines
#: ESPIRiT's maps of scalp-hugging coils can pass the coverage test and be wrong (docs/results/adaptation.md,
#: "ESPIRiT with few calibration lines").
REFINE_ESPIRIT = EspiritConfig(step=4, crop=0.9, single=True, max_grid=48, phase_positions=1)
#: ESPIRiT where a scan's held-back lines judge its maps (``maps: espirit``, the ``cs`` stage of ``adapt:
#: solve``): the baselines' kernel rule for few calibration lines (:func:`gadget.baselines.espirit.calibration_kernel`),
#: calibrated on the coils scaled to one noise level (``equalise_noise``).
SOLVE_ESPIRIT = replace(REFINE_ESPIRIT, phase_positions=MIN_PHASE_POSITIONS, equalise_noise=True)
#: The eigenvalue that decides whether ESPIRiT's maps are used at all (:func:`choose_maps`): where it is
#: below 0.95 over more than a tenth of the object, on whole heads with elements at the scalp, the
#: network's maps did better than ESPIRiT's, and deciding at 0.9 instead lost PSNR there (the solve itself
#: crops at 0.9 either way; docs/results/refinement.md).
COVERAGE_CROP = 0.95
#: With ``maps: espirit`` (the ``cs`` stage, whose held-back lines compare ESPIRiT's maps with the network's):
#: the largest share of the calibration matrix's dimensions ESPIRiT's signal subspace may span for its maps
#: to be used (:func:`choose_maps`). Where noise fills the subspace its eigenvalue is near 1 everywhere, the
#: maps are noise, and the held-back lines, noise too, cannot tell (docs/results/adaptation.md, "ESPIRiT with
#: few calibration lines").
MAX_SIGNAL_SHARE = 1 / 3
#: Coil-stack size (values) below which the whole stage runs on one intra-op thread: on two cores a
#: 10×512×256 slice refines faster on one (160 vs 172 ms), a 16×640×320 one on two (342 vs 438 ms;
#: docs/results/performance.md, "The refinement").
SERIAL_REFINE_BELOW = 1 << 21


@dataclass(frozen=True)
class RefineConfig:
    """``mode``: ``pi`` (the solve above) or ``none`` (the network's image as it is). ``lam``: λ, or
    0 for the noise-adaptive choice. ``kappa``, ``lam_min``, ``lam_min_network``, ``lam_max``: that
    choice (κ = 300 puts λ near 0.3 at 30 dB, the noisy held-out brain's best). The floor depends on
    the maps, as the solve can trust them only as far as they are right. With ESPIRiT's, 0.005 and at
    most 30 CG ``iterations`` (per row; rows stop earlier at :data:`ROW_TOLERANCE`): a higher floor or
    fewer steps lost PSNR on the noise-free held-out brain, a lower floor with more steps cost SSIM at
    8×, and more than 30 steps changed almost nothing. With the
    network's low-passed maps, 0.02: 0.005 did worse on a noise-free brain at 8× (tests/test_shipped.py).
    The sweeps: docs/results/refinement.md. ``smooth``: map low-pass
    width as a fraction of the matrix. ``maps``: ``auto`` (ESPIRiT where it covers the object, else the
    network's maps; :func:`choose_maps`), ``network``, or ``espirit`` (ESPIRiT's wherever its calibration
    has a null space, the coverage not judged: what ``adapt: solve`` picks where the held-back lines
    prefer them); ``coverage``: the share of the object ESPIRiT must vouch for (:func:`espirit_coverage`).
    ``cs_lambda``, ``cs_mu``, ``cs_iterations``, ``cs_wavelet``: the ``cs`` mode's pull to the network's
    image, sparsity weight, FISTA steps and wavelet (:mod:`gadget.recon.sparse`; chosen per scan by
    :func:`gadget.train.solve_calibration.calibrate_solve`); ``cs_outside``: what it sends where the maps
    vanish (:data:`CS_OUTSIDE`)."""

    mode: str = "pi"
    lam: float = 0.0
    kappa: float = 300.0
    lam_min: float = 0.005
    lam_min_network: float = 0.02
    lam_max: float = 1.0
    smooth: float = 0.05
    iterations: int = 30
    maps: str = "auto"
    coverage: float = 0.9
    cs_lambda: float = 0.0
    cs_mu: float = 0.0
    cs_iterations: int = 60
    cs_wavelet: str = "db2"
    cs_outside: str = "network"

    def __post_init__(self):
        if self.mode not in STAGE_MODES:
            raise ValueError(f"refine must be one of {', '.join(STAGE_MODES)}, got {self.mode!r}")
        if not (self.cs_lambda >= 0 and self.cs_mu >= 0 and self.cs_iterations >= 1):
            raise ValueError(f"refine cs weights must be >= 0 and its iterations >= 1, got λ {self.cs_lambda}, "
                             f"μ {self.cs_mu}, {self.cs_iterations} iterations")
        if self.cs_wavelet not in sparse.WAVELETS:
            raise ValueError(f"refine cs wavelet must be one of {', '.join(sparse.WAVELETS)}, got {self.cs_wavelet!r}")
        if self.cs_outside not in CS_OUTSIDE:
            raise ValueError(f"refine cs outside must be one of {', '.join(CS_OUTSIDE)}, got {self.cs_outside!r}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"refine_lambda must be a finite number >= 0 (0: from the noise), got {self.lam}")
        if not (0 < self.lam_min <= self.lam_max and 0 < self.lam_min_network <= self.lam_max):
            raise ValueError(f"refine λ bounds must satisfy 0 < min <= max, got {self.lam_min} (ESPIRiT maps), "
                             f"{self.lam_min_network} (network maps), {self.lam_max}")
        if not 0 < self.smooth <= 0.5 or self.iterations < 1:
            raise ValueError(f"refine smooth must be in (0, 0.5] and iterations >= 1, got {self.smooth}, "
                             f"{self.iterations}")
        if self.maps not in MAP_SOURCES or not 0 < self.coverage <= 1:
            raise ValueError(f"refine maps must be one of {', '.join(MAP_SOURCES)} and coverage in (0, 1], got "
                             f"{self.maps!r}, {self.coverage}")


def _gaussian_window(n: int, width: float, device) -> torch.Tensor:
    centre = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    return torch.exp(-0.5 * (centre / (width * n)) ** 2)


def coil_maps(kspace: torch.Tensor, smooth: float) -> torch.Tensor:
    """Maps ``(b, c, h, w)`` from multi-coil k-space: the low-passed coil images over their RSS
    (``Σ|S|² = 1`` where the low-passed RSS exceeds 1e-3 of its maximum, less below)."""
    h, w = kspace.shape[-2:]
    window = _gaussian_window(h, smooth, kspace.device)[:, None] * _gaussian_window(w, smooth, kspace.device)
    low = ifft2c(kspace * window.to(kspace.dtype))
    low_rss = low.abs().square().sum(1, keepdim=True).sqrt()
    floor = 1e-3 * low_rss.amax(dim=(-3, -2, -1), keepdim=True)
    return low / (low_rss + floor)


def _mask_rows(mask: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """The sampled columns of each slice, bool ``(batch, width)``, from any mask layout above."""
    return torch.broadcast_to(mask.reshape(-1, width).to(torch.bool), (batch, width))


def object_mask(magnitude: torch.Tensor) -> torch.Tensor:
    """The object of each image ``(..., h, w)``: pixels above 10 % of that image's maximum (bool, same shape)."""
    return magnitude > 0.1 * magnitude.amax(dim=(-2, -1), keepdim=True)


def espirit_coverage(eigenvalues: torch.Tensor, image: torch.Tensor, crop: float = COVERAGE_CROP) -> float:
    """Share of the object (:func:`object_mask` of ``image`` ``(h, w)``) where ESPIRiT's top eigenvalue
    ``(h, w)`` reaches ``crop``: where the calibration vouches for its maps."""
    obj = object_mask(image)
    covered = eigenvalues >= crop
    return float((covered & obj).sum()) / max(int(obj.sum()), 1)


class PositionCalibrations:
    """ESPIRiT's calibrations (:class:`~gadget.baselines.espirit.Calibration`, the costly part of the maps:
    the calibration matrix's subspace and the eigenproblems) of one scan, by slice position. The
    repetitions, cardiac phases and averages of a position are acquired with the same coils in the same
    place, so their maps come from the first of them to be refined; a new matrix size or ACS count at that
    position is calibrated anew. At most ``limit`` positions are kept; one scan's :class:`ScanReconstructor`
    holds one (``gadget.recon.pipeline``). ``computed``: calibrations run, the others were reused."""

    def __init__(self, limit: int = 1024):
        self.limit, self.computed = limit, 0
        self._known: dict = {}
        self._lock = threading.Lock()

    def calibration(self, position, kspace: torch.Tensor, num_low, sampled,
                    config: EspiritConfig = REFINE_ESPIRIT) -> Calibration:
        """The calibration of ``kspace`` ``(coil, readout, phase)`` at ``position`` (any hashable), with
        ``num_low`` centre lines (None: the centre run of ``sampled``, bool ``(phase,)``)."""
        lines = int(num_low) if num_low is not None else contiguous_center_lines(sampled)
        key = (position, tuple(kspace.shape), lines, config)
        known = self._known.get(key)
        if known is None:
            known = espirit_calibration(kspace, lines, mask=sampled, config=config)
            with self._lock:
                self.computed += 1
                if len(self._known) < self.limit:
                    self._known[key] = known
        return known


def choose_maps(image: torch.Tensor, final: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor,
                config: RefineConfig, num_low=None, positions=None,
                calibrations: PositionCalibrations | None = None) -> tuple[torch.Tensor, list[str]]:
    """Maps ``(b, c, h, w)`` for the solve and, per slice, where they came from (``espirit`` or ``network``).

    ESPIRiT (on the measured calibration lines, as BART's pics takes them) where its eigenvalue reaches
    :data:`COVERAGE_CROP` over at least ``config.coverage`` of the network's object (with ``config.maps``
    ``espirit``: where its signal subspace leaves a null space, :data:`MAX_SIGNAL_SHARE`), else
    :func:`coil_maps` of the network's k-space. Why both: on the held-out brain, phantoms and INIA heads
    at 4× ESPIRiT's maps lift the refined image (docs/results/refinement.md), but on heads with elements
    at the scalp they are cropped inside the object, and a solve with them returns a dark interior. With
    ``calibrations`` and each slice's ``positions``, ESPIRiT's calibration comes from there (computed once
    per position); the coverage is judged on each slice's own image."""
    b, w = final.shape[0], final.shape[-1]
    if config.maps == "network":
        return coil_maps(final, config.smooth), ["network"] * b
    rows, counts = _mask_rows(mask, b, w).cpu().numpy(), per_slice_counts(num_low, b)
    espirit = espirit_config(config)
    chosen = []
    for i in range(b):
        try:
            if calibrations is not None and positions is not None:
                calibration = calibrations.calibration(positions[i], measured[i], counts[i], rows[i], espirit)
            else:
                calibration = espirit_calibration(measured[i], counts[i], mask=rows[i], config=espirit)
            esp, values = calibrated_maps(calibration, espirit)
            esp = esp.to(final.device)
            if config.maps == "espirit":
                covers = calibration.signal_share <= MAX_SIGNAL_SHARE
            else:
                covers = espirit_coverage(values, image[i].cpu()) >= config.coverage
        except ValueError as exc:  # no usable calibration block (fewer than 2 centre lines)
            log.debug("refine: ESPIRiT maps unavailable (%s); the network's maps are used", exc)
            covers = False
        chosen.append(esp if covers else None)
    sources = ["network" if m is None else "espirit" for m in chosen]
    if "network" in sources:  # the network's maps only where some slice needs them
        network = coil_maps(final, config.smooth)
        chosen = [network[i] if m is None else m for i, m in enumerate(chosen)]
    return torch.stack(chosen), sources


def espirit_config(config: RefineConfig) -> EspiritConfig:
    """The ESPIRiT settings of a refine: :data:`SOLVE_ESPIRIT` where the held-back lines judge the maps
    (``maps: espirit``), else :data:`REFINE_ESPIRIT` (whose maps the coverage test judges)."""
    return SOLVE_ESPIRIT if config.maps == "espirit" else REFINE_ESPIRIT


def maps_and_prior(image, final, measured, mask, config: RefineConfig, num_low=None, positions=None,
                   calibrations: PositionCalibrations | None = None, coil_images=None):
    """``(maps, sources, prior)``: :func:`choose_maps` and the network's coil images (``coil_images``
    ``(b, c, h, w)``, or the transform of its final k-space ``final``) combined with them,
    ``x₀ = Σ conj(S) · c`` ``(b, h, w)``: the prior of both solves."""
    maps, sources = choose_maps(image, final, measured, mask, config, num_low, positions, calibrations)
    coils = ifft2c(final) if coil_images is None else coil_images.to(maps.dtype)
    return maps, sources, (coils * maps.conj()).sum(1)


def noise_sigma(masked_kspace: torch.Tensor, mask: torch.Tensor, fraction: int = 8) -> torch.Tensor:
    """Per-slice noise σ (``E|n|² = σ²``) from the outer ``1 / fraction`` of the readout on each side (an
    eighth by default), sampled columns only → ``(b,)``. Signal left in those samples biases it upwards
    (towards the network). Samples that are exactly zero were never measured (an asymmetric echo, a
    partial-Fourier or zero-padded region: noise is never exactly 0) and are left out; a band with none
    measured gives σ 0."""
    b, _, _, w = masked_kspace.shape
    cols = _mask_rows(mask, b, w)
    return torch.stack([noise_level(outer_readout(masked_kspace[i], fraction)[..., cols[i]]) for i in range(b)])


def noise_floor(sigma: torch.Tensor, coils: int, quantile: float = NOISE_FLOOR_QUANTILE) -> torch.Tensor:
    """The ``quantile`` of the RSS over ``coils`` coils of pure noise of level ``sigma`` ``(b,)`` (per coil,
    ``E|n|² = σ²``), ``(b,)``: ``Σ_c |n_c|²`` is a sum of ``coils`` exponentials of mean σ²,
    Gamma(coils, σ²)."""
    return sigma * math.sqrt(float(gammaincinv(coils, quantile)))


def lambda_floor(config: RefineConfig, sources: list[str]) -> torch.Tensor:
    """The λ floor per slice ``(b,)`` for the maps each slice is solved with (``espirit`` or ``network``)."""
    return torch.tensor([config.lam_min if s == "espirit" else config.lam_min_network for s in sources])


def choose_lambda(config: RefineConfig, sigma: torch.Tensor, prior: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """λ per slice ``(b,)``: ``config.lam`` when set, else κ(σ/s)² within [``floor`` ``(b,)``, ``lam_max``]
    (module docstring; the floor from :func:`lambda_floor`)."""
    if config.lam > 0:
        return torch.full_like(sigma, config.lam)
    mag = prior.abs()
    objects = object_mask(mag)
    mean_object = (mag * objects).sum((-2, -1)) / objects.sum((-2, -1)).clamp(min=1)
    ratio = sigma / mean_object.clamp(min=torch.finfo(mag.dtype).tiny)
    return torch.maximum(config.kappa * ratio.square(), floor.to(ratio)).clamp(max=config.lam_max)


def map_support(maps: torch.Tensor) -> torch.Tensor:
    """Where the maps ``(b, c, h, w)`` reach: bool ``(b, h, w)``, True at pixels where any coil's map is not
    zero (ESPIRiT's are cropped to zero outside the calibrated object)."""
    # the largest magnitude over the coils (a reduction over the outer axis, which vectorises), then over
    # real and imaginary part: several times faster than ne(0).any over those two axes
    return torch.view_as_real(maps).abs().amax(dim=1).amax(dim=-1) > 0


def map_exterior(maps: torch.Tensor, margin: int = EXTERIOR_MARGIN) -> torch.Tensor:
    """Where the maps ``(b, c, h, w)`` vanish outside the region they enclose, ``margin`` pixels or more away
    from it: bool ``(b, h, w)``, the complement of :func:`map_support` with its holes filled and grown by
    ``margin``."""
    regions = [ndimage.binary_fill_holes(support) for support in map_support(maps).cpu().numpy()]
    if margin:
        regions = [ndimage.binary_dilation(region, iterations=margin) for region in regions]
    return torch.from_numpy(~np.stack(regions)).to(maps.device)


def capped_outside(maps: torch.Tensor, image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The factor ``(b, h, w)`` by which ``cs_outside`` ``capped`` scales the network's RSS ``image`` ``(b, h,
    w)``, or its coil images, given the maps ``(b, c, h, w)`` and the noise level ``sigma`` ``(b,)``: down to
    :func:`noise_floor` where the image exceeds it in :func:`map_exterior`, 1 elsewhere."""
    cap = noise_floor(sigma, maps.shape[1]).view(-1, 1, 1).to(image)
    scale = (cap / image.clamp(min=torch.finfo(image.dtype).tiny)).clamp(max=1)
    return torch.where(map_exterior(maps), scale, torch.ones_like(scale))


def solve_rows(maps: torch.Tensor) -> torch.Tensor:
    """The readout rows the solve runs on, ``(n,)`` long indices shared by the batch: those where the maps
    ``(b, c, h, w)`` are not all zero.

    Why rows can be left out: the mask selects phase columns and every readout sample of a sampled column
    is measured, so after a Fourier transform along the readout the problem falls apart into one
    independent 1-D SENSE problem per readout row. A row without maps (ESPIRiT's are cropped to zero
    outside the calibrated object, e.g. across the readout oversampling) has ``AᴴA = 0`` and the solution
    ``x = x₀``."""
    return map_support(maps).any(dim=(0, 2)).nonzero().squeeze(1)


def _prime_factor_sum(n: int) -> int:
    total, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            total, n = total + p, n // p
        p += 1
    return total + (n if n > 1 else 0)


class RowSense:
    """``A = M F_p S`` on a stack of readout rows (the hybrid space of :func:`solve_rows`), in the
    *rolled* frame: ``F_p`` is the centred orthonormal 1-D transform along the phase axis,
    ``fftshift ∘ fft ∘ ifftshift``, so ``F_pᴴ M F_p = Rᴴ ifft(M' fft(R ·))`` with ``R`` = ``ifftshift``
    along the phase axis (a permutation) and ``M'`` the mask permuted likewise. A permutation of the
    unknowns changes nothing in CG, so images ``(n, w)`` and maps ``(n, c, w)`` are held rolled
    (:func:`roll_rows`), the mask as ``M'`` ``(n or 1, 1, w)``, and :meth:`apply` (``AᴴA + λ``, λ
    ``(n, 1)``) takes no shifts, for any ``w``. :meth:`select` keeps some rows.

    ``ifft(M' fft(v))`` is two FFTs, or, with one mask for all rows and few sampled columns against the
    FFT's cost (the sum of ``w``'s prime factors: a length with a large prime factor transforms slowly),
    ``Dᴴ (D v)`` with ``D`` the ``(sampled, w)`` rows of the DFT matrix: two matrix products."""

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor, lam: torch.Tensor, transform: str = "auto",
                 dft=None):
        """``transform``: ``fft``, ``dft`` (one mask for all rows only) or ``auto`` (the cost rule above)."""
        self.maps, self.lam = maps, lam
        self.maps_conj = maps.conj().resolve_conj()
        self.mask = mask.to(maps.real.dtype)
        w = maps.shape[-1]
        if dft is None and mask.shape[0] == 1 and transform != "fft":
            sampled = mask.reshape(-1).nonzero().squeeze(1)
            if transform == "dft" or sampled.numel() < 2 * _prime_factor_sum(w):
                k = sampled.to(maps.real.dtype).unsqueeze(1)
                j = torch.arange(w, device=maps.device, dtype=maps.real.dtype)
                rows = torch.polar(torch.full((sampled.numel(), w), w ** -0.5, dtype=maps.real.dtype,
                                              device=maps.device), -2 * torch.pi * k * j / w)
                dft = (rows.t().contiguous(), rows.conj().resolve_conj())  # (w, m) forward, (m, w) back
        self.dft = dft

    def select(self, keep: torch.Tensor) -> "RowSense":
        mask = self.mask if self.mask.shape[0] == 1 else self.mask[keep]
        return RowSense(self.maps[keep], mask, self.lam[keep], "fft" if self.dft is None else "dft", self.dft)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        coils = self.maps * x.unsqueeze(1)
        if self.dft is None:
            k = torch.fft.fft(coils, dim=-1, norm="ortho").mul_(self.mask)
            coils = torch.fft.ifft(k, dim=-1, norm="ortho")
        else:
            forward, back = self.dft
            coils = coils @ forward @ back
        return coils.mul_(self.maps_conj).sum(1).add_(self.lam * x)


def roll_rows(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``ifftshift`` along the last axis (``fftshift`` with ``inverse``): into :class:`RowSense`'s frame and back."""
    return torch.fft.fftshift(x, dim=-1) if inverse else torch.fft.ifftshift(x, dim=-1)


#: CG stops on a row once its residual is below this fraction of its first one (or after the iteration
#: cap). Rows converge at their own pace: on noisy data (λ large) within a few steps, on clean data more
#: slowly; converged rows leave the active set.
ROW_TOLERANCE = 1e-4
_COMPACT_EVERY = 3  # iterations between removals of converged rows from the active set


def row_conjugate_gradient(op: RowSense, rhs: torch.Tensor, x: torch.Tensor, iterations: int,
                           tol: float = ROW_TOLERANCE) -> torch.Tensor:
    """CG for ``op.apply(x) = rhs`` on independent rows ``(n, w)`` (each row its own step lengths and its
    own stopping point, ``‖r‖ ≤ tol·‖r₀‖``) started from ``x`` (updated in place and returned)."""
    def dot(a, b):
        return (a.conj() * b).sum(-1).real.unsqueeze(-1)

    out, active = x, None  # active: the rows of out still iterating (None: all, and x is out)
    r = rhs - op.apply(x)
    p = r.clone()
    rr = dot(r, r)
    stop = rr * tol * tol
    tiny = torch.finfo(rr.dtype).tiny
    for step in range(iterations):
        ap = op.apply(p)
        alpha = torch.where(rr > stop, rr / dot(p, ap).clamp_min(tiny), 0.0)
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        rr_new = dot(r, r)
        beta = torch.where(rr > stop, rr_new / rr.clamp_min(tiny), 0.0)
        p = r.add(p.mul_(beta))
        rr = rr_new
        going = (rr > stop).squeeze(-1)
        if (step + 1) % _COMPACT_EVERY == 0 and not bool(going.all()):
            if active is not None:  # else x is out itself, up to date
                out[active] = x
            if not bool(going.any()):
                return out
            keep = going.nonzero().squeeze(1)
            active = keep if active is None else active[keep]
            x, r, p, rr, stop, op = x[keep], r[keep], p[keep], rr[keep], stop[keep], op.select(keep)
    if active is not None:
        out[active] = x
    return out


@torch.inference_mode()
def refine(image: torch.Tensor, final_kspace: torch.Tensor, masked_kspace: torch.Tensor, mask: torch.Tensor,
           config: RefineConfig = RefineConfig(), num_low=None, positions=None,
           calibrations: PositionCalibrations | None = None, coil_images: torch.Tensor | None = None
           ) -> torch.Tensor:
    """The refined image ``(b, h, w)`` (module docstring) from the network's RSS ``image`` ``(b, h, w)``,
    its final multi-coil k-space and the measured (masked) k-space, both ``(b, c, h, w)``. ``num_low``:
    calibration lines for ESPIRiT, one count or one per slice (None: the contiguous sampled centre run
    of each slice's mask). ``positions`` (one per slice) and ``calibrations``: ESPIRiT's calibration once
    per slice position of a scan (:class:`PositionCalibrations`; None: each slice its own).
    ``coil_images``: the network's final coil images ``ifft2c(final_kspace)`` ``(b, c, h, w)`` where the
    engine handed them over (:meth:`gadget.recon.engine.Reconstructor.run`); the prior is read from them
    instead of transformed anew.

    The solve runs per readout row on the rows of :func:`solve_rows` (elsewhere ``x̂ = x₀``), each row by
    CG from the network's own image ``x₀`` (``config.iterations`` steps)."""
    if config.mode == "none":
        return image
    final = final_kspace.to(torch.complex64)
    measured = masked_kspace.to(final.device, torch.complex64)
    if config.mode == "cs":
        return _refine_sparse(image, final, measured, mask, config, num_low, positions, calibrations, coil_images)
    with serial(final.numel(), below=SERIAL_REFINE_BELOW):
        return _refine(image, final, measured, mask, config, num_low, positions, calibrations, coil_images)


def _refine_sparse(image, final, measured, mask, config: RefineConfig, num_low, positions=None,
                   calibrations=None, coil_images=None) -> torch.Tensor:
    """The ``cs`` mode: :func:`gadget.recon.sparse.solve` per slice with the config's weights; ``|x̂|``
    where the maps cover the slice; where they vanish (no data reaches it there) the network's image, with
    ``cs_outside`` ``capped`` capped at :func:`noise_floor` outside the region the maps enclose."""
    b, _, _, w = final.shape
    maps, _, prior = maps_and_prior(image, final, measured, mask, config, num_low, positions, calibrations,
                                    coil_images)
    columns = _mask_rows(mask, b, w).to(final.device)
    out = image.float().clone()
    if config.cs_outside == "capped":
        out *= capped_outside(maps, out, noise_sigma(measured, mask))
    covered = map_support(maps)
    for i in range(b):
        x = sparse.solve(maps[i], measured[i], columns[i], prior[i], [config.cs_lambda], [config.cs_mu],
                         config.cs_iterations, wavelet=config.cs_wavelet)[0]
        out[i] = torch.where(covered[i], x.abs(), out[i])
    return out


def _refine(image, final, measured, mask, config: RefineConfig, num_low, positions=None,
            calibrations=None, coil_images=None) -> torch.Tensor:
    b, c, h, w = final.shape
    maps, sources = choose_maps(image, final, measured, mask, config, num_low, positions, calibrations)
    columns = mask.to(final.device, torch.bool).reshape(-1, 1, 1, w)
    rows = solve_rows(maps)
    # x₀ and the solve on those rows only, in RowSense's rolled frame: elsewhere the maps are 0, so are the
    # prior x₀ = Σ conj(S)·c and the solution
    prior = torch.zeros(b, h, w, dtype=final.dtype, device=final.device)
    x = prior.clone()
    if rows.numel():
        row_maps = roll_rows(maps[:, :, rows])                                       # (b, c, n, w)
        coils = (rolled_row_images(final, rows) if coil_images is None
                 else roll_rows(coil_images[:, :, rows].to(final.dtype)))
        prior_rows = coils.mul_(row_maps.conj()).sum(1)                            # (b, n, w)
        prior[:, rows] = roll_rows(prior_rows, inverse=True)
    floor = lambda_floor(config, sources).to(prior.real)
    lam = choose_lambda(config, noise_sigma(measured, mask), prior, floor).view(-1, 1, 1)
    if rows.numel():
        x[:, rows] = roll_rows(_solve(row_maps, prior_rows, measured, columns, lam.to(prior.real.dtype), rows,
                                      config.iterations), inverse=True)
    kept = (image.float() + x.abs() - prior.abs()).clamp(min=0)
    weight = solved_weight(floor.view(-1, 1, 1), lam)
    return weight * x.abs() + (1 - weight) * kept


def rolled_row_images(kspace: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor | None = None,
                      coil_basis: torch.Tensor | None = None) -> torch.Tensor:
    """The coil images of centred k-space ``(b, c, h, w)`` on the readout rows ``rows`` ``(n,)`` of the centred
    image, in :class:`RowSense`'s rolled frame along the phase axis: ``(b, c, n, w)``, equal to
    ``roll_rows(ifft2c(kspace)[:, :, rows])``. ``columns`` (bool ``(b or 1, 1, 1, w)``): k-space outside those
    phase columns is taken as zero and never read. The readout transform runs on the columns read, the phase
    transform on the rows asked for: a fraction of the 2-D transform's work. ``coil_basis`` ``(b, n, k, c)``:
    each row's coils combined into ``k`` virtual ones (:func:`row_coil_basis`) between the two transforms (a
    combination constant along a row commutes with the phase transform), which then runs on ``k``: ``(b, k, n, w)``."""
    b, c, h, w = kspace.shape
    if columns is not None:
        read = columns.reshape(-1, w).any(0).nonzero().squeeze(1)
        kspace = kspace[..., read] * columns[..., read]
    # ifft(ifftshift(k)) is the image rolled by h // 2: centred row r sits at (r - h // 2) mod h. The readout
    # axis is moved last (one copy): a transform over contiguous values is faster than a strided one
    readout_last = torch.fft.ifftshift(kspace, dim=-2).transpose(-2, -1).contiguous()
    hybrid = torch.fft.ifft(readout_last, dim=-1, norm="ortho")[..., (rows - h // 2) % h].transpose(-2, -1)
    if coil_basis is not None:
        hybrid = torch.einsum("bnkc,bcnw->bknw", coil_basis, hybrid)
        c = hybrid.shape[1]
    if columns is None:
        hybrid = roll_rows(hybrid)
    else:  # zero-filled, each column placed where ifftshift puts it
        full = hybrid.new_zeros(b, c, rows.numel(), w)
        full[..., (read - w // 2) % w] = hybrid
        hybrid = full
    # rolled frame: ifftshift of the centred image, i.e. ifft of the ifftshifted k-space (no fftshift)
    return torch.fft.ifft(hybrid, dim=-1, norm="ortho")


def _solve(row_maps, prior_rows, measured, columns, lam, rows, iterations: int) -> torch.Tensor:
    """:func:`refine`'s solve on ``rows``, maps ``(b, c, n, w)`` and prior ``(b, n, w)`` in the rolled frame:
    ``x̂`` there, ``(b, n, w)`` rolled."""
    b, c, n, w = row_maps.shape
    basis, maps = row_coil_basis(row_maps.transpose(1, 2).reshape(b * n, c, w))  # each row's virtual coils
    k = maps.shape[1]
    coils = rolled_row_images(measured, rows, columns, None if basis is None else basis.view(b, n, k, c))
    data = coils.mul_(maps.view(b, n, k, w).transpose(1, 2).conj()).sum(1)  # Aᴴy on those rows, (b, n, w)
    row_mask = roll_rows(columns.expand(b, n, 1, w).reshape(b * n, 1, w) if columns.shape[0] > 1
                         else columns.view(1, 1, w))
    lam_rows = lam.view(b, 1, 1).expand(b, n, 1).reshape(b * n, 1)
    op = RowSense(maps, row_mask, lam_rows)
    x0 = prior_rows.reshape(b * n, w)
    rhs = data.reshape(b * n, w) + lam_rows * x0
    return row_conjugate_gradient(op, rhs, x0.clone(), iterations, ROW_TOLERANCE).view(b, n, w)


#: :func:`row_coil_basis` keeps as many virtual coils per row as leave no pixel more than this share of its
#: map's energy (1 where ESPIRiT's maps are kept) outside them.
COIL_RESIDUAL = 1e-4


def row_coil_basis(maps: torch.Tensor, residual: float = COIL_RESIDUAL) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-row coil compression of the solve's maps ``(m, c, w)`` (one readout row each): ``(basis (m, k, c),
    maps (m, k, w))``, ``basis`` the ``k`` leading left singular vectors of each row's ``(c, w)`` maps
    (conjugate transposed: orthonormal rows) and ``basis @ maps`` the maps of those ``k`` virtual coils, with
    ``k`` the fewest that leave at most ``residual`` of ``Σ_c |S|²`` outside them at every pixel of every row.
    ``k = c``: ``(None, maps)``.

    Why: a unitary mix of the coils, constant along a row, leaves the row's SENSE problem as it is (the normal
    operator's sum over coils is invariant under it) and commutes with the phase transform, so the data are
    mixed on the hybrid rows (:func:`rolled_row_images`). Keeping the leading ``k`` drops only the maps'
    component outside them, at most ``residual`` per pixel, and the data's there, mostly noise: geometric
    coil compression (Zhang et al., MRM 69:571, 2013) per row of the solve. Sensitivities are smooth along a
    row, so ``k`` is a fraction of a large array's ``c``, and CG's cost falls with it."""
    m, c, w = maps.shape
    _, vectors = hermitian_eigh(torch.bmm(maps, maps.mH))  # (m, c, c), ascending: the leading ones last
    basis = vectors.flip(-1).mH                            # rows by falling energy
    virtual = torch.bmm(basis, maps)                       # (m, c, w)
    k, outside = c, maps.real.new_zeros(m, w)  # each pixel's energy in the coils k.. (left out)
    while k > 1:
        last = virtual[:, k - 1]
        if float(outside.add_((last * last.conj()).real).max()) > residual:
            break
        k -= 1
    if k == c:
        return None, maps
    return basis[:, :k].contiguous(), virtual[:, :k].contiguous()


def solved_weight(floor: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """How much of the output is the solve's own magnitude ``|x̂|`` rather than the network's image plus
    the solve's change: ``floor / λ`` (at most 1), so 1 on noise-free data, about 0.02 at 30 dB with
    ESPIRiT's maps (floor 0.005, λ near 0.3)."""
    return (floor / lam).clamp(max=1.0)
