"""The read, write and delete policy over the three tiers.

Reads go Redis, memory, SQLite; the first live entry wins and is copied into the tiers above
it with its remaining TTL. Writes are acknowledged once SQLite committed and memory holds the
value; Redis gets it too when usable. Deletes clear every tier. The cascade reads the mode and
reports Redis failures to it; it never pings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from service.errors import WriteRejected
from service.metrics import Metrics
from service.mode import Mode
from service.tiers.base import Entry, TierError
from service.tiers.memory import MemoryTier
from service.tiers.redis import RedisTier
from service.tiers.sqlite import SqliteTier

log = structlog.get_logger("tiercache.cascade")


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.memory = memory
        self.database = database
        self.mode = mode
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()
        self._hits = {t: metrics.tier_hits.labels(t) for t in ("redis", "memory", "database")}
        self._misses = {t: metrics.tier_misses.labels(t) for t in ("redis", "memory", "database")}
        self._errors = {t: metrics.tier_errors.labels(t) for t in ("redis", "memory", "database")}

    # Reads

    async def get(self, key: str) -> Hit | None:
        if self.mode.redis_usable:
            try:
                entry = await self.redis.get(key)
            except TierError as error:
                self._redis_failed(error)
            else:
                if entry is not None:
                    self._hits["redis"].inc()
                    return Hit(entry, "redis")
                self._misses["redis"].inc()

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
        if entry is None:
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
                if await self.redis.contains(key):
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
        entry = Entry(raw, expires_at)
        try:
            await self.database.set(key, entry)
        except TierError as error:
            raise WriteRejected(str(error)) from error
        self.memory.set(key, entry)
        if self.mode.redis_usable:
            try:
                await self.redis.set(key, entry)
            except TierError as error:
                self._redis_failed(error)

    async def delete(self, key: str) -> dict[str, int]:
        return await self._delete_everywhere(
            lambda: self.redis.delete(key),
            lambda: self.memory.delete(key),
            lambda: self.database.delete(key),
        )

    async def delete_pattern(self, pattern: str) -> dict[str, int]:
        return await self._delete_everywhere(
            lambda: self.redis.delete_pattern(pattern),
            lambda: self.memory.delete_pattern(pattern),
            lambda: self.database.delete_pattern(pattern),
        )

    async def _delete_everywhere(
        self,
        in_redis: Callable[[], Awaitable[int]],
        in_memory: Callable[[], int],
        in_database: Callable[[], Awaitable[int]],
    ) -> dict[str, int]:
        # SQLite first: if the durable tier refuses, nothing is deleted anywhere and the
        # client is told, rather than a value coming back from SQLite after a restart.
        try:
            database = await in_database()
        except TierError as error:
            raise WriteRejected(str(error)) from error
        memory = in_memory()
        redis = 0
        if self.mode.redis_usable:
            try:
                redis = await in_redis()
            except TierError as error:
                self._redis_failed(error)
        return {"redis": redis, "memory": memory, "database": database}

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

    async def _promote(self, key: str, entry: Entry) -> None:
        try:
            await self.redis.set(key, entry)
        except TierError as error:
            self._redis_failed(error)

    async def drain(self) -> None:
        """Wait for background promotions (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
