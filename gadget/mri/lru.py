"""A least-recently-used mapping bounded by the bytes of its values (numpy arrays or torch tensors)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable, Optional


def _nbytes(value: Any) -> int:
    if hasattr(value, "nbytes"):  # numpy; torch tensors have it too (numel · element_size)
        return int(value.nbytes)
    return int(value.numel() * value.element_size())


class ByteLRU:
    """``get``/``put`` with least-recently-used eviction once the stored values exceed ``max_bytes``;
    a value larger than ``max_bytes`` on its own is not stored. Thread-safe."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.held = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.held -= _nbytes(old)
            self._entries[key] = value
            self.held += size
            while self.held > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.held -= _nbytes(evicted)
