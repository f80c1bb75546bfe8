"""A process-wide memory budget for the bytes scans hold in flight.

What a client can make the server hold is, above all, k-space: each slice (or 3-D volume) being
assembled is a buffer of the header's matrix times the channels, allocated at its first line. A
client that opens many slices, on many connections, could commit any amount. Every such buffer is
allocated through :meth:`MemoryBudget.zeros`: the bytes are reserved *before* the array exists and
released when the array is freed (a ``weakref.finalize`` on it, so every path that drops it — a
finished slice, a failed scan, a closed connection — gives the bytes back).

A reservation that does not fit waits up to ``wait_s`` for other scans to release memory, then is
refused with :class:`BudgetExceeded` naming the request, the use and the budget. The default budget
is half of the memory the process may use: the host's, or its container's limit (:func:`default_budget_bytes`).
"""
from __future__ import annotations

import logging
import os
import threading
import weakref

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.5


class BudgetExceeded(MemoryError):
    """A reservation does not fit the budget (after waiting); the message says how much was asked."""


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def physical_memory_bytes() -> int:
    """The memory this process may use: the host's RAM, or a container's cgroup limit when lower (a
    budget above it would end in the kernel's OOM killer instead of a clear refusal)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in _CGROUP_LIMITS:
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_budget_bytes(fraction: float = DEFAULT_FRACTION) -> int:
    return int(physical_memory_bytes() * fraction)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


class MemoryBudget:
    """Thread-safe byte counter with a capacity. ``in_use`` and ``peak`` are in bytes."""

    def __init__(self, capacity_bytes: int, wait_s: float = 10.0):
        if capacity_bytes <= 0:
            raise ValueError(f"memory budget must be > 0 bytes, got {capacity_bytes}")
        self.capacity, self.wait_s = int(capacity_bytes), float(wait_s)
        self.in_use = self.peak = 0
        self._cond = threading.Condition()

    def reserve(self, nbytes: int, what: str, wait_s: float | None = None) -> None:
        """Reserve ``nbytes`` for ``what`` (named in the error), waiting up to ``wait_s`` (default: the
        budget's) for room."""
        nbytes, wait_s = int(nbytes), self.wait_s if wait_s is None else wait_s
        if nbytes > self.capacity:
            raise BudgetExceeded(f"{what} needs {_mb(nbytes)}, more than the whole memory budget "
                                 f"({_mb(self.capacity)}; varnet serve --memory-budget)")
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + nbytes <= self.capacity, timeout=wait_s):
                raise BudgetExceeded(f"{what} needs {_mb(nbytes)}, but {_mb(self.in_use)} of the "
                                     f"{_mb(self.capacity)} memory budget is held by scans in progress")
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_use -= int(nbytes)
            self._cond.notify_all()

    def zeros(self, shape, dtype, what: str, wait_s: float | None = None) -> np.ndarray:
        """``np.zeros(shape, dtype)`` whose bytes are reserved first (:meth:`reserve`) and released when
        the array is freed."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.reserve(nbytes, what, wait_s)
        try:
            array = np.zeros(shape, dtype)
        except BaseException:
            self.release(nbytes)
            raise
        weakref.finalize(array, self.release, nbytes)
        return array

    def summary(self) -> str:
        return f"{_mb(self.in_use)} in use of {_mb(self.capacity)} (peak {_mb(self.peak)})"
