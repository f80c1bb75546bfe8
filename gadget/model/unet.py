"""The U-Net used inside E2E-VarNet (Ronneberger et al. 2015, as configured by fastMRI).

Module and parameter names follow ``fastmri.models.Unet`` so that official state
dicts load with strict checking: ``down_sample_layers.{i}.layers.{0,4}.weight``,
``conv.layers.{0,4}.weight``, ``up_transpose_conv.{i}.layers.0.weight``,
``up_conv.{i}.layers.{0,4}.weight`` and the final ``up_conv.{last}.1.{weight,bias}``.

Layout: real tensors ``(batch, channels, height, width)``; height and width must be
divisible by ``2**num_pools`` for an exact round trip (NormUnet pads to 16).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Module):
    """Two × (3×3 conv without bias → instance norm → LeakyReLU(0.2) → channel dropout)."""

    def __init__(self, in_chans: int, out_chans: int, drop_prob: float = 0.0):
        super().__init__()
        stages = []
        for c_in in (in_chans, out_chans):
            stages += [
                nn.Conv2d(c_in, out_chans, kernel_size=3, padding=1, bias=False),
                nn.InstanceNorm2d(out_chans),
                nn.LeakyReLU(negative_slope=0.2, inplace=True),
                nn.Dropout2d(drop_prob),
            ]
        self.layers = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransposeConvBlock(nn.Module):
    """2×2 stride-2 transposed conv (doubles height and width) → instance norm → LeakyReLU(0.2)."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Unet(nn.Module):
    """Encoder of ``num_pool_layers`` ConvBlocks with 2×2 average pooling, a bottleneck,
    and a decoder of transposed convs + skip concatenation; a 1×1 conv (with bias) at the end.

    Channels double at every level: ``chans, 2·chans, …``; the bottleneck has ``2**num_pool_layers · chans``.
    """

    def __init__(self, in_chans: int, out_chans: int, chans: int = 32,
                 num_pool_layers: int = 4, drop_prob: float = 0.0):
        super().__init__()
        self.in_chans, self.out_chans = in_chans, out_chans
        self.chans, self.num_pool_layers = chans, num_pool_layers

        widths = [chans * 2**i for i in range(num_pool_layers)]  # encoder output widths
        self.down_sample_layers = nn.ModuleList(
            ConvBlock(c_in, c_out, drop_prob) for c_in, c_out in zip([in_chans] + widths[:-1], widths)
        )
        self.conv = ConvBlock(widths[-1], widths[-1] * 2, drop_prob)

        self.up_conv = nn.ModuleList()  # registered before up_transpose_conv: the reference's key order
        self.up_transpose_conv = nn.ModuleList()
        for level, width in enumerate(reversed(widths)):
            self.up_transpose_conv.append(TransposeConvBlock(width * 2, width))
            block = ConvBlock(width * 2, width, drop_prob)
            if level == num_pool_layers - 1:
                block = nn.Sequential(block, nn.Conv2d(width, out_chans, kernel_size=1))
            self.up_conv.append(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down_sample_layers:
            x = block(x)
            skips.append(x)
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        x = self.conv(x)
        for up, block in zip(self.up_transpose_conv, self.up_conv):
            skip = skips.pop()
            x = up(x)
            # Odd sizes lose a row/column to pooling; restore it by reflection at the bottom/right.
            pad_w = skip.shape[-1] - x.shape[-1]
            pad_h = skip.shape[-2] - x.shape[-2]
            if pad_w or pad_h:
                x = F.pad(x, [0, pad_w, 0, pad_h], mode="reflect")
            x = block(torch.cat([x, skip], dim=1))
        return x
