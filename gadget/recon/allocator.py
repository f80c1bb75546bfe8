"""Keep freed memory in the process instead of handing it back to the kernel after every tensor.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with a fresh ``mmap``
and unmaps them on ``free``; it also trims the heap's top when more than the trim threshold is
free. A forward pass allocates and frees hundreds of such tensors (one 15-coil 640x368 complex
image is 28 MB), so on every slice the kernel maps and zero-fills them afresh: hundreds of thousands
of page faults and seconds of system time per forward, for our static graph and for
``fastmri.models.VarNet`` alike (docs/results/performance.md, "What each change gave"). Raising both
thresholds keeps that memory mapped, so from the second slice on the same pages are reused (no faults).

The cost: freed memory stays resident. A server therefore hands it back between scans:
:func:`release_freed_memory` (glibc's ``malloc_trim(0)``) runs when its last scan ends, so the kept
memory serves the slices of a scan and its neighbours, and an idle server returns to its resting
footprint.

That works for the main arena only. glibc gives threads their own arenas (up to 8 per core), and the
top of such an arena's first heap shrinks only through ``heap_trim`` on a ``free``, which the raised trim
threshold switches off; ``malloc_trim`` gives back free chunks in an arena's bins but never the top of a
thread arena (glibc's ``mtrim`` calls ``systrim`` for the main arena only). A server runs every connection
on new threads, so each thread arena kept, for the life of the process, the largest top any of its
threads left, and the kept memory rose with the number of arenas rather than with the work in
progress. :func:`keep_freed_memory` therefore also sets ``M_ARENA_MAX`` to 1: every thread allocates
from the main arena, whose free pages ``malloc_trim`` returns whatever thread freed them. The arena
limit binds threads that get an arena after the call (call it early: a thread that already has an
arena keeps it).

Set ``VARNET_KEEP_FREED_MEMORY=0`` to leave glibc's defaults. Nothing happens on other C
libraries (macOS, musl); the facts are glibc's ``mallopt(3)``: ``M_TRIM_THRESHOLD`` = -1,
``M_MMAP_THRESHOLD`` = -3, ``M_ARENA_MAX`` = -8.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_BYTES = 1 << 30        # allocations below 1 GiB come from the heap, not a fresh mmap
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # the largest value mallopt's int argument holds
ARENA_MAX = 1                         # the main arena only: the one whose freed top malloc_trim returns
ENV_SWITCH = "VARNET_KEEP_FREED_MEMORY"

_applied: bool | None = None
_libc = None


def _glibc():
    """The C library through ctypes, or None when it is not glibc."""
    global _libc
    if _libc is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return _libc


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds and limit malloc to the main arena, once per process (see
    the module docstring). Returns whether they are in effect; idempotent and cheap to call again."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("%s=0: glibc's default mmap/trim thresholds kept", ENV_SWITCH)
        return False
    libc = _glibc()
    if libc is None:
        log.debug("not glibc (%s %s): allocator thresholds left alone", platform.system(), platform.libc_ver())
        return False
    # the arena limit first: kept memory that malloc_trim cannot return is worse than page faults
    ok = (libc.mallopt(M_ARENA_MAX, ctypes.c_int(ARENA_MAX)) == 1
          and libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_BYTES)) == 1
          and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_BYTES)) == 1)
    if not ok:
        log.warning("glibc refused mallopt(M_ARENA_MAX/M_MMAP_THRESHOLD/M_TRIM_THRESHOLD); every large tensor "
                    "will page-fault afresh")
    _applied = ok
    return ok


def release_freed_memory() -> bool:
    """Return free memory to the kernel (glibc ``malloc_trim(0)``: the free pages of every arena's bins,
    and the main arena's top; not a thread arena's top, hence :data:`ARENA_MAX`); False where there is
    no glibc. Costs a walk over the heap: call it between scans, not per slice."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True
