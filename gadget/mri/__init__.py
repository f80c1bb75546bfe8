"""Pure k-space math on tensors/arrays: FFTs, coil operators, masks, metrics. No I/O."""
from .coils import normalize_sens, rss, sens_expand, sens_reduce
from .fft import fft2c, ifft2c
from .masks import MaskSampler, MaskSpec, apply_mask, make_mask
from .metrics import center_crop, evaluate_volumes, nmse, psnr, ssim

__all__ = ["fft2c", "ifft2c", "rss", "sens_expand", "sens_reduce", "normalize_sens",
           "MaskSpec", "MaskSampler", "make_mask", "apply_mask",
           "center_crop", "nmse", "psnr", "ssim", "evaluate_volumes"]
