"""The in-process tier: bounded by entries and by bytes, least recently used evicted first."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from cachetools import TLRUCache

from service.glob import compile_pattern
from service.metrics import Metrics
from service.tiers.base import Entry

#: Bytes an entry costs beyond its value: key, Entry, the cache's dict slots, order and heap
#: items (measured about 500 with 1M entries).
ENTRY_OVERHEAD_BYTES = 500

_NEVER = float("inf")


def _expiry(_key: str, entry: Entry, _now: float) -> float:
    return _NEVER if entry.expires_at is None else entry.expires_at


def _size(entry: Entry) -> int:
    return len(entry.raw) + ENTRY_OVERHEAD_BYTES


class _BoundedTLRU(TLRUCache[str, Entry]):
    """TLRUCache bounded by bytes (its maxsize) and also by a count of entries."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        timer: Callable[[], float],
        on_evict: Callable[[], None],
    ) -> None:
        super().__init__(max_bytes, _expiry, timer=timer, getsizeof=_size)
        self._max_entries = max_entries
        self._on_evict = on_evict

    def __setitem__(self, key: str, value: Entry, *args: Any) -> None:
        while key not in self and len(self) >= self._max_entries:
            self.popitem()
        super().__setitem__(key, value)

    def popitem(self) -> tuple[str, Entry]:
        item = super().popitem()
        self._on_evict()
        return item


class MemoryTier:
    """This process's copy of recent entries; expired entries are never returned."""

    name = "memory"

    def __init__(
        self,
        metrics: Metrics,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._cache = _BoundedTLRU(max_entries, max_bytes, clock, metrics.memory_evictions.inc)
        self._entries_gauge = metrics.tier_entries.labels(self.name)

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def bytes_used(self) -> int:
        return int(self._cache.currsize)

    def get(self, key: str) -> Entry | None:
        return self._cache.get(key)

    def contains(self, key: str) -> bool:
        return key in self._cache

    def set(self, key: str, entry: Entry) -> None:
        if _size(entry) > self._cache.maxsize:
            # Too big to hold at all: make sure no older copy lingers instead.
            self._cache.pop(key, None)
        else:
            self._cache[key] = entry
        self._publish()

    def delete(self, key: str) -> int:
        found = self._cache.pop(key, None) is not None
        self._publish()
        return int(found)

    def invalidate(self, key: str, below: int) -> int:
        """Drop the key if the entry held is older than version `below`."""
        entry = self._cache.get(key)
        if entry is None or entry.version >= below:
            return 0
        return self.delete(key)

    def delete_pattern(
        self, pattern: str, below: int | None = None, limit: int | None = None
    ) -> int:
        """Drop matching entries (only those older than version `below`, at most `limit`)."""
        matches = compile_pattern(pattern)
        doomed = [
            key
            for key, entry in list(self._cache.items())
            if matches(key) and (below is None or entry.version < below)
        ][:limit]
        for key in doomed:
            self._cache.pop(key, None)
        self._publish()
        return len(doomed)

    def keep_only(self, keys: AbstractSet[str]) -> None:
        """Drop every entry but these (after losing track of what other instances changed)."""
        for key in [k for k in list(self._cache.keys()) if k not in keys]:
            self._cache.pop(key, None)
        self._publish()

    def expire(self) -> None:
        """Drop expired entries now (they are never served either way; this frees memory)."""
        self._cache.expire()
        self._publish()

    def _publish(self) -> None:
        self._entries_gauge.set(len(self._cache))
        self._metrics.memory_bytes.set(self._cache.currsize)
