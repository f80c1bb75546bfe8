"""Parallel-imaging refinement of the network's image ("pi" refine).

Why: on held-out simulated anatomy the shipped network stays far from BART pics-L1 where parallel
imaging alone is reliable (high SNR, smooth coils, 4×; docs/results/refinement.md). Its six cascades
take six gradient steps on the data; a SENSE solve takes as many as the coils need. This stage
finishes what the cascades started, with the network's image as the prior:

    x̂ = argmin_x ||M F S x − y||² + λ ||x − x₀||²   ⇔   (AᴴA + λ I) x = Aᴴ y + λ x₀,   A = M F S,

solved by conjugate gradients, where

- ``S`` are ESPIRiT's maps from the measured calibration lines where they cover the network's object
  (:func:`choose_maps`), else maps taken from the network's own final coil images: on whole heads
  with elements close to the scalp ESPIRiT's maps are cropped inside the brain and SENSE returns a
  dark interior. Those are the coil images low-passed by a Gaussian of width ``smooth`` × the matrix
  in k-space, divided by their RSS. Either way ``Σ|S|² = 1`` where there is signal and ``||AᴴA|| ≤ 1``;
- ``x₀ = Σ conj(S) · c`` is the network's coil images ``c`` combined with those maps;
- λ is ``lam``, or with ``lam = 0`` ("auto") ``κ · (σ / s)²`` clipped to [floor, ``lam_max``], the
  floor ``lam_min`` with ESPIRiT's maps and ``lam_min_network`` with the network's, with σ the noise
  level estimated from the outer readout samples of the measured lines (a robust median: |n| of
  complex Gaussian noise has median σ·√ln2) and s the mean of |x₀| over the object: noisy data lean
  on the network, clean data on the measurements.

The image sent blends two readings of the solve, weighted by ``w = floor / λ`` (≤ 1): ``w · |x̂|``
plus ``(1 − w)`` times the network's RSS image with the change the solve made to the magnitude,
``rss + |x̂| − |x₀|`` (≥ 0). The second keeps the network's background where the maps vanish, and the
noise it removed there; on noisy data (λ large, w small) it is what is sent. On noise-free data (λ at
its floor, w = 1) the measurements are trusted outright and ``|x̂|`` is sent: there the solve's own
image beat the second reading. It gains most on clean data with smooth coils and costs a little on
noisy whole heads (measured noise put back where the network had removed it, and ESPIRiT's maps of
elements at the scalp); the gains and costs per held-out set, and the sweeps behind every default
below, are in docs/results/refinement.md.

Layouts: k-space and coil tensors complex ``(batch, coil, readout, phase)``; mask bool, broadcastable
to it (``(phase,)`` or ``(batch, 1, 1, phase)``); images real ``(batch, readout, phase)``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..baselines.espirit import EspiritConfig, espirit_maps, per_slice_counts
from ..baselines.sense import SenseOperator, conjugate_gradient
from ..mri.fft import ifft2c

log = logging.getLogger(__name__)

REFINE_MODES = ("pi", "none")
MAP_SOURCES = ("auto", "network")
#: ESPIRiT as the baselines run it, except: the eigenproblems on a 4× coarser grid (the maps barely move
#: and ESPIRiT gets several times cheaper), and the maps cropped where the top eigenvalue is below 0.9, not
#: 0.95. With 10 calibration lines (8×) the eigenvalue falls below 0.95 inside the object's edge, and the
#: solve leaves bright folded bands there; 0.9 was best at 8× and close to best at 4× (the crop sweep:
#: docs/results/refinement.md).
REFINE_ESPIRIT = EspiritConfig(step=4, crop=0.9)
#: The eigenvalue that decides whether ESPIRiT's maps are used at all (:func:`choose_maps`): where it is
#: below 0.95 over more than a tenth of the object, on whole heads with elements at the scalp, the
#: network's maps did better than ESPIRiT's, and deciding at 0.9 instead lost PSNR there (the solve itself
#: crops at 0.9 either way; docs/results/refinement.md).
COVERAGE_CROP = 0.95


@dataclass(frozen=True)
class RefineConfig:
    """``mode``: ``pi`` (the solve above) or ``none`` (the network's image as it is). ``lam``: λ, or
    0 for the noise-adaptive choice. ``kappa``, ``lam_min``, ``lam_min_network``, ``lam_max``: that
    choice (κ = 300 puts λ near 0.3 at 30 dB, the noisy held-out brain's best). The floor depends on
    the maps, as the solve can trust them only as far as they are right. With ESPIRiT's, 0.005 and 30
    CG ``iterations``: a higher floor or fewer steps lost PSNR on the noise-free held-out brain, a lower
    floor with more steps cost SSIM at 8×, and more than 30 steps changed almost nothing. With the
    network's low-passed maps, 0.02: 0.005 did worse on a noise-free brain at 8× (tests/test_shipped.py).
    The sweeps: docs/results/refinement.md. ``smooth``: map low-pass
    width as a fraction of the matrix. ``maps``: ``auto`` (ESPIRiT where it covers the object, else the
    network's maps; :func:`choose_maps`) or ``network``; ``coverage``: the share of the object ESPIRiT
    must vouch for (:func:`espirit_coverage`)."""

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

    def __post_init__(self):
        if self.mode not in REFINE_MODES:
            raise ValueError(f"refine must be one of {', '.join(REFINE_MODES)}, got {self.mode!r}")
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


def choose_maps(image: torch.Tensor, final: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor,
                config: RefineConfig, num_low=None) -> tuple[torch.Tensor, list[str]]:
    """Maps ``(b, c, h, w)`` for the solve and, per slice, where they came from (``espirit`` or ``network``).

    ESPIRiT (on the measured calibration lines, as BART's pics takes them) where its eigenvalue reaches
    :data:`COVERAGE_CROP` over at least ``config.coverage`` of the network's object, else
    :func:`coil_maps` of the network's k-space. Why both: on the held-out brain, phantoms and INIA heads
    at 4× ESPIRiT's maps lift the refined image (docs/results/refinement.md), but on heads with elements
    at the scalp and on few calibration lines they are cropped inside the object, and a solve with them
    returns a dark interior."""
    b, w = final.shape[0], final.shape[-1]
    if config.maps == "network":
        return coil_maps(final, config.smooth), ["network"] * b
    rows, counts = _mask_rows(mask, b, w).cpu().numpy(), per_slice_counts(num_low, b)
    chosen = []
    for i in range(b):
        try:
            esp, values = espirit_maps(measured[i], counts[i], mask=rows[i], config=REFINE_ESPIRIT,
                                       return_eigenvalues=True)
            esp = esp.to(final.device)
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


def noise_sigma(masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-slice noise σ (``E|n|² = σ²``) from the outer eighth of the readout on each side, sampled
    columns only → ``(b,)``. Signal left in those samples biases it upwards (towards the network)."""
    b, _, h, w = masked_kspace.shape
    band = max(h // 8, 1)
    cols = _mask_rows(mask, b, w)
    out = []
    for i in range(b):
        k = masked_kspace[i][..., cols[i]]
        outer = torch.cat([k[:, :band], k[:, -band:]], dim=1).abs().flatten()
        out.append(outer.median() / math.sqrt(math.log(2)))
    return torch.stack(out)


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


@torch.inference_mode()
def refine(image: torch.Tensor, final_kspace: torch.Tensor, masked_kspace: torch.Tensor, mask: torch.Tensor,
           config: RefineConfig = RefineConfig(), num_low=None) -> torch.Tensor:
    """The refined image ``(b, h, w)`` (module docstring) from the network's RSS ``image`` ``(b, h, w)``,
    its final multi-coil k-space and the measured (masked) k-space, both ``(b, c, h, w)``. ``num_low``:
    calibration lines for ESPIRiT, one count or one per slice (None: the contiguous sampled centre run
    of each slice's mask)."""
    if config.mode == "none":
        return image
    final = final_kspace.to(torch.complex64)
    measured = masked_kspace.to(final.device, torch.complex64)
    maps, sources = choose_maps(image, final, measured, mask, config, num_low)
    prior = (maps.conj() * ifft2c(final)).sum(1)
    floor = lambda_floor(config, sources).to(prior.real)
    lam = choose_lambda(config, noise_sigma(measured, mask), prior, floor).view(-1, 1, 1).to(prior.real.dtype)
    op = SenseOperator(maps, mask.to(final.device, torch.bool).reshape(-1, 1, 1, final.shape[-1]))
    x = conjugate_gradient(lambda v: op.normal(v) + lam * v, op.adjoint(measured) + lam * prior, config.iterations)
    kept = (image.float() + x.abs() - prior.abs()).clamp(min=0)
    weight = solved_weight(floor.view(-1, 1, 1), lam)
    return weight * x.abs() + (1 - weight) * kept


def solved_weight(floor: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """How much of the output is the solve's own magnitude ``|x̂|`` rather than the network's image plus
    the solve's change: ``floor / λ`` (at most 1), so 1 on noise-free data, about 0.02 at 30 dB with
    ESPIRiT's maps (floor 0.005, λ near 0.3)."""
    return (floor / lam).clamp(max=1.0)
