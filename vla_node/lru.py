"""A small thread-safe LRU map that counts hits and misses (the prefix, frame and grammar caches use it)."""
from __future__ import annotations

import collections
import threading
from typing import Callable, Hashable, TypeVar

__all__ = ["CountingLru", "LruBacked"]

Value = TypeVar("Value")


class CountingLru:
    """Keeps the ``capacity`` most recently used values; ``hits``/``misses`` count lookups."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get_or_make(self, key: Hashable, make: Callable[[], Value]) -> Value:
        """The value stored under ``key``, else ``make()``'s, stored (made outside the lock: it is
        the slow part, a prefill or a vision-tower run)."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
        value = make()
        with self._lock:
            self.misses += 1
            self._entries[key] = value
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value


class LruBacked:
    """Base for a cache kept in ``self._lru``: its hit/miss counters and ``clear``."""

    _lru: CountingLru

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    def clear(self) -> None:
        self._lru.clear()
