"""Intra-op threads for small passes.

Each parallel region of PyTorch's CPU kernels needs every intra-op thread scheduled at once; on a busy
machine the second of two threads often is not, and a pass that takes well under a millisecond alone then
waits a scheduler time slice for it (measured in docs/results/performance.md, "The network on two shared
cores"). :class:`serial` runs the passes over tensors below :data:`SERIAL_BELOW` elements on the calling
thread alone; convolutions, FFTs and passes over larger tensors keep all threads.

:class:`all_threads` gives one large operation inside such a block (a tall matrix product) the threads back.

With PyTorch's OpenMP backend the intra-op count is the calling thread's own once it has run parallel
work; ``torch.set_num_threads`` also sets the count that threads started later begin with.

:func:`in_workers` runs independent items (slices) side by side, each worker thread on its share of the
intra-op threads: small convolutions and memory-bound passes use two cores better as two one-thread
streams than as one two-thread stream (docs/results/performance.md, "Slices side by side").
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

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
            _set_aside().append(self.saved)
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.saved > 1:
            _set_aside().pop()
            torch.set_num_threads(self.saved)


_LOCAL = threading.local()


def _set_aside() -> list[int]:
    """The thread counts this thread's open :class:`serial` blocks set aside, innermost last."""
    if not hasattr(_LOCAL, "counts"):
        _LOCAL.counts = []
    return _LOCAL.counts


class all_threads:
    """Context: inside a :class:`serial` block, one large operation (a tall matrix product) on the threads
    that block set aside; elsewhere nothing changes."""

    __slots__ = ("count",)

    def __enter__(self):
        counts = _set_aside()
        self.count = counts[-1] if counts and torch.get_num_threads() == 1 else 0
        if self.count:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc):
        if self.count:
            torch.set_num_threads(1)


def blocks(count: int, item_bytes: int, budget: int) -> list[slice]:
    """``count`` items in consecutive blocks of near-equal size, each spanning at most ``budget`` bytes where
    one item fits (``item_bytes`` each; one item per block where it does not): a pass over a block then finds
    the block in cache when the next pass reads it."""
    if count < 1:
        return []
    per = max(1, budget // max(1, item_bytes))
    n = -(-count // per)
    edges = [round(i * count / n) for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


_END = object()  # in_workers: the source is exhausted


def in_workers(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, results in the items' order. ``workers`` 1 (or a sized ``items`` of one):
    on the calling thread, as a plain loop, with all its threads. More: ``min(workers, len(items))`` threads
    where ``items`` has a length, each with ``threads // workers`` intra-op threads (at least one) of the
    caller's count, at most ``workers`` items in flight; the caller's count is restored when the results
    are consumed or the generator is closed.

    Each result is handed back as soon as it and those before it are done, not when the next item arrives:
    ``items`` is read on a thread of its own (one item ahead), so a live stream whose next slice is minutes
    away still gets this slice's image now. An exception from ``fn`` reaches the caller when its item's
    result is due; one from ``items`` after the results of the items it gave."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if hasattr(items, "__len__"):
        workers = max(1, min(workers, len(items)))
    if workers == 1:
        yield from map(fn, items)
        return
    saved = torch.get_num_threads()
    share = max(1, saved // workers)
    source = iter(items)
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(share,))
    reader = ThreadPoolExecutor(1, thread_name_prefix="in-workers-source")
    pending: deque = deque()
    upcoming = reader.submit(next, source, _END)
    try:
        while pending or upcoming is not None:
            if pending and pending[0].done():
                yield pending.popleft().result()
            elif upcoming is not None and upcoming.done() and upcoming.exception() is not None:
                while pending:  # the items the source gave before it failed keep their results
                    yield pending.popleft().result()
                upcoming.result()
            elif upcoming is not None and upcoming.done() and len(pending) < workers:
                item = upcoming.result()
                if item is _END:
                    upcoming = None
                else:
                    pending.append(pool.submit(fn, item))
                    upcoming = reader.submit(next, source, _END)
            else:
                due = [pending[0]] if pending else []
                if upcoming is not None and len(pending) < workers:
                    due.append(upcoming)
                wait(due, return_when=FIRST_COMPLETED)
    finally:
        reader.shutdown(wait=False, cancel_futures=True)  # a source blocked on its input ends with that input
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(saved)  # the count new threads start with, and the caller's own
