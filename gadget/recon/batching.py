"""Cross-scan batching: many connections, one model, one forward pass per batch.

Each scan thread calls the engine as if it were alone; a worker thread gathers pending
requests with the same k-space shape (up to ``max_batch``, waiting at most ``window_s`` for
company), runs one forward pass with per-sample masks and ACS counts, and hands each caller
its own images. Device access is therefore serialised (one forward at a time) and batched.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .engine import Reconstructor

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared by identity: the queue's remove() must not compare arrays
class _Request:
    kspace: np.ndarray          # complex64 (b, coil, readout, phase)
    mask: np.ndarray            # bool (phase,)
    num_low: Optional[int]
    sens_kspace: Optional[np.ndarray]            # a separate reference (b, coil, readout, phase), or None
    sens_maps: Optional[np.ndarray] = None       # fixed maps (b, coil, readout, phase) of a fixed-map variant
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[np.ndarray] = None          # images (b, readout, phase)
    final_kspace: Optional[np.ndarray] = None    # the model's final k-space (b, coil, readout, phase)
    wants_coil_images: bool = False
    coil_images: Optional[torch.Tensor] = None   # the final coil images (b, coil, readout, phase), if wanted
    error: Optional[BaseException] = None

    @property
    def key(self) -> tuple:
        return self.kspace.shape[1:], self.num_low is None, self.sens_kspace is None


class BatchingEngine:
    """Drop-in for :class:`Reconstructor` (same call signature), shared by all scans."""

    def __init__(self, engine: Reconstructor, max_batch: int = 4, window_s: float = 0.002):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.device = engine.device
        self.forward_calls = 0
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="batching-engine", daemon=True)
        self._worker.start()

    @property
    def needs_maps(self) -> bool:
        """As :attr:`Reconstructor.needs_maps`: the engine computes fixed maps per slice (in ``run``)."""
        return self.engine.needs_maps

    @property
    def checkpoint_refine(self) -> Optional[str]:
        """As :attr:`Reconstructor.checkpoint_refine` (what a config's ``refine: auto`` stands for)."""
        return getattr(self.engine, "checkpoint_refine", None)

    def __call__(self, kspace, mask, num_low_frequencies: Optional[int] = None, sens_kspace=None) -> np.ndarray:
        return self.run(kspace, mask, num_low_frequencies, sens_kspace)[0]

    def run(self, kspace, mask, num_low_frequencies: Optional[int] = None,
            sens_kspace=None, coil_images: bool = False) -> tuple:
        """:meth:`Reconstructor.run` through the shared queue: ``(images, final k-space)``, the network's
        (the refinement is the caller's stage, :mod:`gadget.recon.refine_stage`), and with ``coil_images``
        the final coil images. Requests with a separate reference (``sens_kspace``) are batched only with
        others that have one."""
        k, ref = _batched(kspace), None if sens_kspace is None else _batched(sens_kspace)
        # A fixed-map variant's ESPIRiT runs here, on the caller's thread: one scan's maps neither wait for
        # the shared worker nor, when they fail, fail the other scans of its batch.
        maps = self.engine.fixed_maps_for(k, mask, num_low_frequencies, ref) if self.engine.needs_maps else None
        req = _Request(k, np.asarray(mask, bool).reshape(-1), num_low_frequencies, ref, maps,
                       wants_coil_images=coil_images)
        with self._cond:
            if self._closed:
                raise RuntimeError("the reconstruction engine has been shut down")
            self._queue.append(req)
            self._cond.notify_all()
        while not req.done.wait(1.0):
            if not self._worker.is_alive():  # a clear error rather than a scan that waits for ever
                raise RuntimeError("the batching engine's worker thread has stopped; see the log")
        if req.error is not None:
            raise req.error
        if coil_images:
            return req.result, req.final_kspace, req.coil_images
        return req.result, req.final_kspace

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(5)

    def _take_batch(self) -> list[_Request]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch, size = [first], first.kspace.shape[0]
            waited = False
            while size < self.max_batch:
                match = next((r for r in self._queue if r.key == first.key
                              and size + r.kspace.shape[0] <= self.max_batch), None)
                if match is not None:
                    self._queue.remove(match)
                    batch.append(match)
                    size += match.kspace.shape[0]
                elif not waited and self.window_s > 0:
                    self._cond.wait(self.window_s)  # give concurrent scans a moment to join
                    waited = True
                else:
                    break
            return batch

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # logged; callers waiting or to come get a clear error (see run)
            log.exception("the batching engine's worker thread stopped")

    def _serve(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            try:
                self._forward(batch)
            except BaseException as exc:  # every caller in the batch gets the failure, the worker lives on
                for r in batch:
                    r.error = exc
            for r in batch:
                r.done.set()

    def _forward(self, batch: list[_Request]) -> None:
        kspace = np.concatenate([r.kspace for r in batch])
        masks = np.concatenate([np.broadcast_to(r.mask, (r.kspace.shape[0], r.mask.size)) for r in batch])
        counts = [r.kspace.shape[0] for r in batch]
        if batch[0].num_low is None:
            num_low = None
        else:
            num_low = torch.tensor(np.repeat([r.num_low for r in batch], counts))
        mask = torch.from_numpy(np.ascontiguousarray(masks)).view(len(masks), 1, 1, -1)
        sens = None if batch[0].sens_kspace is None else np.concatenate([r.sens_kspace for r in batch])
        maps = None if batch[0].sens_maps is None else np.concatenate([r.sens_maps for r in batch])
        self.forward_calls += 1
        coils = any(r.wants_coil_images for r in batch)
        out = self.engine.run(kspace, mask, num_low, sens_kspace=None if maps is not None else sens,
                              sens_maps=maps, coil_images=coils)
        start = 0
        for r, n in zip(batch, counts):
            r.result, r.final_kspace = out[0][start:start + n], out[1][start:start + n]
            if r.wants_coil_images:
                r.coil_images = out[2][start:start + n]
            start += n


def _batched(kspace) -> np.ndarray:
    """complex64 ``(b, coil, readout, phase)`` from one slice or a batch."""
    k = np.asarray(kspace, np.complex64)
    return k if k.ndim == 4 else k[None]
