"""E2E-VarNet as a static, real-valued graph for TorchScript and ONNX export.

The reference model cannot be exported: its ACS width is found from the mask at run time and its
tensors are complex. :class:`StaticVarNet` computes the same function as :class:`VarNet` for one
fixed k-space shape and ACS width, with complex numbers held as a trailing axis of 2 (re, im) and
complex dtypes used only as a view around the FFTs (ONNX ``DFT``, opset ≥ 17).

Layouts:

==============  ====================================  ===========================================
input kspace    (batch, coil, readout, phase, 2)      float32, masked k-space (re, im)
input mask      (phase,)                              float32, 1 = sampled line
input sens_maps (batch, coil, readout, phase, 2)      float32, fixed maps (re, im); only the
                                                      fixed-map variants (``vnu-k``, ``vnu``, ``vn``)
output          (batch, readout, phase)               float32, magnitude image (``config.output``;
                                                      ``|x|`` for the image-space variants)
==============  ====================================  ===========================================

The fixed-map variants take their ESPIRiT maps as a third input (computed outside the graph, e.g.
:func:`gadget.baselines.espirit.fixed_maps`): an eigen-decomposition per pixel has no place in it.
"""
from __future__ import annotations

import functools
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .varnet import _EPS, NormUnet, VarNet, center_lines_mask

EXPORT_FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18
MAX_REL_DIFF = 1e-4  # "same output": max |fast − plain| / max |plain| for exports and fast paths (the speed targets)


def _shift(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """fftshift (or ifftshift) over (rows, cols) of a real-layout ``(..., rows, cols, 2)`` tensor."""
    rows, cols = x.shape[-3], x.shape[-2]
    shifts = (-(rows // 2), -(cols // 2)) if inverse else (rows // 2, cols // 2)
    return torch.roll(x, shifts=shifts, dims=(-3, -2))


def fft2c_real(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Centered orthonormal 2-D (i)FFT of ``(..., rows, cols, 2)``; equals :func:`gadget.mri.fft.fft2c`."""
    z = torch.view_as_complex(_shift(x, inverse=True).contiguous())
    z = torch.fft.ifft2(z, norm="ortho") if inverse else torch.fft.fft2(z, norm="ortho")
    return _shift(torch.view_as_real(z), inverse=False)


def _split(n: int) -> tuple[int, int]:
    """``n = p·q`` with ``p`` the largest power of two dividing ``n`` and ``q`` odd."""
    p = n & -n
    return p, n // p


@functools.lru_cache(maxsize=64)
def _split_tables(n: int, inverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """For :func:`_dft_split`: twiddles ``exp(∓2πi·n2·k1/n)`` as ``(q, p, 2)`` and the ``q``-point DFT
    matrix ``exp(∓2πi·k2·n2/q)`` as ``(2, q, q)`` (real, imaginary), read-only float64 numpy arrays.

    The cache holds numpy arrays, never tensors: a tensor made here while the ONNX exporter traces is a
    fake one, and a cached fake tensor would reach every later eager call. :func:`_dft_split` makes the
    tensors per call."""
    p, q = _split(n)
    sign = 1.0 if inverse else -1.0
    n2 = np.arange(q, dtype=np.float64)
    twiddle = _unit_phasors(sign * 2 * math.pi * np.outer(n2, np.arange(p, dtype=np.float64)) / n, axis=-1)
    matrix = _unit_phasors(sign * 2 * math.pi * np.outer(n2, n2) / q, axis=0)
    return twiddle, matrix


def _unit_phasors(angle: np.ndarray, axis: int) -> np.ndarray:
    """``(cos, sin)`` of ``angle`` stacked along ``axis``, read-only (it is shared through a cache)."""
    table = np.stack((np.cos(angle), np.sin(angle)), axis=axis)
    table.flags.writeable = False
    return table


def _dft_split(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Unnormalised DFT over the second-to-last axis of real-layout ``(..., n, 2)``, as one
    Cooley-Tukey step ``n = p·q``: ``q`` FFTs of length ``p`` (a power of two; ONNX ``DFT``), twiddles,
    then ``p`` DFTs of length ``q`` as a real matrix product.

    Why: onnxruntime 1.32's ``DFT`` is fast and accurate for power-of-two lengths only; with plain
    DFT nodes the 640 x 368 model missed the eager output by more than the 1e-4 bound and ran several
    times slower than it, split it stays within the bound (benchmark input of
    gadget/bench/model_bench.py; docs/results/performance.md, "What each change gave")."""
    n = x.shape[-2]
    p, q = _split(n)
    inv_fft = functools.partial(torch.fft.ifft, norm="forward")  # inverse transform without 1/n
    fft = inv_fft if inverse else torch.fft.fft
    if q == 1:
        return torch.view_as_real(fft(torch.view_as_complex(x.contiguous()), dim=-1))
    twiddle, matrix = (torch.tensor(t, dtype=x.dtype, device=x.device) for t in _split_tables(n, inverse))
    lead = x.shape[:-2]
    grid = x.reshape(*lead, p, q, 2).transpose(-3, -2)                      # (..., n2, n1, 2), n = q·n1 + n2
    inner = torch.view_as_real(fft(torch.view_as_complex(grid.contiguous()), dim=-1)) if p > 1 else grid
    inner = cmul(inner, twiddle)                                             # (..., n2, k1, 2)
    re, im = inner[..., 0], inner[..., 1]
    out_re = torch.matmul(matrix[0], re) - torch.matmul(matrix[1], im)      # (..., k2, k1)
    out_im = torch.matmul(matrix[0], im) + torch.matmul(matrix[1], re)
    return torch.stack((out_re, out_im), dim=-1).reshape(*lead, n, 2)       # k = k1 + p·k2


def fft2c_split_real(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """:func:`fft2c_real` with every 1-D transform split by :func:`_dft_split` (for ONNX export)."""
    rows, cols = x.shape[-3], x.shape[-2]
    z = _shift(x, inverse=True)
    z = _dft_split(z, inverse)                                               # over cols
    z = _dft_split(z.transpose(-3, -2), inverse).transpose(-3, -2)           # over rows
    return _shift(z * (1.0 / math.sqrt(rows * cols)), inverse=False)


def cmul(a: torch.Tensor, b: torch.Tensor, conj_b: bool = False) -> torch.Tensor:
    """Complex product ``a·b`` (or ``a·conj(b)``) of real-layout tensors (broadcasting)."""
    ar, ai, br, bi = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    if conj_b:
        return torch.stack((ar * br + ai * bi, ai * br - ar * bi), dim=-1)
    return torch.stack((ar * br - ai * bi, ar * bi + ai * br), dim=-1)


def _norm_unet(net: NormUnet, images: torch.Tensor) -> torch.Tensor:
    """``(n, h, w, 2)`` → ``(n, h, w, 2)`` through a NormUnet's real-channel path."""
    return net.forward_channels(images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _regularise(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An image-space cascade's regulariser (NormUnet or the VN's) on ``(b, h, w, 2)``."""
    if isinstance(net, NormUnet):
        return _norm_unet(net, x)
    return net.forward_channels(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class StaticVarNet(nn.Module):
    """A :class:`VarNet` (weights shared, not copied) fixed to ``width`` phase lines and
    ``num_low_frequencies`` ACS lines; see the module docstring for layouts. ``split_dft``: FFTs as
    power-of-two FFTs and small matrix DFTs (:func:`fft2c_split_real`), for ONNX runtimes."""

    def __init__(self, model: VarNet, width: int, num_low_frequencies: int, split_dft: bool = False):
        super().__init__()
        self.fft2c = fft2c_split_real if split_dft else fft2c_real
        self.needs_maps = bool(getattr(model, "needs_maps", False))
        self.image_space = model.config.variant in ("vnu", "vn")
        if not 0 < num_low_frequencies <= width:
            raise ValueError(f"the ACS width must lie in 1..{width}, got {num_low_frequencies}")
        if model.precision != "fp32":
            raise ValueError(f"the static graph runs in fp32, but the model is set to {model.precision}; "
                             "call model.set_precision('fp32') first")
        self.model = model
        self.num_low_frequencies = int(num_low_frequencies)
        device = next(model.parameters()).device  # a graph traced on a GPU needs its constants there
        acs = center_lines_mask(width, torch.tensor([num_low_frequencies], device=device))
        self.register_buffer("acs_mask", acs.to(torch.float32).unsqueeze(-1), persistent=False)  # (1,1,1,w,1)

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, sens_maps: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        sampled = mask.reshape(1, 1, 1, -1, 1).to(kspace.dtype)
        if self.needs_maps != (sens_maps is not None):
            raise ValueError(f"variant {m.config.variant!r}: sens_maps are "
                             f"{'required' if self.needs_maps else 'not taken'} (fixed-map variants only)")
        sens = sens_maps if self.needs_maps else self.sensitivities(kspace)
        if self.image_space:
            return self._image_cascades(kspace, sampled, sens)
        current = kspace
        for cascade in m.cascades:
            coil_images = self.fft2c(current, inverse=True)
            combined = cmul(coil_images, sens, conj_b=True).sum(dim=1)            # (b, h, w, 2)
            refined = _norm_unet(cascade.model, combined).unsqueeze(1)           # (b, 1, h, w, 2)
            refinement = self.fft2c(cmul(refined, sens))
            current = current - (current - kspace) * sampled * cascade.dc_weight - refinement
        if m.config.output == "sense":
            combined = cmul(self.fft2c(current, inverse=True), sens, conj_b=True).sum(dim=1)
            return combined.pow(2).sum(dim=-1).sqrt()
        return self.fft2c(current, inverse=True).pow(2).sum(dim=(1, -1)).sqrt()

    def _image_cascades(self, kspace: torch.Tensor, sampled: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        """``vnu``/``vn``: x₀ = Aᴴ k̃, then x ← x − η·Aᴴ(A x − k̃) − R(x) (as VarNetBlock's image domain);
        returns |x| ``(b, h, w)``."""
        x = cmul(self.fft2c(kspace, inverse=True), sens, conj_b=True).sum(dim=1)           # (b, h, w, 2)
        for cascade in self.model.cascades:
            residual = (self.fft2c(cmul(x.unsqueeze(1), sens)) - kspace) * sampled
            gradient = cmul(self.fft2c(residual, inverse=True), sens, conj_b=True).sum(dim=1)
            x = x - cascade.step_size * gradient - _regularise(cascade.model, x)
        return x.pow(2).sum(dim=-1).sqrt()

    def sensitivities(self, kspace: torch.Tensor) -> torch.Tensor:
        """Normalised maps ``(b, coil, h, w, 2)`` from the fixed ACS block."""
        b, c, h, w, _ = kspace.shape
        acs = kspace * self.acs_mask if self.model.sens_net.mask_center else kspace
        coil_images = self.fft2c(acs, inverse=True).reshape(b * c, h, w, 2)
        sens = _norm_unet(self.model.sens_net.norm_unet, coil_images).reshape(b, c, h, w, 2)
        norm = sens.pow(2).sum(dim=(1, -1), keepdim=True).sqrt().clamp_min(_EPS)
        return sens / norm


@contextmanager
def _quiet(*names: str):
    """The ONNX exporter's libraries log every graph pass at INFO; keep them to warnings."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def example_inputs(coils: int, readout: int, phase: int, batch: int = 1,
                   maps: bool = False) -> tuple[torch.Tensor, ...]:
    """Zero k-space, an all-ones mask (and, with ``maps``, zero maps) of the export shape (tracing needs
    shapes, not values)."""
    kspace = torch.zeros(batch, coils, readout, phase, 2)
    return (kspace, torch.ones(phase)) + ((torch.zeros_like(kspace),) if maps else ())


def trace_static(model: VarNet, coils: int, readout: int, phase: int, num_low_frequencies: int):
    """:class:`StaticVarNet` of ``model`` traced to TorchScript for one k-space shape and ACS width,
    on the device the model's weights are on."""
    static = StaticVarNet(model.eval(), phase, num_low_frequencies).eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        inputs = tuple(t.to(device) for t in example_inputs(coils, readout, phase, maps=static.needs_maps))
        return torch.jit.trace(static, inputs, check_trace=False)


def export_model(model: VarNet, path: str | Path, fmt: str, coils: int, readout: int, phase: int,
                 num_low_frequencies: int) -> Path:
    """Write ``model`` for a fixed k-space shape and ACS width as TorchScript (``torch.jit.load``)
    or ONNX (onnxruntime); inputs/outputs as in the module docstring. Returns the path."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    path = Path(path)
    if fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError:
            raise RuntimeError("ONNX export needs onnx and onnxscript: pip install 'varnet-gadget[export]'") from None
    tmp = path.with_name(path.name + ".partial")
    try:
        if fmt == "torchscript":
            trace_static(model, coils, readout, phase, num_low_frequencies).save(str(tmp))
        else:
            static = StaticVarNet(model.eval(), phase, num_low_frequencies, split_dft=True).eval()
            names = ["kspace", "mask"] + (["sens_maps"] if static.needs_maps else [])
            with torch.no_grad(), _quiet("onnx_ir", "onnxscript", "torch.onnx"):
                torch.onnx.export(static, example_inputs(coils, readout, phase, maps=static.needs_maps), str(tmp),
                                  dynamo=True, opset_version=ONNX_OPSET, verbose=False, input_names=names,
                                  output_names=["image"], external_data=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def run_exported(path: str | Path, fmt: str, kspace: torch.Tensor, mask: torch.Tensor, threads: int = 0,
                 sens_maps: torch.Tensor | None = None):
    """Run an exported file on real-layout ``kspace`` and ``mask`` (and ``sens_maps`` for a fixed-map
    variant); returns a numpy image. ONNX runs in onnxruntime on the CPU (``threads`` intra-op threads;
    0: its default)."""
    inputs = (kspace, mask) + ((sens_maps,) if sens_maps is not None else ())
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(*inputs).numpy()
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("running ONNX files needs onnxruntime: pip install 'varnet-gadget[export]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"kspace": kspace.numpy(), "mask": mask.numpy()}
    if sens_maps is not None:
        feed["sens_maps"] = sens_maps.numpy()
    return session.run(None, feed)[0]


def verify_export(path: str | Path, fmt: str, model: VarNet, kspace: torch.Tensor, mask: torch.Tensor,
                  num_low_frequencies: int, sens_maps: torch.Tensor | None = None) -> float:
    """max |exported − eager| / max |eager| on complex ``kspace (b, c, h, w)`` and bool ``mask (w,)``
    (and complex ``sens_maps`` of that shape for a fixed-map variant)."""
    extra = {} if sens_maps is None else {"sens_maps": sens_maps}
    with torch.no_grad():
        eager = model.eval()(kspace * mask, mask, num_low_frequencies, **extra).numpy()
    real_k = torch.view_as_real(kspace * mask).contiguous()
    real_maps = None if sens_maps is None else torch.view_as_real(sens_maps).contiguous()
    exported = run_exported(path, fmt, real_k, mask.to(torch.float32), sens_maps=real_maps)
    return float(abs(exported - eager).max() / max(abs(eager).max(), 1e-30))
