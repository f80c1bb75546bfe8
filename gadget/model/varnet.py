"""End-to-End Variational Network (Sriram et al. 2020), fastMRI-compatible.

Tensor layouts (all model inputs are checked at entry):

=================  ==========================================  ======================
name               shape                                       dtype
=================  ==========================================  ======================
masked_kspace      (batch, coil, readout, phase)               complex64/complex128
mask               (batch or 1, 1, 1, phase) or (phase,)       bool (True = sampled)
num_low_freqs      None, int, or (batch,) int tensor           ACS lines per sample
sens_kspace        None or as masked_kspace                    separate reference k-space
sens_maps          None or (batch or 1, coil, readout, phase)  complex, Σ|S|² = 1 or 0
output image       (batch, readout, phase)                     real magnitude (see below)
=================  ==========================================  ======================

Variants (``variant``, the seed paper's ablation, §4.1; one cascade class with a domain switch):

==========  ===================  ==========================  =========================================
variant     sensitivities        cascade state               regulariser R (per cascade)
==========  ===================  ==========================  =========================================
``e2e``     learned (eq. 12)     multi-coil k-space (eq. 10) NormUnet (U-Net)
``vnu-k``   fixed ``sens_maps``  multi-coil k-space (eq. 10) NormUnet
``vnu``     fixed ``sens_maps``  combined image x (eq. 7)    NormUnet
``vn``      fixed ``sens_maps``  combined image x (eq. 7)    shallow filters + RBF activations
                                                             (:mod:`gadget.model.vn_regularizer`)
==========  ===================  ==========================  =========================================

Image-space cascades: ``x ← x − η·Aᴴ(A x − y) − R(x)`` with ``A = M F S``, ``x₀ = Aᴴ y`` and a learned
step ``η`` per cascade (parameter ``cascades.{t}.step_size``; k-space cascades keep fastMRI's
``cascades.{t}.dc_weight``, so a bare state dict tells ``vnu`` from ``vnu-k``). Their output image is
``|x|`` and their "final k-space" (``forward_with_kspace``) is ``F S x``. The fixed maps come from outside
the model (``gadget.baselines.espirit.fixed_maps``: ESPIRiT on the ACS lines); fixed-map variants have no
``sens_net`` and refuse to run without ``sens_maps``; ``e2e`` refuses them.

The output image is the paper's root-sum-of-squares of the final coil images (``output="rss"``,
eq. 13; what official fastMRI checkpoints were trained with) or, with ``output="sense"``, the
magnitude of the final k-space combined with the model's own maps, ``|Σ_i S_i* F⁻¹(k_i)|``. The
two agree for coil images of the form S_i·x; they differ for noise: every update a cascade makes
lies in the range of E (or pulls toward the measured lines), so the part of the measured noise
that is orthogonal to the maps at the sampled lines survives into an RSS output, but is removed
by the combination. Against a noise-free target this matters: on simulated brains at 4× the same
weights scored far higher SSIM with the combination than with RSS (docs/results/shipped-weights.md, v1).

Parameter names equal those of ``fastmri.models.VarNet`` (``sens_net.norm_unet.unet.*``,
``cascades.{t}.model.unet.*``, ``cascades.{t}.dc_weight``) so official state dicts load.
Differences from the reference, on purpose: the ACS count is an explicit input (mask-based
detection only when it is not given), and zero/constant inputs give finite outputs
(the normalisation divides by a clamped std and a clamped RSS; the k-space is first divided by a
power of two near its mean magnitude, :func:`unit_scale`, so that the clamps guard only zeros
whatever units the scanner wrote; exported graphs take the data as given).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..data.typed_config import choice
from ..mri.coils import normalize_sens, rss, sens_expand, sens_reduce
from ..mri.fft import checkerboard, ifft2c
from ..mri.masks import detect_num_low_frequencies
from ..mri.parallel import blocks, serial
from .unet import Unet, channel_sums, fast_path, tracing
from .vn_regularizer import VNRegularizer

AcsCount = Union[None, int, torch.Tensor]
OUTPUTS = ("rss", "sense")
VARIANTS = ("e2e", "vnu-k", "vnu", "vn")  # the seed paper's ablation (§4.1); see the module docstring
FIXED_MAP_VARIANTS = ("vnu-k", "vnu", "vn")  # sensitivities given as ``sens_maps``, no sens_net
IMAGE_SPACE_VARIANTS = ("vnu", "vn")  # cascades update a coil-combined image, not k-space
# Arithmetic of the U-Nets (convolutions under torch.autocast); normalisation, FFTs, coil
# operators and data consistency always run in float32 / complex64.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_EPS = 1e-12  # far below any std / RSS of k-space at unit scale (unit_scale); only guards exact zeros


@dataclass(frozen=True)
class VarNetConfig:
    """Hyperparameters; defaults are the paper's (≈ 29.9 M parameters)."""

    num_cascades: int = 12
    chans: int = 18
    pools: int = 4
    sens_chans: int = 8
    sens_pools: int = 4
    mask_center: bool = True
    output: str = choice("rss", OUTPUTS)  # rss (paper, fastMRI) | sense (|R(k)| with the model's maps); module doc
    # "e2e" | "vnu-k" | "vnu" | "vn" (module doc). Unused fields: sens_* for the fixed-map variants,
    # chans/pools for "vn"; output only for the k-space variants (image-space ones output |x|).
    variant: str = choice("e2e", VARIANTS)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"VarNet variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"VarNet output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")

    def to_dict(self) -> dict:
        return asdict(self)


#: Bytes of level-0 U-Net activations (NormUnet, the inference fast path) and of coil images (the k-space
#: cascades at inference) worked on as one block; docs/results/performance.md, "Blocks of coils".
IMAGE_BLOCK_BYTES = 8 << 20
COIL_BLOCK_BYTES = 4 << 20


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
        if self.compute_dtype is None and fast_path(self, x):
            # a few images at a time: a block's activations stay in cache between the U-Net's passes (the
            # sensitivity network runs on every coil; docs/results/performance.md, "Blocks of coils")
            out = torch.empty_like(image)
            pairs = torch.view_as_real(out[:, 0])  # (b, h, w, 2)
            level0 = self.unet.chans * (((h - 1) | 15) + 1) * (((w - 1) | 15) + 1) * x.element_size()
            for part in blocks(b, level0, IMAGE_BLOCK_BYTES):
                pairs[part].copy_(self.forward_fast(x[part]).permute(0, 2, 3, 1))
            return out
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

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_channels` for :func:`gadget.model.unet.fast_path` inputs, channels-last
        throughout: the input ``(b, 2, h, w)`` view of the complex image already is that layout, and the
        de-normalisation is folded into the U-Net's final 1×1 convolution. Channels-last output."""
        b, _, h, w = x.shape
        with serial(x.numel()):  # two passes over the pixels (channel_sums) instead of std_mean's Welford
            mean = channel_sums(x).div_(h * w)
            x = x - mean
            std = channel_sums(torch.mul(x, x)).div_(h * w - 1).sqrt_().clamp_min_(_EPS)
            x.div_(std)
        h_mult, w_mult = ((h - 1) | 15) + 1, ((w - 1) | 15) + 1  # next multiple of 16
        top, left = (h_mult - h) // 2, (w_mult - w) // 2
        if (h_mult, w_mult) != (h, w):
            x = F.pad(x, [left, w_mult - w - left, top, h_mult - h - top])
        x = self.unet.forward_fast(x, scale=std.view(b, 2), shift=mean.view(b, 2))
        return x[..., top:top + h, left:left + w]


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


DOMAINS = ("kspace", "image")


class VarNetBlock(nn.Module):
    """One cascade, in one of two domains (``domain``):

    * ``"kspace"`` (seed eqs. 10-11; ``e2e``, ``vnu-k``): ``current`` is multi-coil k-space
      ``(b, c, h, w)``; k ← k − η·M(k − k̃) − E(CNN(R(k))); η is ``dc_weight``.
    * ``"image"`` (seed eq. 7; ``vnu``, ``vn``): ``current`` is the combined image x ``(b, 1, h, w)``;
      x ← x − η·Aᴴ(A x − k̃) − CNN(x) with A = M F S, Aᴴ = Sᴴ F⁻¹ M; η is ``step_size``.

    ``reference`` is the masked k-space k̃ ``(b, c, h, w)``, ``mask`` bool ``(b or 1, 1, 1, w)``, ``sens``
    the maps ``(b, c, h, w)``; ``model`` maps a complex ``(b, 1, h, w)`` image to one of the same shape."""

    def __init__(self, model: nn.Module, domain: str = "kspace"):
        super().__init__()
        if domain not in DOMAINS:
            raise ValueError(f"cascade domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
        self.model = model
        self.domain = domain
        if domain == "kspace":
            self.dc_weight = nn.Parameter(torch.ones(1))
        else:
            self.step_size = nn.Parameter(torch.ones(1))

    def forward(self, current: torch.Tensor, reference: torch.Tensor,
                mask: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=current.dtype, device=current.device)
        if self.domain == "image":
            residual = torch.where(mask, sens_expand(current, sens) - reference, zero)  # A x − k̃
            return current - self.step_size * sens_reduce(residual, sens) - self.model(current)
        soft_dc = torch.where(mask, current - reference, zero)
        refinement = sens_expand(self.model(sens_reduce(current, sens)), sens)
        return current - soft_dc * self.dc_weight - refinement

    def forward_unshifted(self, current: torch.Tensor, reference: torch.Tensor, mask_weight: torch.Tensor,
                          sens: torch.Tensor, sens_conj: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of a ``"kspace"`` cascade at inference, in the unshifted frame
        (:mod:`gadget.mri.fft`): ``current`` and ``reference`` are ``u = σ c k``, ``sens`` the maps times
        the checkerboard ``c`` (``sens_conj`` its conjugate, materialised); then E and R are plain FFTs
        (``fft2(S c x) = σ c F(S x)``) and the data consistency, per sample, is unchanged.
        ``mask_weight``: the mask as 0/1 in the real dtype, ``(b or 1, 1, 1, w)``. Without autograd (it
        writes into its own temporaries)."""
        parts = blocks(current.shape[1], current[0, 0].numel() * current.element_size(), COIL_BLOCK_BYTES)
        combined = None
        for here in parts:  # a block of coils at a time: the passes after its transform find it in cache
            images = torch.fft.ifft2(current[:, here], norm="ortho")
            with serial(images.numel()):
                part = images.mul_(sens_conj[:, here]).sum(dim=1, keepdim=True)
                combined = part if combined is None else combined.add_(part)
        refined = self.model(combined)
        out = torch.empty_like(current)
        weight = mask_weight * (-self.dc_weight)
        for here in parts:  # out = current − refinement − M(current − reference)·η
            with serial(sens[:, here].numel()):
                expanded = sens[:, here] * refined
            refinement = torch.fft.fft2(expanded, norm="ortho")
            with serial(refinement.numel()):
                torch.sub(current[:, here], refinement, out=out[:, here]).addcmul_(
                    current[:, here] - reference[:, here], weight)
        return out


class VarNet(nn.Module):
    """E2E-VarNet: sensitivity network + ``num_cascades`` unrolled refinement/data-consistency
    blocks + RSS output (seed eq. 13) or the map-combined output (``output="sense"``); with
    ``variant`` one of the paper's ablation models instead (module docstring). See the module
    docstring for layouts."""

    def __init__(self, num_cascades: int = 12, sens_chans: int = 8, sens_pools: int = 4,
                 chans: int = 18, pools: int = 4, mask_center: bool = True, output: str = "rss",
                 variant: str = "e2e"):
        super().__init__()
        self.config = VarNetConfig(num_cascades=num_cascades, chans=chans, pools=pools,
                                   sens_chans=sens_chans, sens_pools=sens_pools,
                                   mask_center=mask_center, output=output, variant=variant)
        self.sens_net: Optional[SensitivityModel] = (
            None if variant in FIXED_MAP_VARIANTS else SensitivityModel(sens_chans, sens_pools, mask_center=mask_center))
        domain = "image" if variant in IMAGE_SPACE_VARIANTS else "kspace"
        self.cascades = nn.ModuleList(
            VarNetBlock(VNRegularizer() if variant == "vn" else NormUnet(chans, pools), domain)
            for _ in range(num_cascades))
        self.precision = "fp32"

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def needs_maps(self) -> bool:
        """True for the fixed-map variants (``vnu-k``, ``vnu``, ``vn``): ``forward`` needs ``sens_maps``."""
        return self.config.variant in FIXED_MAP_VARIANTS

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
                num_low_frequencies: AcsCount = None, sens_kspace: Optional[torch.Tensor] = None,
                sens_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_with_kspace(masked_kspace, mask, num_low_frequencies, sens_kspace, sens_maps)[0]

    def forward_with_kspace(self, masked_kspace: torch.Tensor, mask: torch.Tensor,
                            num_low_frequencies: AcsCount = None,
                            sens_kspace: Optional[torch.Tensor] = None,
                            sens_maps: Optional[torch.Tensor] = None, coil_images: bool = False) -> tuple:
        """:meth:`forward` that also returns the final multi-coil k-space ``(batch, coil, readout,
        phase)`` (the last cascade's output, from which the image is formed): ``(image, kspace)``.
        The safety check (``gadget.recon.safety``) measures its departure from the measured lines.
        ``coil_images``: also return the final coil images ``ifft2c(kspace)``, complex ``(batch, coil, readout,
        phase)``, which the RSS output has formed already: ``(image, kspace, coil_images)`` (the refinement's
        prior reads them, ``gadget.recon.refine``).

        ``sens_kspace``: optional k-space of a separate reference scan, the layout and dtype of
        ``masked_kspace``, holding only the reference lines; the sensitivity network then reads it
        instead of ``masked_kspace`` (its ``num_low_frequencies`` centre lines, which must be given
        explicitly: the imaging mask says nothing about the reference). None (default): the
        sensitivities come from ``masked_kspace``, as in fastMRI. ``e2e`` only.

        ``sens_maps``: the fixed maps of the ``vnu-k``/``vnu``/``vn`` variants (required there, refused
        for ``e2e``), complex ``(batch or 1, coil, readout, phase)``, Σ|S|² = 1 where the object is and 0
        elsewhere. For the image-space variants the returned k-space is ``F S x``."""
        masked_kspace, mask = check_inputs(masked_kspace, mask)
        if tracing():  # exported graphs take the data as given
            return self._forward_with_kspace(masked_kspace, mask, num_low_frequencies, sens_kspace, sens_maps,
                                             coil_images)
        unit = unit_scale(masked_kspace)
        if sens_kspace is not None:
            sens_kspace = sens_kspace / unit
        out = self._forward_with_kspace(masked_kspace / unit, mask, num_low_frequencies, sens_kspace, sens_maps,
                                        coil_images)
        return (out[0] * unit.view(-1, 1, 1), *(t * unit for t in out[1:]))

    def _forward_with_kspace(self, masked_kspace, mask, num_low_frequencies, sens_kspace, sens_maps,
                             coil_images: bool) -> tuple:
        """:meth:`forward_with_kspace` on k-space of any scale the clamps leave alone (checked inputs)."""
        sens = self.sensitivities(masked_kspace, mask, num_low_frequencies, sens_kspace, sens_maps)
        if self._unshifted(masked_kspace):
            return self._forward_unshifted(masked_kspace, mask, sens, coil_images)
        state = self.initial_state(masked_kspace, sens)
        for cascade in self.cascades:
            state = cascade(state, masked_kspace, mask, sens)
        kspace = self.final_kspace(state, sens)
        if not coil_images:
            return self.final_image(state, sens), kspace
        images = ifft2c(kspace)
        rss_of_coils = self.config.variant not in IMAGE_SPACE_VARIANTS and self.config.output == "rss"
        return (rss(images, dim=1) if rss_of_coils else self.final_image(state, sens)), kspace, images

    def _unshifted(self, masked_kspace: torch.Tensor) -> bool:
        """Whether the cascades run in the unshifted frame (:meth:`_forward_unshifted`): k-space cascades,
        even sizes, autograd off."""
        h, w = masked_kspace.shape[-2:]
        return (type(masked_kspace) is torch.Tensor and self.config.variant not in IMAGE_SPACE_VARIANTS
                and h % 2 == 0 and w % 2 == 0
                and not torch.is_grad_enabled() and not tracing()
                and masked_kspace.dtype in (torch.complex64, torch.complex128))

    def _forward_unshifted(self, masked_kspace: torch.Tensor, mask: torch.Tensor,
                           sens: torch.Tensor, coil_images: bool = False) -> tuple:
        """The k-space cascades with k-space held as ``u = σ c k`` (:mod:`gadget.mri.fft`): no centring
        shifts inside the loop, one sign flip in and one out. Same function (and outputs) as the centred loop."""
        h, w = masked_kspace.shape[-2:]
        real = masked_kspace.real.dtype
        board = checkerboard(h, w, masked_kspace.device, real)
        to_unshifted = checkerboard(h, w, masked_kspace.device, real, centred=True)  # its own inverse
        with serial(masked_kspace.numel()):
            reference = masked_kspace * to_unshifted
            sens_c = sens * board
            sens_conj = sens_c.conj().resolve_conj()
        mask_weight = mask.to(real)
        state = reference
        for cascade in self.cascades:
            state = cascade.forward_unshifted(state, reference, mask_weight, sens_c, sens_conj)
        images = torch.fft.ifft2(state, norm="ortho")
        with serial(images.numel()):
            if self.config.output == "sense":
                image = (images * sens_conj if coil_images else images.mul_(sens_conj)).sum(dim=1).abs()
            else:
                image = rss(images, dim=1)  # |c| = 1
            kspace = state.mul_(to_unshifted)
            if coil_images:
                return image, kspace, images.mul_(board)  # c · ifft2(u) = ifft2c(k)
            return image, kspace

    def sensitivities(self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: AcsCount = None,
                      sens_kspace: Optional[torch.Tensor] = None,
                      sens_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The maps ``(b, c, h, w)`` the cascades use: the sensitivity network's (``e2e``) or the given
        fixed ``sens_maps`` (checked; other variants). Inputs as :meth:`forward_with_kspace` (checked)."""
        variant = self.config.variant
        if not self.needs_maps:
            if sens_maps is not None:
                raise ValueError(f"variant {variant!r} estimates its own sensitivities; sens_maps are only for "
                                 f"the fixed-map variants ({', '.join(FIXED_MAP_VARIANTS)})")
            if sens_kspace is None:
                return self.sens_net(masked_kspace, mask, num_low_frequencies)
            return self.sens_net(_check_sens_kspace(sens_kspace, masked_kspace, num_low_frequencies), mask,
                                 num_low_frequencies)
        if sens_maps is None:
            raise ValueError(f"variant {variant!r} needs fixed sensitivity maps: pass sens_maps, complex (batch, "
                             "coil, readout, phase) with Σ|S|² = 1 (gadget.baselines.espirit.fixed_maps)")
        if sens_kspace is not None:
            raise ValueError(f"variant {variant!r} has no sensitivity network to read sens_kspace: compute its "
                             "sens_maps from the reference k-space instead")
        return _check_sens_maps(sens_maps, masked_kspace, variant)

    def initial_state(self, masked_kspace: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        """What the first cascade refines: the masked k-space (k-space variants) or x₀ = Aᴴ k̃
        ``(b, 1, h, w)`` (image-space variants)."""
        if self.config.variant in IMAGE_SPACE_VARIANTS:
            return sens_reduce(masked_kspace, sens)
        return masked_kspace

    def final_image(self, state: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        """The last cascade's state → real image ``(b, h, w)``: final multi-coil k-space ``(b, c, h, w)``
        through ``config.output`` (k-space variants), or ``|x|`` of the image ``(b, 1, h, w)`` (image-space)."""
        if self.config.variant in IMAGE_SPACE_VARIANTS:
            return state[:, 0].abs()
        if self.config.output == "sense":
            return sens_reduce(state, sens)[:, 0].abs()
        return rss(ifft2c(state), dim=1)

    def final_kspace(self, state: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        """The last cascade's state → multi-coil k-space ``(b, c, h, w)``: itself, or ``F S x``."""
        if self.config.variant in IMAGE_SPACE_VARIANTS:
            return sens_expand(state, sens)
        return state


def unit_scale(kspace: torch.Tensor) -> torch.Tensor:
    """The power of two nearest the mean magnitude of the real and imaginary parts of each batch element's
    k-space ``(b, coil, readout, phase)``, real ``(b, 1, 1, 1)`` (1 where that mean is 0 or not finite; any
    level near the data's serves, and this one needs no square roots). The network is equivariant to the
    data's scale but for the clamps of its normalisations (:data:`_EPS`), which bite on k-space far below
    any scanner's units; dividing by a power of two is exact in floating point, so on data they leave alone
    the outputs are the same to the bit, and on data they would not, the clamps no longer act."""
    with torch.no_grad():
        level = torch.view_as_real(kspace).abs().mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1).to(torch.float64)
        exponent = torch.round(torch.log2(level))
        exponent = torch.where(torch.isfinite(exponent), exponent, torch.zeros_like(exponent)).clamp(-120, 120)
        return torch.exp2(exponent).to(kspace.real.dtype)


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


def _check_sens_maps(sens_maps: torch.Tensor, masked_kspace: torch.Tensor, variant: str,
                     tolerance: float = 1e-2) -> torch.Tensor:
    """Validate fixed maps against the k-space: complex, ``(batch or 1, coil, readout, phase)``, and
    Σ|S|² within ``tolerance`` of 1 or of 0 at every pixel. Returns them in the k-space's dtype/device."""
    b, c, h, w = masked_kspace.shape
    if not torch.is_complex(sens_maps) or sens_maps.ndim != 4 or tuple(sens_maps.shape[1:]) != (c, h, w) \
            or sens_maps.shape[0] not in (1, b):
        raise ValueError(f"variant {variant!r}: sens_maps must be complex (batch or 1, {c}, {h}, {w}); got "
                         f"{sens_maps.dtype} {tuple(sens_maps.shape)}")
    sens_maps = sens_maps.to(device=masked_kspace.device, dtype=masked_kspace.dtype)
    energy = (sens_maps.real ** 2 + sens_maps.imag ** 2).sum(dim=1)
    if bool(((energy - 1).abs() > tolerance).logical_and(energy > tolerance).any()):
        raise ValueError(f"variant {variant!r}: sens_maps are not normalised (Σ_coil |S|² must be 1 where the object "
                         f"is, 0 elsewhere; found values in [{float(energy.min()):.3g}, {float(energy.max()):.3g}])")
    return sens_maps


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VarNet", "VarNetConfig", "PRECISIONS", "VARIANTS", "FIXED_MAP_VARIANTS", "IMAGE_SPACE_VARIANTS", "VarNetBlock", "NormUnet", "SensitivityModel",
           "detect_num_low_frequencies", "count_parameters"]
