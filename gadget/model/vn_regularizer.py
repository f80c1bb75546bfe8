"""The original variational network's shallow regulariser (the ``vn`` variant's R).

Hammernik et al., "Learning a variational network for reconstruction of accelerated MRI data",
MRM 79:3055 (2018), as summarised in Sriram et al. 2020 §4.1 ("shallow convolutional networks with
RBF kernels that have about 150K parameters in total"): per cascade a field-of-experts gradient

    R(x) = Σ_i K_iᵀ φ_i(K_i x)

with ``K_i`` a ``k × k`` convolution of the 2-channel (real, imaginary) image, ``φ_i`` a learned
activation per filter built from ``Nw`` Gaussian radial basis functions with fixed, equally spaced
centres and learned weights, and ``K_iᵀ`` the transposed convolution with the *same* filter
(the gradient of the energy Σ_i ρ_i(K_i x); one filter bank per cascade, not two).

Sizes (our choice, documented; :data:`VN_FILTERS` etc.): ``Nk = 48`` filters of ``11 × 11`` on 2
channels, ``Nw = 31`` RBFs. Per cascade ``48·2·11·11 = 11,616`` filter taps + ``48·31 = 1,488`` RBF
weights = 13,104 parameters, plus the cascade's step size η: 13,105, i.e. **131,050 for the
paper's 10 cascades**, within 13 % of the seed paper's "about 150 K". (24 filters, a size sometimes
quoted, would give 65,530: too far from the paper's count.)

Other choices, ours:

* filters are **zero-mean** (the mean over channels and taps is subtracted in the forward pass, a
  reparametrisation with no extra parameters): R ignores a constant offset of the image, as
  Hammernik's constrained filters do;
* the image is divided by its per-sample RMS (over both channels and all pixels; clamped at 1e-12)
  before the filters and R is multiplied back by it, so the fixed RBF range
  ``[-VN_RBF_RANGE, VN_RBF_RANGE]`` fits any intensity unit and ``R(c·x) = c·R(x)`` for ``c > 0``;
* zero padding of ``k // 2`` on both sides, so ``conv_transpose2d`` with the same padding is the
  exact adjoint of the ``conv2d``;
* initialisation: filters normal, zero-mean, unit L2 norm each; RBF weights proportional to their
  centres so that each ``φ_i(z) ≈ 0.1·z`` in the range (a small linear diffusion to start from).

Layout: input and output complex ``(batch, 1, readout, phase)`` (the coil-combined image, as
:class:`gadget.model.varnet.NormUnet`). Runs in fp32 (the U-Net precision switch does not apply).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

VN_FILTERS = 48      # Nk
VN_KERNEL = 11       # k (filters are k × k)
VN_RBF = 31          # Nw Gaussian radial basis functions per activation
VN_RBF_RANGE = 3.0   # centres equally spaced over [-range, range] of the normalised filter responses
VN_INIT_SLOPE = 0.1  # initial φ_i(z) ≈ slope · z
_EPS = 1e-12


class RBFActivation(nn.Module):
    """``φ_i(z) = Σ_j w_ij exp(-(z − μ_j)² / (2σ²))`` per channel ``i`` of ``(b, Nk, h, w)``; centres
    ``μ_j`` fixed (not in the state dict), ``σ`` = the centre spacing, weights ``w`` ``(Nk, Nw)``
    learned."""

    def __init__(self, channels: int, num_rbf: int = VN_RBF, value_range: float = VN_RBF_RANGE):
        super().__init__()
        if num_rbf < 2:
            raise ValueError(f"num_rbf must be >= 2, got {num_rbf}")
        centres = torch.linspace(-value_range, value_range, num_rbf)
        self.register_buffer("centres", centres, persistent=False)
        self.sigma = 2 * value_range / (num_rbf - 1)
        # Σ_j μ_j exp(-(z-μ_j)²/2σ²) ≈ z · σ√(2π)/Δ (Δ = σ) inside the range
        init = VN_INIT_SLOPE * centres / math.sqrt(2 * math.pi)
        self.weight = nn.Parameter(init.repeat(channels, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(z)
        scale = -0.5 / self.sigma ** 2
        for j in range(self.centres.numel()):  # one (b, Nk, h, w) tensor at a time, not (…, Nw)
            out = out + self.weight[:, j].view(1, -1, 1, 1) * torch.exp(scale * (z - self.centres[j]) ** 2)
        return out


class VNRegularizer(nn.Module):
    """One cascade's ``R(x) = Σ_i K_iᵀ φ_i(K_i x)`` (module docstring); complex ``(b, 1, h, w)`` in
    and out. Parameters: ``filters`` ``(Nk, 2, k, k)`` and ``activation.weight`` ``(Nk, Nw)``."""

    def __init__(self, filters: int = VN_FILTERS, kernel: int = VN_KERNEL, num_rbf: int = VN_RBF):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"VN kernel must be odd (centred filters), got {kernel}")
        init = torch.randn(filters, 2, kernel, kernel)
        init = init - init.mean(dim=(1, 2, 3), keepdim=True)
        self.filters = nn.Parameter(init / init.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        self.activation = RBFActivation(filters, num_rbf)
        self.padding = kernel // 2

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, c, h, w = image.shape
        if c != 1 or not torch.is_complex(image):
            raise ValueError(f"VNRegularizer expects complex (batch, 1, h, w), got {image.dtype} {tuple(image.shape)}")
        out = self.forward_channels(torch.view_as_real(image[:, 0]).permute(0, 3, 1, 2))
        return torch.view_as_complex(out.permute(0, 2, 3, 1).contiguous()).unsqueeze(1)

    def forward_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The same on real ``(b, 2=[re, im], h, w)`` → ``(b, 2, h, w)`` (no complex dtype: exportable)."""
        scale = x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(_EPS)
        k = self.filters - self.filters.mean(dim=(1, 2, 3), keepdim=True)
        z = F.conv2d(x / scale, k, padding=self.padding)
        return F.conv_transpose2d(self.activation(z), k, padding=self.padding) * scale


__all__ = ["VNRegularizer", "RBFActivation", "VN_FILTERS", "VN_KERNEL", "VN_RBF", "VN_RBF_RANGE"]
