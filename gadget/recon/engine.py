"""The reconstruction engine: one loaded model on one device, fed batches of slices.

Layouts: k-space ``(batch, coil, readout, phase)`` complex64; mask ``(phase,)`` bool;
images out ``(batch, readout, phase)`` float32 (RSS magnitude, not cropped). ``sens_kspace`` (optional):
a separate reference scan's k-space in the layout of the k-space, holding only its reference lines; the
sensitivity network reads it instead of the imaging k-space (``VarNet.forward``'s ``sens_kspace``).
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

import numpy as np
import torch

from ..model.varnet import VarNet
from .allocator import keep_freed_memory

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available (torch {torch.__version__})")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)")
    return torch.device(name)


class Reconstructor:
    """Runs E2E-VarNet on batches; thread-safe (one forward at a time per engine).

    ``precision``: the U-Nets' arithmetic (``fp32``, ``bf16``, ``fp16``; see
    :meth:`VarNet.set_precision`), set on ``model`` itself (engines sharing one model share it);
    ``None`` keeps the model's current setting."""

    def __init__(self, model: VarNet, device: str | torch.device = "auto", precision: Optional[str] = None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        keep_freed_memory()  # per-slice tensors reuse their pages instead of page-faulting afresh
        if precision is not None:
            model.set_precision(precision)
        if model.precision != "fp32" and self.device.type == "cpu":
            log.warning("U-Nets in %s on the CPU (%s): without bf16/fp16 units (AMX, AVX512-BF16/FP16) this is far "
                        "slower than fp32 (measured 35x on AVX2, README Performance); it pays on GPUs",
                        model.precision, torch.backends.cpu.get_cpu_capability())
        self.model = model.to(self.device).eval()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def __call__(self, kspace: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
                 num_low_frequencies: Optional[int] = None,
                 sens_kspace: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        k, m = self._inputs(kspace, mask)
        extra = {} if sens_kspace is None else {"sens_kspace": self._kspace(sens_kspace)}
        with self._lock:
            out = self.model(k, m, num_low_frequencies, **extra)
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def run(self, kspace: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
            num_low_frequencies: Optional[int] = None,
            sens_kspace: np.ndarray | torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like calling the engine, but also returns the model's final multi-coil k-space:
        ``(images (batch, readout, phase) float32, kspace (batch, coil, readout, phase) complex64)``.
        Needs a model with ``forward_with_kspace`` (:class:`VarNet`). ``sens_kspace``: see the module
        docstring (None: the sensitivities come from ``kspace``, as always before)."""
        forward = getattr(self.model, "forward_with_kspace", None)
        if forward is None:
            raise TypeError(f"{type(self.model).__name__} has no forward_with_kspace: the safety check needs "
                            "the final k-space (use gadget.model.varnet.VarNet)")
        k, m = self._inputs(kspace, mask)
        extra = {} if sens_kspace is None else {"sens_kspace": self._kspace(sens_kspace)}
        with self._lock:
            image, final = forward(k, m, num_low_frequencies, **extra)
        return image.float().cpu().numpy(), final.to(torch.complex64).cpu().numpy()

    def _inputs(self, kspace, mask) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.as_tensor(np.asarray(mask, dtype=bool) if not isinstance(mask, torch.Tensor) else mask)
        return self._kspace(kspace), m.to(self.device)

    def _kspace(self, kspace) -> torch.Tensor:
        """``(batch, coil, readout, phase)`` (or one slice without batch) → complex64 on the device."""
        k = torch.as_tensor(kspace)
        if k.ndim == 3:
            k = k.unsqueeze(0)
        return k.to(self.device, torch.complex64)
