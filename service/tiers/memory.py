"""The in-process tier: bounded by entries and by bytes, least recently used evicted first.

One `OrderedDict` holds the entries in recency order, and an entry's cost is computed from
the entry itself, so the tier keeps a single hash table. The cachetools caches used before
kept three or four (values, sizes, recency order, and for `TLRUCache` a heap of expiry items
that kept replaced and evicted items until it was twice the size of the cache); each table
doubles once keys churn, and RSS kept growing long after the tier was full. Writing 1M
distinct keys at a 64 MiB bound (bench/memory_tier_rss.py, 97k entries held, glibc's mmap
threshold fixed), RSS grew by 62 MiB at fill and 87 MiB at 1M keys with `TLRUCache`, 55 and
73 with `LRUCache`, 45 and 51 here: flat from the first resize of the table after fill on.
With glibc's default dynamic threshold, each resized table is allocated in the heap and the
freed one leaves a hole malloc keeps: up to 12 MiB more.

Expiry is checked where an entry is read: an expired entry found by get, contains or
invalidate is dropped and not returned. `expire()` (the sweeper's, once a minute) walks every
entry to drop the expired ones nobody reads; it runs in the event loop and costs about
0.15 µs per entry (15 ms for the default bound of 100,000 entries).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Set as AbstractSet

from service.glob import compile_pattern
from service.metrics import Metrics
from service.tiers.base import Entry

#: Bytes an entry costs beyond its key's and value's length: their object headers (about
#: 50 and 33), the Entry (64), its version int (32) and expiry float (32, when it has one),
#: the OrderedDict's node (32), and its share of the hash table (index, entry and node
#: pointer: 23 bytes a slot, 3 to 6 slots an entry once keys churn, so 68-136). Measured with
#: bench/memory_tier_rss.py (1M distinct keys, 10-byte keys, 190-byte values, 64 MiB bound,
#: MALLOC_MMAP_THRESHOLD_=131072): RSS growth once the table has settled, per entry held,
#: less the key and value: 349 bytes with 96k entries held, 324 with 120k. 360 is the top of
#: the range, so the byte bound holds whatever the number of entries.
ENTRY_OVERHEAD_BYTES = 360


#: How long the version of a dropped key (or pattern) is remembered, so that a read of a lower
#: tier that was in flight when it was dropped cannot bring the older copy back: a read takes
#: milliseconds.
SUPERSEDED_MEMORY_SECONDS = 5.0
#: Above this many remembered keys, those older than the memory above are forgotten.
SUPERSEDED_TRACKED = 10_000


def _cost(key: str, entry: Entry) -> int:
    return len(key) + len(entry.raw) + ENTRY_OVERHEAD_BYTES


def _expired(entry: Entry, now: float) -> bool:
    return entry.expires_at is not None and not now < entry.expires_at


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
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        # Least recently used first.
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._evicted = metrics.memory_evictions.inc
        #: Recently dropped keys and patterns: the version that dropped them, and when.
        self._superseded: dict[str, tuple[int, float]] = {}
        self._superseded_patterns: list[tuple[Callable[[str], bool], int, float]] = []
        self._entries_gauge = metrics.tier_entries.labels(self.name)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None or self._dropped_if_expired(key, entry):
            return None
        self._entries.move_to_end(key)
        return entry

    def contains(self, key: str) -> bool:
        """Whether a live entry is held (without making it the most recently used)."""
        entry = self._entries.get(key)
        return entry is not None and not self._dropped_if_expired(key, entry)

    def set(self, key: str, entry: Entry) -> None:
        self._remove(key)
        cost = _cost(key, entry)
        # Too big to hold at all, or expired already: the older copy is gone either way.
        if cost <= self._max_bytes and not _expired(entry, self._clock()):
            entries = self._entries
            while entries and (
                len(entries) >= self._max_entries or self._bytes + cost > self._max_bytes
            ):
                old_key, old = entries.popitem(last=False)
                self._bytes -= _cost(old_key, old)
                self._evicted()
            entries[key] = entry
            self._bytes += cost
        self._publish()

    def delete(self, key: str) -> int:
        entry = self._remove(key)
        self._publish()
        return int(entry is not None and not _expired(entry, self._clock()))

    def invalidate(self, key: str, below: int) -> int:
        """Drop the key if the entry held is older than version `below`; remember `below`."""
        now = time.monotonic()
        if self._superseded.get(key, (0, 0.0))[0] < below:
            self._superseded[key] = (below, now)
        if len(self._superseded) > SUPERSEDED_TRACKED:
            self._superseded = {
                k: seen
                for k, seen in self._superseded.items()
                if now - seen[1] < SUPERSEDED_MEMORY_SECONDS
            }
        entry = self._entries.get(key)
        if entry is None or self._dropped_if_expired(key, entry) or entry.version >= below:
            return 0
        return self.delete(key)

    def delete_pattern(
        self, pattern: str, below: int | None = None, limit: int | None = None
    ) -> int:
        """Drop matching entries (only those older than version `below`, at most `limit`);
        with `below` and no `limit`, remember it (a bounded delete may leave matching keys)."""
        matches = compile_pattern(pattern)
        if below is not None and limit is None:
            moment = time.monotonic()
            self._superseded_patterns = [
                p for p in self._superseded_patterns
                if moment - p[2] < SUPERSEDED_MEMORY_SECONDS
            ]  # fmt: skip
            self._superseded_patterns.append((matches, below, moment))
        now = self._clock()
        doomed = [
            key
            for key, entry in self._entries.items()
            if matches(key)
            and not _expired(entry, now)
            and (below is None or entry.version < below)
        ][:limit]
        for key in doomed:
            self._remove(key)
        self._publish()
        return len(doomed)

    def superseded(self, key: str, version: int) -> bool:
        """Whether a copy of `key` at `version` (read from another tier) is older than a
        change that dropped the key here within the last few seconds."""
        now = time.monotonic()
        dropped = self._superseded.get(key)
        if (
            dropped is not None
            and dropped[0] > version
            and now - dropped[1] < SUPERSEDED_MEMORY_SECONDS
        ):
            return True
        return any(
            below > version and now - at < SUPERSEDED_MEMORY_SECONDS and matches(key)
            for matches, below, at in self._superseded_patterns
        )

    def keep_only(self, keys: AbstractSet[str]) -> None:
        """Drop every entry but these (after losing track of what other instances changed)."""
        for key in [k for k in self._entries if k not in keys]:
            self._remove(key)
        self._publish()

    def expire(self) -> None:
        """Drop expired entries now (they are never served either way; this frees memory).

        Walks every entry: about 0.1-0.2 µs each, in the event loop.
        """
        now = self._clock()
        for key in [k for k, entry in self._entries.items() if _expired(entry, now)]:
            self._remove(key)
        self._publish()

    def _remove(self, key: str) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= _cost(key, entry)
        return entry

    def _dropped_if_expired(self, key: str, entry: Entry) -> bool:
        if entry.expires_at is None or self._clock() < entry.expires_at:
            return False
        self._remove(key)
        self._publish()
        return True

    def _publish(self) -> None:
        self._entries_gauge.set(len(self._entries))
        self._metrics.memory_bytes.set(self._bytes)
