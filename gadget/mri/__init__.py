"""Pure k-space math on tensors: FFTs, coil operators, masks, metrics. No I/O."""
from .coils import normalize_sens, rss, sens_expand, sens_reduce
from .fft import fft2c, ifft2c

__all__ = ["fft2c", "ifft2c", "rss", "sens_expand", "sens_reduce", "normalize_sens"]
