"""Acquisition and reconstruction overlapped: the per-line half of the pipeline (reading the stream,
prewhitening, slice assembly) on a background thread, the per-slice half (model, images) on the
caller's, so slice k is reconstructed while slice k+1 is still arriving.

Only finished slices cross the thread boundary, so the hand-over costs one queue operation per slice,
not per line (per line, it cost more CPU than parsing the line, through lock and GIL hand-offs). At
most ``max_slices`` finished slices wait for the model; then the reader blocks and, over TCP, the
sender is held back by the socket's flow control instead of the process's memory growing.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

from ..stream.assemble import SliceData
from .pipeline import ScanReconstructor

_END = object()


def overlapped(scan: ScanReconstructor, items: Iterable[Any], max_slices: int = 8) -> Iterator[Any]:
    """``scan.run(items)`` on two threads; same items out, in the same order. An exception on the
    reading side (a broken stream, a bad line) is raised here after the slices completed before it
    have been reconstructed. Closing this generator stops the reader at its next item."""
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    q: queue.SimpleQueue = queue.SimpleQueue()
    slots = threading.Semaphore(max_slices)
    stop = threading.Event()

    def wait_for_slot() -> bool:
        while not stop.is_set():
            if slots.acquire(timeout=0.2):
                return True
        return False

    def produce() -> None:
        try:
            for item in scan.assembled(items):
                if isinstance(item, SliceData) and not wait_for_slot():
                    return
                if stop.is_set():
                    return
                q.put(item)
            q.put(_END)
        except BaseException as exc:  # handed to the consuming thread, which raises it
            q.put(exc)

    reader = threading.Thread(target=produce, name=f"assemble-{scan.source}", daemon=True)
    scan.reader_thread = reader  # a door joins it once the socket is closed (the reader then ends)
    reader.start()

    def drain() -> Iterator[Any]:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, SliceData):
                slots.release()
            yield item

    try:
        yield from scan.reconstruct(drain())
    finally:
        stop.set()  # a reader blocked in a socket read ends when its owner closes the socket
