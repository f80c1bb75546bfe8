"""Instance norm + LeakyReLU in one C kernel for the U-Nets' CPU inference path (``csrc/instance_norm.c``).

Why: PyTorch's eager passes (:func:`gadget.model.unet.instance_norm_leaky_relu_` without this kernel) read
and write each activation about ten times over: sums, centring, the squares' temporary, the scale, the
activation. The kernel reads it twice for the statistics and once more to normalise and activate in place,
four to five times faster per norm; the measured effect on a whole forward is in
docs/results/performance.md ("A fused instance norm").

How it is built: at first use, with the machine's C compiler, into a per-user cache
(:mod:`gadget.mri.native`, which says where and how). Without a compiler, where the build fails, or with
``VARNET_FUSED_NORM=0``, the norms run as PyTorch passes and a warning says why, once. The call releases the
GIL, so slices side by side norm side by side.

Layout: a real float32 ``(batch, channels, height, width)`` CPU tensor in channels-last memory, normalised
in place (the caller's fresh activation). Other tensors are left to the PyTorch passes.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from ..mri.native import NativeKernel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "instance_norm.c"
KERNEL = NativeKernel(
    SOURCE, "instance_norm_leaky_relu",
    [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_double, ctypes.c_double], ctypes.c_int,
    "VARNET_FUSED_NORM",
    "fused instance norm unavailable (%s): the U-Nets' norms run as PyTorch passes, slower on the CPU", log)


def kernel():
    """The C function, or None when it is switched off or cannot be built (logged once, with the reason)."""
    return KERNEL.get()


def instance_norm_leaky_relu_(x: torch.Tensor, eps: float, slope: float) -> bool:
    """Normalise and activate ``x`` in place with the C kernel; False (``x`` untouched) where it does not apply:
    not a plain float32 CPU tensor in channels-last memory, autograd recording, or no kernel."""
    if not (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last)
            and not (x.requires_grad and torch.is_grad_enabled())):
        return False
    run = kernel()
    if run is None:
        return False
    b, c, h, w = x.shape
    return run(x.data_ptr(), b, h * w, c, float(eps), float(slope)) == 0
