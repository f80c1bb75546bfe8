"""The U-Net used inside E2E-VarNet (Ronneberger et al. 2015, as configured by fastMRI).

Module and parameter names follow ``fastmri.models.Unet`` so that official state
dicts load with strict checking: ``down_sample_layers.{i}.layers.{0,4}.weight``,
``conv.layers.{0,4}.weight``, ``up_transpose_conv.{i}.layers.0.weight``,
``up_conv.{i}.layers.{0,4}.weight`` and the final ``up_conv.{last}.1.{weight,bias}``.

Layout: real tensors ``(batch, channels, height, width)``; height and width must be
divisible by ``2**num_pools`` for an exact round trip (NormUnet pads to 16).

Inference on the CPU in float32 (:func:`fast_path`: eval mode, autograd off, not traced or exported)
runs the same function in channels-last memory (NHWC), :meth:`Unet.forward_fast`: oneDNN's
convolutions read and write that layout directly instead of reordering every activation to and from
their blocked layout, with weights packed for oneDNN once (:func:`conv_fast`); the instance norm and
LeakyReLU are one C kernel (:mod:`gadget.model.fused_norm`; PyTorch passes where it cannot be built,
:func:`instance_norm_leaky_relu_`); a decoder level's convolution of
``cat([up, skip])`` is the sum of two convolutions, the second accumulating into the first's output
(oneDNN's sum post-op), so the concatenated tensor is never written; the final 1×1 convolution is a
matrix product. Same parameters, the same function up to float32 rounding (tests/test_varnet.py holds
it to fastMRI's reference).
"""
from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from ..mri.parallel import serial
from . import fused_norm


def tracing() -> bool:
    """True while TorchScript, ``torch.export``/dynamo or the ONNX exporter records the computation: the
    fast paths (which keep caches and call oneDNN directly) then step aside for the plain one."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export())


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook watches ``module`` or a submodule (then every layer must really be called)."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def fast_path(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may run its channels-last inference path on ``x``: float32 on the CPU, eval
    mode, autograd off (``torch.inference_mode`` / ``no_grad``), no autocast, not being traced, scripted
    or exported, and no forward hook on it or its layers (the fast path calls no layer module)."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32  # not a fake tensor
            and not module.training and not torch.is_grad_enabled() and not tracing()
            and not _autocast_on("cpu") and not _hooked(module))


def channel_sums(x: torch.Tensor) -> torch.Tensor:
    """``x.sum((2, 3), keepdim=True)`` of a ``(b, c, h, w)`` tensor. On channels-last memory the pixels are
    summed as rows of ``g·c`` values, ``g·c`` a multiple of 8 (the vector width of AVX2 floats), then the
    ``g`` partial sums per channel: PyTorch's reduction over rows of 18 or 36 values does not vectorise
    (docs/results/performance.md, "Blocks of coils"; the same cascaded sums, the same accuracy)."""
    b, c, h, w = x.shape
    g = 8 // math.gcd(c, 8)
    if (h * w) % g or not x.is_contiguous(memory_format=torch.channels_last):
        return x.sum((2, 3), keepdim=True)
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w // g, g * c)
    return rows.sum(1).view(b, g, c).sum(1).view(b, c, 1, 1)


def instance_norm_leaky_relu_(x: torch.Tensor, eps: float, slope: float) -> torch.Tensor:
    """``leaky_relu(instance_norm(x))`` (no affine parameters, biased variance, as ``nn.InstanceNorm2d``)
    in place on a fresh ``(b, c, h, w)`` tensor, any memory format (kept): the channel means subtracted,
    the variance taken from the centred values (two passes, so no cancellation; PyTorch's cascaded sums,
    :func:`channel_sums`), one scale, one LeakyReLU. On channels-last memory about a third of the work of
    ``torch.var_mean`` (Welford over a strided layout). Float32 channels-last CPU activations go to the C
    kernel of :mod:`gadget.model.fused_norm` instead (the same function in three passes over memory)."""
    if fused_norm.instance_norm_leaky_relu_(x, eps, slope):
        return x
    pixels = x.shape[2] * x.shape[3]
    with serial(x.numel()):
        x.sub_(channel_sums(x).div_(pixels))
        var = channel_sums(torch.mul(x, x)).div_(pixels)
        x.mul_(var.add_(eps).rsqrt_())
        return F.leaky_relu_(x, slope)


def _mkldnn_ops():
    """oneDNN's convolutions on weights packed once into its own layout (the ops PyTorch's compiler uses
    for CPU inference), or None where this build lacks them; then ``F.conv2d`` on channels-last weights."""
    try:
        ops = torch.ops.mkldnn
        needed = (ops._convolution_pointwise.default, ops._convolution_pointwise_.binary,
                  ops._convolution_transpose_pointwise.default, ops._reorder_convolution_weight.default,
                  ops._reorder_convolution_transpose_weight.default)
    except (AttributeError, RuntimeError):
        return None
    return ops if torch.backends.mkldnn.is_available() and all(needed) else None


_MKLDNN = _mkldnn_ops()
_PACK_ENTRIES = 4  # packed weights kept per convolution (one per input shape seen last)
# convolution module → {key: packed weight}; outside the module, so copies, pickles and state dicts never
# see it, and dropped with the module
_PACKED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_PACKING = threading.Lock()  # forwards run side by side (gadget.mri.parallel.in_workers) pack one at a time


def _weight_version(weight: torch.Tensor) -> int:
    try:
        return weight._version
    except RuntimeError:  # an inference tensor (created under torch.inference_mode) has no version counter
        return 0


def _packed_weight(conv: nn.Module, x: torch.Tensor, part: slice | None, transposed: bool):
    """``conv``'s weight (its input channels ``part``) prepared once per input shape for the fast path:
    packed for oneDNN, or channels-last (:data:`_MKLDNN` None). Kept beside the module (``_PACKED``), rebuilt
    when the weight changes (its storage or version)."""
    weight = conv.weight
    key = (weight.data_ptr(), _weight_version(weight), None if part is None else (part.start, part.stop),
           tuple(x.shape), _MKLDNN is not None)
    cache = _PACKED.get(conv)
    packed = None if cache is None else cache.get(key)
    if packed is not None:
        return packed
    with _PACKING:
        cache = _PACKED.setdefault(conv, {})
        packed = cache.get(key)
        if packed is not None:
            return packed
        w = weight.detach()
        w = (w[part] if transposed else w[:, part]) if part is not None else w
        w = w.contiguous(memory_format=torch.channels_last)
        if _MKLDNN is not None:
            if transposed:
                w = _MKLDNN._reorder_convolution_transpose_weight(w, list(conv.padding), list(conv.output_padding),
                                                                  list(conv.stride), list(conv.dilation),
                                                                  conv.groups, list(x.shape))
            else:
                w = _MKLDNN._reorder_convolution_weight(w, list(conv.padding), list(conv.stride),
                                                        list(conv.dilation), conv.groups, list(x.shape))
        if len(cache) >= _PACK_ENTRIES:
            cache.pop(next(iter(cache)))
        packed = cache[key] = w
    return packed


def conv_fast(x: torch.Tensor, conv: nn.Conv2d, part: slice | None = None, out: torch.Tensor | None = None):
    """``conv2d(x, conv.weight[:, part])`` (no bias) of a channels-last ``x``, added into ``out`` when given
    (oneDNN's sum post-op: ``out`` is read and written in place, no temporary)."""
    weight = _packed_weight(conv, x, part, transposed=False)
    if _MKLDNN is None:
        y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return y if out is None else out.add_(y)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if out is None:
        return _MKLDNN._convolution_pointwise(x, weight, None, *args, "none", [], "")
    return _MKLDNN._convolution_pointwise_.binary(out, x, weight, None, *args, "add", 1.0, None, [], None)


def conv_transpose_fast(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """``conv_transpose2d(x, conv.weight)`` (no bias) of a channels-last ``x``."""
    weight = _packed_weight(conv, x, None, transposed=True)
    if _MKLDNN is None:
        return F.conv_transpose2d(x, weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups,
                                  conv.dilation)
    return _MKLDNN._convolution_transpose_pointwise(x, weight, None, list(conv.padding), list(conv.output_padding),
                                                    list(conv.stride), list(conv.dilation), conv.groups,
                                                    "none", [], "")


def _norm_act_(y: torch.Tensor, norm: nn.InstanceNorm2d, act: nn.LeakyReLU) -> torch.Tensor:
    return instance_norm_leaky_relu_(y, norm.eps, act.negative_slope)


def pointwise_conv(x: torch.Tensor, conv: nn.Conv2d, scale=None, shift=None) -> torch.Tensor:
    """A 1×1 convolution with bias of a channels-last ``(b, c, h, w)`` tensor as one matrix product over the
    pixels; channels-last ``(b, out, h, w)``. ``scale``/``shift`` ``(b, out)``: the output times ``scale``
    plus ``shift``, folded into the product's weights and bias."""
    b, c, h, w = x.shape
    weight = conv.weight.view(conv.out_channels, c).t()  # (c, out)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=x.dtype, device=x.device)
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    if scale is None:
        out = torch.addmm(bias, pixels.reshape(b * h * w, c), weight).view(b, h, w, -1)
    else:
        weights = weight.unsqueeze(0) * scale.unsqueeze(1)  # (b, c, out)
        out = torch.baddbmm((bias * scale + shift).unsqueeze(1), pixels, weights).view(b, h, w, -1)
    return out.permute(0, 3, 1, 2)


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

    def forward_fast(self, x, skip=None) -> torch.Tensor:
        """:meth:`forward` for :func:`fast_path` inputs (dropout is the identity in eval mode); with
        ``skip``, of ``cat([x, skip], dim=1)`` without forming it (:func:`conv_fast` with ``out``)."""
        layers = self.layers
        if skip is None:
            y = conv_fast(x, layers[0])
        else:  # conv(cat([x, skip])) = conv(x, w[:, :c]) + conv(skip, w[:, c:])
            c = x.shape[1]
            y = conv_fast(skip, layers[0], slice(c, None), out=conv_fast(x, layers[0], slice(0, c)))
        x = _norm_act_(y, layers[1], layers[2])
        return _norm_act_(conv_fast(x, layers[4]), layers[5], layers[6])


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

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers
        return _norm_act_(conv_transpose_fast(x, layers[0]), layers[1], layers[2])


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
        if fast_path(self, x) and self.num_pool_layers > 0:
            return self.forward_fast(x)
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

    def forward_fast(self, x: torch.Tensor, scale=None, shift=None) -> torch.Tensor:
        """:meth:`forward` in channels-last memory (module docstring); the output is channels-last.
        ``scale``/``shift`` ``(b, out_chans)``: returns ``forward(x) * scale + shift`` (folded into the
        final 1×1 convolution)."""
        x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.down_sample_layers:
            x = block.forward_fast(x)
            skips.append(x)
            with serial(x.numel()):
                x = F.avg_pool2d(x, kernel_size=2, stride=2)
        x = self.conv.forward_fast(x)
        for up, block in zip(self.up_transpose_conv, self.up_conv):
            skip = skips.pop()
            x = up.forward_fast(x)
            pad_w = skip.shape[-1] - x.shape[-1]
            pad_h = skip.shape[-2] - x.shape[-2]
            if pad_w or pad_h:
                x = F.pad(x, [0, pad_w, 0, pad_h], mode="reflect").contiguous(memory_format=torch.channels_last)
            if isinstance(block, nn.Sequential):  # the last level: ConvBlock, then the 1×1 conv with bias
                return pointwise_conv(block[0].forward_fast(x, skip), block[1], scale, shift)
            x = block.forward_fast(x, skip)
        raise ValueError("a U-Net without pooling levels has no fast path")  # num_pool_layers >= 1 always
