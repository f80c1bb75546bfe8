"""The reconstruction engine: one loaded model on one device, fed batches of slices.

Layouts: k-space ``(batch, coil, readout, phase)`` complex64; mask ``(phase,)`` bool;
images out ``(batch, readout, phase)`` float32 (RSS magnitude, not cropped). ``sens_kspace`` (optional):
a separate reference scan's k-space in the layout of the k-space, holding only its reference lines; the
sensitivity network reads it instead of the imaging k-space (``VarNet.forward``'s ``sens_kspace``).

Fixed-map model variants (``model.needs_maps``: ``vnu-k``, ``vnu``, ``vn``; see gadget/model/varnet.py):
the engine computes each slice's ESPIRiT maps (:func:`gadget.baselines.espirit.fixed_maps`) from its ACS
block (from the separate reference's when there is one), on the CPU before the forward, and passes them as
``sens_maps``. They are cached by the ACS block's bytes (with the shape and ACS count): the safety check's
re-run, which withholds a few sampled lines *outside* the ACS band, reuses them. The cache is an LRU bounded
by ``maps_cache_bytes`` (default 256 MiB of complex64 maps: 11 slices of 12 coils × 640 × 368; maps
larger than the bound are not kept), enough for a slice and its re-run in each of ~10 concurrently served scans of
that size (more with smaller slices). The cache is not counted in the server's k-space memory budget.

The engine returns the network's output as it is (``run``: the image and the final k-space; calling it: the
image). The parallel-imaging refinement is a stage after it (:mod:`gadget.recon.refine_stage`, held by
:class:`gadget.recon.pipeline.ScanReconstructor`), run outside the engine's lock.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from typing import Optional

import numpy as np
import torch

from ..baselines.espirit import fixed_maps
from ..model.varnet import VarNet
from ..mri.lru import ByteLRU
from ..mri.masks import contiguous_center_lines
from .allocator import keep_freed_memory

log = logging.getLogger(__name__)
MAPS_CACHE_BYTES = 256 << 20


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
    """Runs E2E-VarNet on batches; thread-safe (at most ``forwards`` forward passes at a time per engine; the
    default 1 serialises them, which bounds the activations' memory to one pass).

    ``precision``: the U-Nets' arithmetic (``fp32``, ``bf16``, ``fp16``; see
    :meth:`VarNet.set_precision`), set on ``model`` itself (engines sharing one model share it);
    ``None`` keeps the model's current setting. ``maps_cache_bytes``: bound of the fixed-map cache
    (:class:`MapsCache`; used only by the fixed-map variants, ``model.needs_maps``). ``checkpoint_refine``:
    the refine the loaded checkpoint records (:func:`gadget.model.checkpoint.default_refine`; what a
    config's ``refine: auto`` stands for, :func:`gadget.recon.refine_stage.applied_refine`), set by
    :func:`gadget.recon.pipeline.build_engine`; ``None`` for a model passed in without one. ``forwards``: how
    many threads may run a forward at once (``--workers`` of ``varnet infer`` and ``replay``: on a CPU,
    slices side by side on a share of the intra-op threads each, :func:`gadget.mri.parallel.in_workers`).
    The engine itself never refines."""

    def __init__(self, model: VarNet, device: str | torch.device = "auto", precision: Optional[str] = None,
                 maps_cache_bytes: int = MAPS_CACHE_BYTES, checkpoint_refine: Optional[str] = None,
                 forwards: int = 1):
        if forwards < 1:
            raise ValueError(f"forwards must be >= 1, got {forwards}")
        self.checkpoint_refine = checkpoint_refine
        self.forwards = forwards
        self.maps_cache = MapsCache(maps_cache_bytes)
        self.device = resolve_device(device) if isinstance(device, str) else device
        keep_freed_memory()  # per-slice tensors reuse their pages instead of page-faulting afresh
        if precision is not None:
            model.set_precision(precision)
        if model.precision != "fp32" and self.device.type == "cpu":
            log.warning("U-Nets in %s on the CPU (%s): without bf16/fp16 units (AMX, AVX512-BF16/FP16) this is far "
                        "slower than fp32 (measured: docs/results/performance.md); it pays on GPUs",
                        model.precision, torch.backends.cpu.get_cpu_capability())
        self.model = model.to(self.device).eval()
        self._slots = threading.BoundedSemaphore(forwards)  # one per forward admitted at once

    def with_model(self, model: VarNet) -> "Reconstructor":
        """An engine for ``model`` (e.g. adapted from this one's) on the same device, with the same maps
        cache bound, checkpoint refine and concurrent forwards; the model's precision is left as it is."""
        return Reconstructor(model, self.device, None, self.maps_cache.max_bytes, self.checkpoint_refine,
                             self.forwards)

    @torch.inference_mode()
    def __call__(self, kspace: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
                 num_low_frequencies: Optional[int] = None,
                 sens_kspace: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """The network's images ``(batch, readout, phase)`` float32 (its plain forward)."""
        extra = self._extra(kspace, mask, num_low_frequencies, sens_kspace)
        k, m = self._inputs(kspace, mask)
        with self._slots:
            out = self.model(k, m, num_low_frequencies, **extra)
        return out.float().cpu().numpy()

    @property
    def needs_maps(self) -> bool:
        return bool(getattr(self.model, "needs_maps", False))

    @torch.inference_mode()
    def run(self, kspace: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
            num_low_frequencies: Optional[int] = None,
            sens_kspace: np.ndarray | torch.Tensor | None = None,
            sens_maps: Optional[np.ndarray] = None, coil_images: bool = False) -> tuple:
        """Like calling the engine, but also returns the model's final multi-coil k-space:
        ``(images (batch, readout, phase) float32, kspace (batch, coil, readout, phase) complex64)``.
        Needs a model with ``forward_with_kspace`` (:class:`VarNet`). ``sens_kspace``: see the module
        docstring (None: the sensitivities come from ``kspace``, as always before). ``sens_maps``: fixed maps
        already computed (:meth:`fixed_maps_for`; fixed-map variants only), else they are computed here.
        ``coil_images``: a third item, the final coil images ``ifft2c(kspace)``, a complex tensor on the
        engine's device (for the refine stage's prior, :class:`gadget.recon.refine_stage.Refiner`)."""
        out = self.run_tensors(kspace, mask, num_low_frequencies, sens_kspace, sens_maps, coil_images)
        arrays = out[0].float().cpu().numpy(), out[1].to(torch.complex64).cpu().numpy()
        return (*arrays, out[2]) if coil_images else arrays

    @torch.inference_mode()
    def run_tensors(self, kspace, mask, num_low_frequencies=None, sens_kspace=None,
                    sens_maps=None, coil_images: bool = False) -> tuple:
        """:meth:`run`'s work, its image and final k-space (and with ``coil_images`` the final coil images)
        left as tensors on the engine's device."""
        forward = getattr(self.model, "forward_with_kspace", None)
        if forward is None:
            raise TypeError(f"{type(self.model).__name__} has no forward_with_kspace: the safety check and the "
                            "refinement need the final k-space (use gadget.model.varnet.VarNet)")
        extra = ({"sens_maps": torch.from_numpy(sens_maps).to(self.device)} if sens_maps is not None
                 else self._extra(kspace, mask, num_low_frequencies, sens_kspace))
        k, m = self._inputs(kspace, mask)
        if coil_images:
            extra["coil_images"] = True
        with self._slots:
            return forward(k, m, num_low_frequencies, **extra)

    def _extra(self, kspace, mask, num_low_frequencies, sens_kspace) -> dict:
        """The model's keyword inputs besides k-space, mask and ACS count: ``sens_kspace`` (e2e) or the
        fixed ``sens_maps`` (computed from the reference when given, else from the k-space; cached)."""
        if not self.needs_maps:
            return {} if sens_kspace is None else {"sens_kspace": self._kspace(sens_kspace)}
        maps = self.fixed_maps_for(kspace, mask, num_low_frequencies, sens_kspace)
        return {"sens_maps": torch.from_numpy(maps).to(self.device)}

    def fixed_maps_for(self, kspace, mask, num_low_frequencies=None, sens_kspace=None) -> np.ndarray:
        """The fixed maps of a fixed-map variant for this input (from the separate reference when given, else
        from the k-space; cached per slice): complex64 ``(batch, coil, readout, phase)``."""
        if sens_kspace is not None and (num_low_frequencies is None
                                        or (torch.as_tensor(num_low_frequencies) <= 0).any()):
            raise ValueError("a separate reference (sens_kspace) needs an explicit num_low_frequencies (its line count)")
        return self.maps_for(_numpy_batch(kspace if sens_kspace is None else sens_kspace), mask, num_low_frequencies)

    def maps_for(self, kspace: np.ndarray, mask, num_low_frequencies=None) -> np.ndarray:
        """Fixed maps complex64 ``(batch, coil, readout, phase)`` for k-space of that layout, one slice at a
        time through the cache. ``mask``: ``(phase,)`` or one row per slice; ``num_low_frequencies``: None
        (found from each slice's mask row), an int or one per slice."""
        batch, phase = kspace.shape[0], kspace.shape[-1]
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        rows = np.broadcast_to(m.astype(bool).reshape(-1, phase), (batch, phase))
        if num_low_frequencies is None:
            counts = [contiguous_center_lines(r) for r in rows]
        elif isinstance(num_low_frequencies, (int, np.integer)):
            counts = [int(num_low_frequencies)] * batch
        else:
            flat = torch.as_tensor(num_low_frequencies).reshape(-1).tolist()
            counts = [int(v) for v in (flat * batch if len(flat) == 1 else flat)]
        counts = [c if c > 0 else contiguous_center_lines(r) for c, r in zip(counts, rows)]  # 0: detect, as VarNet
        out = np.empty(kspace.shape, np.complex64)
        for i in range(batch):
            out[i] = self.maps_cache.get_or_compute(kspace[i], rows[i], counts[i])
        return out

    def _inputs(self, kspace, mask) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.as_tensor(np.asarray(mask, dtype=bool) if not isinstance(mask, torch.Tensor) else mask)
        return self._kspace(kspace), m.to(self.device)

    def _kspace(self, kspace) -> torch.Tensor:
        """``(batch, coil, readout, phase)`` (or one slice without batch) → complex64 on the device."""
        k = torch.as_tensor(kspace)
        if k.ndim == 3:
            k = k.unsqueeze(0)
        return k.to(self.device, torch.complex64)


def _numpy_batch(kspace) -> np.ndarray:
    """complex64 numpy ``(b, coil, readout, phase)`` from a slice or a batch, numpy or torch."""
    k = kspace.detach().cpu().numpy() if isinstance(kspace, torch.Tensor) else np.asarray(kspace)
    k = k.astype(np.complex64, copy=False)
    return k if k.ndim == 4 else k[None]


class MapsCache:
    """LRU of fixed (ESPIRiT) maps keyed by ``(shape, ACS count, blake2b of the ACS block's complex64
    bytes)``, the block being the ``num_low`` centre phase columns (fastMRI's placement) over all coils and
    readout, which is all ESPIRiT reads. Bounded by ``max_bytes`` of stored maps (:class:`ByteLRU`; maps
    larger than that are not kept). Thread-safe; two threads missing the same key both compute it (the
    same result)."""

    def __init__(self, max_bytes: int = MAPS_CACHE_BYTES):
        self._entries = ByteLRU(max_bytes)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @staticmethod
    def key(kspace: np.ndarray, num_low: int) -> tuple:
        cols = kspace.shape[-1]
        left = (cols - num_low + 1) // 2
        block = np.ascontiguousarray(kspace[..., max(left, 0):max(left, 0) + max(num_low, 0)], np.complex64)
        return kspace.shape, int(num_low), hashlib.blake2b(block.tobytes(), digest_size=20).hexdigest()

    def get_or_compute(self, kspace: np.ndarray, mask_row: np.ndarray, num_low: int) -> np.ndarray:
        """Maps complex64 ``(coil, readout, phase)`` of one slice (:func:`fixed_maps`; its errors pass
        through, e.g. fewer than 2 ACS lines)."""
        key = self.key(kspace, num_low)
        hit = self._entries.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        maps = fixed_maps(kspace, mask_row, num_low)
        self._entries.put(key, maps)
        return maps
