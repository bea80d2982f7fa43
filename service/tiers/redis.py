"""The shared tier: Redis, under this service's key prefix, on short timeouts and no retries.

A request never waits on Redis longer than its timeout: the pool, connect and read deadlines
are all short, and redis-py's own retries are off (its defaults, 5 s and 10 retries, make
each request on a dead Redis wait for seconds). Recovering is the health monitor's job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.glob import escape
from service.settings import Settings
from service.tiers.autopipe import AutoPipeline
from service.tiers.base import Entry, TierError

#: Keys asked for per SCAN call and unlinked per UNLINK: small enough that each call stays
#: well under a millisecond inside Redis, so other clients' latency does not suffer.
SCAN_BATCH = 500

#: PTTL's answers that are not a remaining time.
_PTTL_MISSING = -2
_PTTL_PERSISTENT = -1


def make_client(settings: Settings, socket_timeout: float, pool_size: int) -> Redis:
    """A redis-py asyncio client with bounded pool, short timeouts and no retries."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_connection_url(),
        max_connections=pool_size,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout_seconds,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() disconnects it


class RedisTier:
    """Entries in Redis as `prefix + key` holding the value's JSON, with Redis's own TTL."""

    name = "redis"

    def __init__(
        self,
        client: Redis,
        prefix: str,
        timeout_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._pipe = AutoPipeline(client, timeout_seconds)
        self._clock = clock

    async def close(self) -> None:
        await self._pipe.close()
        await self.client.aclose()

    async def reset_connections(self) -> None:
        """Drop pooled connections (they may point at a dead or replaced server)."""
        await self.client.connection_pool.disconnect()

    def _name(self, key: str) -> str:
        return self.prefix + key

    async def _run(self, *commands: tuple[Any, ...]) -> list[Any]:
        replies = await self._pipe.execute(*commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise TierError(f"redis replied with an error: {reply}")
        return replies

    async def get(self, key: str) -> Entry | None:
        name = self._name(key)
        raw, pttl = await self._run(("GET", name), ("PTTL", name))
        if raw is None or pttl == _PTTL_MISSING:
            return None
        expires_at = None if pttl == _PTTL_PERSISTENT else self._clock() + pttl / 1000
        return Entry(raw, expires_at)

    async def contains(self, key: str) -> bool:
        (count,) = await self._run(("EXISTS", self._name(key)))
        return bool(count)

    async def set(self, key: str, entry: Entry) -> None:
        name = self._name(key)
        if entry.expires_at is None:
            await self._run(("SET", name, entry.raw))
            return
        ttl_ms = int((entry.expires_at - self._clock()) * 1000)
        if ttl_ms <= 0:
            await self._run(("UNLINK", name))
        else:
            await self._run(("SET", name, entry.raw, "PX", ttl_ms))

    async def delete(self, key: str) -> int:
        (count,) = await self._run(("UNLINK", self._name(key)))
        return int(count)

    async def delete_pattern(self, pattern: str) -> int:
        """SCAN MATCH inside the prefix and UNLINK in batches; never KEYS."""
        match = escape(self.prefix) + pattern
        deleted = 0
        batch: list[bytes] = []
        try:
            async for name in self.client.scan_iter(match=match, count=SCAN_BATCH):
                batch.append(name)
                if len(batch) >= SCAN_BATCH:
                    deleted += int(await self.client.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(await self.client.unlink(*batch))
        except (RedisError, OSError) as error:
            raise TierError(f"redis pattern delete failed: {error}") from error
        return deleted

    async def server_stats(self) -> dict[str, int]:
        """The server's own counters, as the stats route reports them."""
        try:
            info = await self.client.info("stats")
        except (RedisError, OSError) as error:
            raise TierError(f"redis INFO failed: {error}") from error
        return {
            "totalConnections": int(info.get("total_connections_received", 0)),
            "totalCommands": int(info.get("total_commands_processed", 0)),
            "keyspaceHits": int(info.get("keyspace_hits", 0)),
            "keyspaceMisses": int(info.get("keyspace_misses", 0)),
        }
