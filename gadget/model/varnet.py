"""End-to-End Variational Network (Sriram et al. 2020), fastMRI-compatible.

Tensor layouts (all model inputs are checked at entry):

=================  ==========================================  ======================
name               shape                                       dtype
=================  ==========================================  ======================
masked_kspace      (batch, coil, readout, phase)               complex64/complex128
mask               (batch or 1, 1, 1, phase) or (phase,)       bool (True = sampled)
num_low_freqs      None, int, or (batch,) int tensor           ACS lines per sample
sens_kspace        None or as masked_kspace                    separate reference k-space
sens_maps          (batch, coil, readout, phase)               complex, Σ|S|² = 1
output image       (batch, readout, phase)                     real magnitude (see below)
=================  ==========================================  ======================

The output image is the paper's root-sum-of-squares of the final coil images (``output="rss"``,
eq. 13; what official fastMRI checkpoints were trained with) or, with ``output="sense"``, the
magnitude of the final k-space combined with the model's own maps, ``|Σ_i S_i* F⁻¹(k_i)|``. The
two agree for coil images of the form S_i·x; they differ for noise: every update a cascade makes
lies in the range of E (or pulls toward the measured lines), so the part of the measured noise
that is orthogonal to the maps at the sampled lines survives into an RSS output, but is removed
by the combination. Against a noise-free target this matters (measured on our simulated brains at
4×: SSIM 0.63 with RSS vs 0.90 with the combination, same weights; see issue 5's notes).

Parameter names equal those of ``fastmri.models.VarNet`` (``sens_net.norm_unet.unet.*``,
``cascades.{t}.model.unet.*``, ``cascades.{t}.dc_weight``) so official state dicts load.
Differences from the reference, on purpose: the ACS count is an explicit input (mask-based
detection only when it is not given), and zero/constant inputs give finite outputs
(the normalisation divides by a clamped std and a clamped RSS).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..mri.coils import normalize_sens, rss, sens_expand, sens_reduce
from ..mri.fft import ifft2c
from ..mri.masks import detect_num_low_frequencies
from .unet import Unet

AcsCount = Union[None, int, torch.Tensor]
OUTPUTS = ("rss", "sense")
# Arithmetic of the U-Nets (convolutions under torch.autocast); normalisation, FFTs, coil
# operators and data consistency always run in float32 / complex64.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_EPS = 1e-12  # far below any real std / RSS of fp32 MR data; only guards exact zeros


@dataclass(frozen=True)
class VarNetConfig:
    """Hyperparameters; defaults are the paper's (≈ 29.9 M parameters)."""

    num_cascades: int = 12
    chans: int = 18
    pools: int = 4
    sens_chans: int = 8
    sens_pools: int = 4
    mask_center: bool = True
    output: str = "rss"  # "rss" (paper, fastMRI) | "sense" (|R(k)| with the model's maps); see module doc

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"VarNet output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class NormUnet(nn.Module):
    """U-Net on one complex image per batch entry, with per-sample normalisation.

    Input/output: complex ``(batch, 1, h, w)``. Internally the real and imaginary parts
    become 2 channels, each normalised to zero mean / unit (unbiased) std, padded to a
    multiple of 16, passed through the U-Net, then unpadded and de-normalised.
    """

    def __init__(self, chans: int, num_pools: int, drop_prob: float = 0.0):
        super().__init__()
        self.unet = Unet(in_chans=2, out_chans=2, chans=chans,
                         num_pool_layers=num_pools, drop_prob=drop_prob)
        self.compute_dtype: Optional[torch.dtype] = None  # None: fp32; else the U-Net runs under autocast

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, c, h, w = image.shape
        if c != 1:
            raise ValueError(f"NormUnet expects (batch, 1, h, w) complex, got {tuple(image.shape)}")
        x = torch.view_as_real(image[:, 0]).permute(0, 3, 1, 2)  # (b, 2=[re, im], h, w)
        x = self.forward_channels(x)
        return torch.view_as_complex(x.permute(0, 2, 3, 1).contiguous()).unsqueeze(1)

    def forward_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The same on real ``(b, 2=[re, im], h, w)`` → ``(b, 2, h, w)`` (no complex dtype: exportable)."""
        b, _, h, w = x.shape
        flat = x.reshape(b, 2, h * w)
        mean = flat.mean(dim=2).view(b, 2, 1, 1)
        std = flat.std(dim=2).view(b, 2, 1, 1).clamp_min(_EPS)
        x = (x - mean) / std

        h_mult, w_mult = ((h - 1) | 15) + 1, ((w - 1) | 15) + 1  # next multiple of 16
        top, left = (h_mult - h) // 2, (w_mult - w) // 2
        x = F.pad(x, [left, w_mult - w - left, top, h_mult - h - top])
        if self.compute_dtype is None:
            x = self.unet(x)
        else:  # inputs normalised in fp32 above; the output returns to fp32 before de-normalising
            with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype):
                x = self.unet(x)
            x = x.float()
        x = x[..., top:top + h, left:left + w]

        return x * std + mean


def center_lines_mask(width: int, num_low: torch.Tensor) -> torch.Tensor:
    """Boolean ``(b, 1, 1, width)``: the ``num_low[b]`` central phase lines, starting at
    ``(width - num_low + 1) // 2`` (fastMRI's placement)."""
    start = (width - num_low + 1) // 2
    cols = torch.arange(width, device=num_low.device)
    keep = (cols >= start[:, None]) & (cols < (start + num_low)[:, None])
    return keep.view(-1, 1, 1, width)


class SensitivityModel(nn.Module):
    """Coil sensitivities from the ACS lines: ACS-only k-space → coil images → per-coil
    NormUnet → normalised so that Σ_i |S_i|² = 1 (seed eq. 12)."""

    def __init__(self, chans: int, num_pools: int, drop_prob: float = 0.0, mask_center: bool = True):
        super().__init__()
        self.mask_center = mask_center
        self.norm_unet = NormUnet(chans, num_pools, drop_prob)

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor,
                num_low_frequencies: AcsCount = None, run_unet: Optional[Callable] = None) -> torch.Tensor:
        """``run_unet``: applies ``self.norm_unet`` to the ``(b·c, 1, h, w)`` coil images in
        another way (training runs it per coil with checkpointing); default: one call."""
        b, c, h, w = masked_kspace.shape
        if self.mask_center:
            num_low = resolve_num_low_frequencies(mask, num_low_frequencies, b)
            masked_kspace = masked_kspace * center_lines_mask(w, num_low)
        coil_images = ifft2c(masked_kspace).reshape(b * c, 1, h, w)
        sens = (run_unet or self.norm_unet)(coil_images).reshape(b, c, h, w)
        return normalize_sens(sens, _EPS)


def resolve_num_low_frequencies(mask: torch.Tensor, num_low: AcsCount, batch: int) -> torch.Tensor:
    """``(batch,)`` long ACS counts: given explicitly, else detected from the mask (also when 0,
    as the reference does)."""
    if num_low is None or (isinstance(num_low, int) and num_low == 0):
        detected = detect_num_low_frequencies(mask)
        return detected.expand(batch) if detected.shape[0] == 1 else detected
    if isinstance(num_low, int):
        return torch.full((batch,), num_low, dtype=torch.long, device=mask.device)
    num_low = num_low.to(device=mask.device, dtype=torch.long).reshape(-1)
    if num_low.shape[0] not in (1, batch):
        raise ValueError(f"num_low_frequencies has {num_low.shape[0]} entries for a batch of {batch}")
    return num_low.expand(batch)


class VarNetBlock(nn.Module):
    """One cascade (seed eqs. 10-11): k ← k − η·M(k − k̃) − E(CNN(R(k)))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(self, current: torch.Tensor, reference: torch.Tensor,
                mask: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        soft_dc = torch.where(mask, current - reference, torch.zeros((), dtype=current.dtype,
                                                                      device=current.device))
        refinement = sens_expand(self.model(sens_reduce(current, sens)), sens)
        return current - soft_dc * self.dc_weight - refinement


class VarNet(nn.Module):
    """E2E-VarNet: sensitivity network + ``num_cascades`` unrolled refinement/data-consistency
    blocks + RSS output (seed eq. 13) or the map-combined output (``output="sense"``). See the module
    docstring for layouts."""

    def __init__(self, num_cascades: int = 12, sens_chans: int = 8, sens_pools: int = 4,
                 chans: int = 18, pools: int = 4, mask_center: bool = True, output: str = "rss"):
        super().__init__()
        self.config = VarNetConfig(num_cascades=num_cascades, chans=chans, pools=pools,
                                   sens_chans=sens_chans, sens_pools=sens_pools,
                                   mask_center=mask_center, output=output)
        self.sens_net = SensitivityModel(sens_chans, sens_pools, mask_center=mask_center)
        self.cascades = nn.ModuleList(VarNetBlock(NormUnet(chans, pools)) for _ in range(num_cascades))
        self.precision = "fp32"

    def set_precision(self, precision: str) -> "VarNet":
        """Run every U-Net's arithmetic in ``precision`` (``fp32``, ``bf16`` or ``fp16``, see
        :data:`PRECISIONS`) through ``torch.autocast``; everything outside the U-Nets stays fp32.
        A runtime choice, not part of the weights or the config. Returns ``self``."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        for module in self.modules():
            if isinstance(module, NormUnet):
                module.compute_dtype = PRECISIONS[precision]
        self.precision = precision
        return self

    @classmethod
    def from_config(cls, config: VarNetConfig) -> "VarNet":
        return cls(**config.to_dict())

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor,
                num_low_frequencies: AcsCount = None, sens_kspace: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_with_kspace(masked_kspace, mask, num_low_frequencies, sens_kspace)[0]

    def forward_with_kspace(self, masked_kspace: torch.Tensor, mask: torch.Tensor,
                            num_low_frequencies: AcsCount = None,
                            sens_kspace: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` that also returns the final multi-coil k-space ``(batch, coil, readout,
        phase)`` (the last cascade's output, from which the image is formed): ``(image, kspace)``.
        The safety check (``gadget.recon.safety``) measures its departure from the measured lines.

        ``sens_kspace``: optional k-space of a separate reference scan, the layout and dtype of
        ``masked_kspace``, holding only the reference lines; the sensitivity network then reads it
        instead of ``masked_kspace`` (its ``num_low_frequencies`` centre lines, which must be given
        explicitly: the imaging mask says nothing about the reference). None (default): the
        sensitivities come from ``masked_kspace``, as in fastMRI."""
        masked_kspace, mask = check_inputs(masked_kspace, mask)
        if sens_kspace is None:
            sens = self.sens_net(masked_kspace, mask, num_low_frequencies)
        else:
            sens = self.sens_net(_check_sens_kspace(sens_kspace, masked_kspace, num_low_frequencies), mask,
                                 num_low_frequencies)
        kspace = masked_kspace
        for cascade in self.cascades:
            kspace = cascade(kspace, masked_kspace, mask, sens)
        return self.final_image(kspace, sens), kspace

    def final_image(self, kspace: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        """Final multi-coil k-space ``(b, c, h, w)`` → real image ``(b, h, w)`` (``config.output``)."""
        if self.config.output == "sense":
            return sens_reduce(kspace, sens)[:, 0].abs()
        return rss(ifft2c(kspace), dim=1)


def check_inputs(masked_kspace: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate layouts; returns the mask as bool ``(b or 1, 1, 1, phase)``."""
    if not torch.is_complex(masked_kspace):
        raise TypeError(f"masked_kspace must be complex (batch, coil, readout, phase); got {masked_kspace.dtype}")
    if masked_kspace.ndim != 4:
        raise ValueError("masked_kspace must be (batch, coil, readout, phase); "
                         f"got shape {tuple(masked_kspace.shape)}")
    width = masked_kspace.shape[-1]
    if mask.ndim == 1:
        mask = mask.view(1, 1, 1, -1)
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != width \
            or mask.shape[0] not in (1, masked_kspace.shape[0]):
        raise ValueError(f"mask must be (batch or 1, 1, 1, {width}) or ({width},); got {tuple(mask.shape)}")
    return masked_kspace, mask.to(torch.bool)


def _check_sens_kspace(sens_kspace: torch.Tensor, masked_kspace: torch.Tensor,
                       num_low_frequencies: AcsCount) -> torch.Tensor:
    """Validate a separate reference k-space against the imaging k-space (same shape, complex)."""
    if not torch.is_complex(sens_kspace) or tuple(sens_kspace.shape) != tuple(masked_kspace.shape):
        raise ValueError("sens_kspace must be complex with the shape of masked_kspace "
                         f"{tuple(masked_kspace.shape)}; got {sens_kspace.dtype} {tuple(sens_kspace.shape)}")
    if num_low_frequencies is None or (isinstance(num_low_frequencies, int) and num_low_frequencies <= 0):
        raise ValueError("sens_kspace needs an explicit num_low_frequencies (the reference's line count): "
                         "detecting it from the imaging mask would ignore the reference")
    return sens_kspace


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VarNet", "VarNetConfig", "PRECISIONS", "VarNetBlock", "NormUnet", "SensitivityModel",
           "detect_num_low_frequencies", "count_parameters"]
