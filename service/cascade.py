"""The read, write and delete policy over the three tiers.

Reads go Redis, memory, SQLite (or memory first in near-cache mode); the first live entry wins
and is copied into the tiers above it with its remaining TTL. Writes are acknowledged once
SQLite committed and memory holds the value; Redis gets it too when usable. Deletes clear
every tier. Every change carries a version, so Redis keeps the newest whatever the order of
arrival. A change that could not reach Redis is journaled in SQLite for replay (see
service/coherence.py). The cascade reads the mode and reports Redis failures; it never pings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from service.errors import WriteRejected
from service.glob import compile_pattern
from service.metrics import Metrics
from service.mode import Mode
from service.tiers.base import Entry, TierError
from service.tiers.memory import MemoryTier
from service.tiers.redis import RedisTier
from service.tiers.sqlite import SqliteTier
from service.versions import VersionClock

log = structlog.get_logger("tiercache.cascade")

#: How long a promotion is remembered, to be undone if a delete made elsewhere shows up late:
#: well beyond the feed's propagation window.
PROMOTION_MEMORY_SECONDS = 5.0
#: Above this many remembered promotions, forget those older than the memory above.
PROMOTIONS_TRACKED = 10_000


@dataclass(frozen=True, slots=True)
class Hit:
    """A live entry and the tier that had it."""

    entry: Entry
    tier: str


class Cascade:
    """Redis, then memory, then SQLite, switched by the mode."""

    def __init__(
        self,
        redis: RedisTier,
        memory: MemoryTier,
        database: SqliteTier,
        mode: Mode,
        metrics: Metrics,
        versions: VersionClock,
        *,
        near_cache: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.memory = memory
        self.database = database
        self.mode = mode
        self.versions = versions
        self.near_cache = near_cache
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()
        #: Recent promotions into Redis: key -> (version, monotonic time, task).
        self._promoted: dict[str, tuple[int, float, asyncio.Task[None]]] = {}
        self._hits = {t: metrics.tier_hits.labels(t) for t in ("redis", "memory", "database")}
        self._misses = {t: metrics.tier_misses.labels(t) for t in ("redis", "memory", "database")}
        self._errors = {t: metrics.tier_errors.labels(t) for t in ("redis", "memory", "database")}

    # Reads

    async def get(self, key: str) -> Hit | None:
        if self.near_cache:
            entry = self.memory.get(key)
            if entry is not None:
                self._hits["memory"].inc()
                return Hit(entry, "memory")
            self._misses["memory"].inc()

        if self.mode.redis_usable:
            try:
                entry = await self.redis.get(key)
            except TierError as error:
                self._redis_failed(error)
            else:
                if entry is not None and not self.database.unreplayed.hides(key, entry.version):
                    self._hits["redis"].inc()
                    if self.near_cache and not self.memory.superseded(key, entry.version):
                        self.memory.set(key, entry)
                    return Hit(entry, "redis")
                self._misses["redis"].inc()

        if not self.near_cache:
            entry = self.memory.get(key)
            if entry is not None:
                self._hits["memory"].inc()
                self._promote_to_redis(key, entry)
                return Hit(entry, "memory")
            self._misses["memory"].inc()

        try:
            entry = await self.database.get(key)
        except TierError as error:
            self._errors["database"].inc()
            log.error("sqlite read failed", error=str(error))
            entry = None
        # A change that dropped the key while this read was in flight wins: the copy read is
        # neither served nor put back into memory and Redis.
        if entry is None or self.memory.superseded(key, entry.version):
            self._misses["database"].inc()
            return None
        self._hits["database"].inc()
        self.memory.set(key, entry)
        self._promote_to_redis(key, entry)
        return Hit(entry, "database")

    async def contains(self, key: str) -> bool:
        """Whether any tier holds a live entry; moves nothing between tiers."""
        if self.mode.redis_usable:
            try:
                if not self.database.unreplayed.tracking:
                    if await self.redis.contains(key):
                        return True
                else:
                    entry = await self.redis.get(key)
                    if entry is not None and not self.database.unreplayed.hides(key, entry.version):
                        return True
            except TierError as error:
                self._redis_failed(error)
        if self.memory.contains(key):
            return True
        try:
            return await self.database.contains(key)
        except TierError as error:
            self._errors["database"].inc()
            log.error("sqlite read failed", error=str(error))
            return False

    # Writes

    async def set(self, key: str, raw: bytes, ttl_seconds: float | None) -> None:
        expires_at = None if ttl_seconds is None else self._clock() + ttl_seconds
        entry = Entry(raw, expires_at, self.versions.next())
        journaled = not self.mode.redis_usable
        try:
            await self.database.set(key, entry, journal=journaled)
        except TierError as error:
            raise WriteRejected(str(error)) from error
        self.memory.set(key, entry)
        if self.mode.redis_usable:
            try:
                if not await self.redis.set(key, entry):
                    await self.drop_superseded(key, entry.version)
                return
            except TierError as error:
                self._redis_failed(error)
        if not journaled:
            await self._journal("set", key, entry, entry.version)

    async def delete(self, key: str) -> dict[str, int]:
        return await self._delete_everywhere(
            "delete",
            key,
            lambda version, journal: self.database.delete(key, version, journal=journal),
            lambda version: self.memory.invalidate(key, version),
            lambda version: self.redis.delete(key, version),
            key.__eq__,
        )

    async def delete_pattern(
        self, pattern: str, limit: int | None = None
    ) -> tuple[dict[str, int], bool]:
        """Delete matching keys, at most `limit` per tier; also says whether all went."""
        counts = await self._delete_everywhere(
            "pattern",
            pattern,
            lambda version, journal: self.database.delete_pattern(
                pattern, version, journal=journal, limit=limit
            ),
            lambda version: self.memory.delete_pattern(pattern, below=version, limit=limit),
            lambda version: self.redis.delete_pattern(pattern, version, limit=limit),
            compile_pattern(pattern),
        )
        return counts, limit is None or max(counts.values()) < limit

    async def _delete_everywhere(
        self,
        op: Literal["delete", "pattern"],
        target: str,
        in_database: Callable[[int, bool], Awaitable[int]],
        in_memory: Callable[[int], int],
        in_redis: Callable[[int], Awaitable[int]],
        matches: Callable[[str], bool],
    ) -> dict[str, int]:
        # SQLite first: if the durable tier refuses, nothing is deleted anywhere and the
        # client is told, rather than a value coming back from SQLite after a restart.
        version = self.versions.next()
        journaled = not self.mode.redis_usable
        try:
            database = await in_database(version, journaled)
        except TierError as error:
            raise WriteRejected(str(error)) from error
        memory = in_memory(version)
        redis = 0
        if self.mode.redis_usable:
            try:
                redis = await in_redis(version)
            except TierError as error:
                self._redis_failed(error)
                await self._journal(op, target, None, version)
            else:
                await self.undo_promotions(matches, version)
        elif not journaled:
            await self._journal(op, target, None, version)
        return {"redis": redis, "memory": memory, "database": database}

    async def drop_superseded(self, key: str, version: int) -> None:
        """Redis holds a newer write than ours (at `version`): keep no copy of ours locally."""
        self.memory.invalidate(key, version + 1)
        try:
            await self.database.delete(key, below=version + 1)
        except TierError as error:
            self._errors["database"].inc()
            log.error("sqlite delete failed", error=str(error))

    async def _journal(
        self, op: Literal["set", "delete", "pattern"], key: str, entry: Entry | None, version: int
    ) -> None:
        """Record a change that reached SQLite but not Redis, for replay when Redis is back."""
        try:
            await self.database.journal(op, key, entry, version)
        except TierError as error:
            self._errors["database"].inc()
            log.error("journal write failed; change will not reach Redis", error=str(error),
                      op=op, key=key)  # fmt: skip

    async def redis_server_stats(self) -> dict[str, int] | None:
        """Redis's own counters, or None while Redis is not in use."""
        if not self.mode.redis_usable:
            return None
        try:
            return await self.redis.server_stats()
        except TierError as error:
            self._redis_failed(error)
            return None

    # Helpers

    def _redis_failed(self, error: TierError) -> None:
        self._errors["redis"].inc()
        self.mode.redis_failed(str(error))

    def _promote_to_redis(self, key: str, entry: Entry) -> None:
        """Copy a lower tier's hit up into Redis without making the reader wait for it."""
        if not self.mode.redis_usable:
            return
        task = asyncio.create_task(self._promote(key, entry))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        now = time.monotonic()
        self._promoted[key] = (entry.version, now, task)
        if len(self._promoted) > PROMOTIONS_TRACKED:
            self._promoted = {
                k: p for k, p in self._promoted.items() if now - p[1] < PROMOTION_MEMORY_SECONDS
            }

    async def undo_promotions(self, matches: Callable[[str], bool], version: int) -> None:
        """Another instance deleted keys at `version`: take back any older copy this instance
        promoted into Redis shortly before it heard of the delete, so none is resurrected."""
        now = time.monotonic()
        doomed = [
            (key, task)
            for key, (promoted, at, task) in self._promoted.items()
            if promoted < version and now - at < PROMOTION_MEMORY_SECONDS and matches(key)
        ]
        for key, task in doomed:
            del self._promoted[key]
            await asyncio.gather(task, return_exceptions=True)  # it must land before the undo
            try:
                await self.redis.delete(key, version, announce=False)
            except TierError as error:
                self._redis_failed(error)

    async def _promote(self, key: str, entry: Entry) -> None:
        try:
            await self.redis.set(key, entry, announce=False)
        except TierError as error:
            self._redis_failed(error)

    async def drain(self) -> None:
        """Wait for background promotions (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
