"""Training losses on magnitude images.

Layouts: ``output`` and ``target`` real ``(batch, H, W)`` or ``(batch, 1, H, W)`` of equal shape;
``data_range`` ``(batch,)`` — the volume maximum of each sample's target (fastMRI passes
``max_value``). Both losses return a scalar (mean over the batch).

* :func:`ssim_loss`: ``1 − mean SSIM`` with fastMRI's ``SSIMLoss`` semantics — a 7×7 uniform
  window over the pixels whose window fits ("valid" convolution), sample covariance
  (``N/(N−1)``), ``C1 = (k1·L)²``, ``C2 = (k2·L)²`` with ``k1 = 0.01``, ``k2 = 0.03``.
* :func:`l1_loss`: ``mean |output − target| / L`` (L = data range), so its scale does not depend
  on the data's units.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_4d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1] == 1:
        return x
    raise ValueError(f"{name} must be (batch, H, W) or (batch, 1, H, W), got {tuple(x.shape)}")


def _check(output: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor):
    output, target = _as_4d(output, "output"), _as_4d(target, "target")
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    data_range = torch.as_tensor(data_range, dtype=output.dtype, device=output.device).reshape(-1)
    if data_range.shape[0] not in (1, output.shape[0]):
        raise ValueError(f"data_range has {data_range.shape[0]} entries for a batch of {output.shape[0]}")
    return output, target, data_range


def ssim_loss(output: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor,
              win_size: int = SSIM_WIN_SIZE, k1: float = SSIM_K1, k2: float = SSIM_K2) -> torch.Tensor:
    """``1 − SSIM(output, target)`` averaged over the valid windows of the batch (see module doc)."""
    x, y, data_range = _check(output, target, data_range)
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images must be at least {win_size}×{win_size} for SSIM, got {tuple(x.shape[-2:])}")
    window = torch.ones(1, 1, win_size, win_size, dtype=x.dtype, device=x.device) / win_size**2
    n = win_size**2
    cov_norm = n / (n - 1)
    c1 = ((k1 * data_range) ** 2).view(-1, 1, 1, 1)
    c2 = ((k2 * data_range) ** 2).view(-1, 1, 1, 1)
    ux, uy = F.conv2d(x, window), F.conv2d(y, window)
    uxx, uyy, uxy = F.conv2d(x * x, window), F.conv2d(y * y, window), F.conv2d(x * y, window)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return 1 - ssim_map.mean()


def l1_loss(output: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
    """``mean(|output − target| / data_range)`` per sample, averaged over the batch."""
    x, y, data_range = _check(output, target, data_range)
    return ((x - y).abs() / data_range.view(-1, 1, 1, 1)).mean()


class TrainingLoss(nn.Module):
    """``loss(output, target, data_range)`` for a kind in ``("ssim", "l1")``."""

    KINDS = {"ssim": ssim_loss, "l1": l1_loss}

    def __init__(self, kind: str = "ssim"):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(self.KINDS)}")
        self.kind = kind

    def forward(self, output: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
        return self.KINDS[self.kind](output, target, data_range)


__all__ = ["ssim_loss", "l1_loss", "TrainingLoss"]
