"""Intra-op threads for small passes.

Each parallel region of PyTorch's CPU kernels needs every intra-op thread scheduled at once; on a busy
machine the second of two threads often is not, and a pass that takes well under a millisecond alone then
waits a scheduler time slice for it (measured in docs/results/performance.md, "The network on two shared
cores"). :class:`serial` runs the passes over tensors below :data:`SERIAL_BELOW` elements on the calling
thread alone; convolutions, FFTs and passes over larger tensors keep all threads.

:class:`all_threads` gives one large operation inside such a block (a tall matrix product) the threads back.

``torch.set_num_threads`` is process-wide: while a ``serial`` block runs, another thread's intra-op work
also sees one thread (a matter of speed only; the caller's count is restored on exit).
"""
from __future__ import annotations

import torch

#: Element count below which :class:`serial` blocks run on one thread.
SERIAL_BELOW = 1 << 23


class serial:
    """Context: intra-op work on one thread when ``numel < below`` (default :data:`SERIAL_BELOW`; the
    caller's count restored)."""

    __slots__ = ("saved",)

    def __init__(self, numel: int, below: int = SERIAL_BELOW):
        self.saved = torch.get_num_threads() if numel < below else 1

    def __enter__(self):
        if self.saved > 1:
            _SET_ASIDE.append(self.saved)
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.saved > 1:
            _SET_ASIDE.pop()
            torch.set_num_threads(self.saved)


#: Thread counts the open :class:`serial` blocks set aside, innermost last (the count is process-wide).
_SET_ASIDE: list[int] = []


class all_threads:
    """Context: inside a :class:`serial` block, one large operation (a tall matrix product) on the threads
    that block set aside; elsewhere nothing changes."""

    __slots__ = ("count",)

    def __enter__(self):
        self.count = _SET_ASIDE[-1] if _SET_ASIDE and torch.get_num_threads() == 1 else 0
        if self.count:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc):
        if self.count:
            torch.set_num_threads(1)
