"""The shared tier: Redis, under this service's key prefix, on short timeouts and no retries.

A request never waits on Redis longer than its timeout: the pool, connect and read deadlines
are all short, and redis-py's own retries are off (its defaults, 5 s and 10 retries, make
each request on a dead Redis wait for seconds). Recovering is the health monitor's job.

Key `k` is a hash at `prefix + k` with the value's JSON in `val` and the version of the write
in `ver`. Writes and deletes are compare-and-set Lua scripts on that one key, so the newest
change wins whatever order instances' commands arrive in. A delete leaves the key as a
tombstone (only `ver`) for TOMBSTONE_MILLISECONDS, so that an older write arriving after it
(another instance's journal replayed concurrently, or a command that outlived its client's
deadline) is refused instead of bringing the key back. Every change is announced on
the invalidation feed (a capped Redis Stream): by the same script where the key and the feed
share a server, by a second command in the same pipeline on Redis Cluster, whose scripts may
touch one slot only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from service.glob import escape
from service.settings import INTERNAL_NAMESPACE, Settings
from service.tiers.autopipe import AutoPipeline
from service.tiers.base import Entry, TierError

#: Keys asked for per SCAN call and unlinked per UNLINK: small enough that each call stays
#: well under a millisecond inside Redis, so other clients' latency does not suffer.
SCAN_BATCH = 500
#: How long a deleted key keeps its delete's version in Redis. A change older than the delete
#: can arrive later: another instance replaying its journal after an outage between its
#: catch-up on the feed and its replay (seconds), or a command written just before its
#: client gave up on it (until TCP gives up). Ten minutes covers both with room to spare.
TOMBSTONE_MILLISECONDS = 600_000


# Store a value unless the key already holds a newer version. A key of another type in our
# namespace is not ours to keep: it is replaced. ARGV: version, value, TTL in ms (0: none),
# expiry as epoch ms (0: none). The expiry is stored too, so that a read is one HMGET.
# Returns 1 when written, 0 when Redis holds a newer version.
SET_NEWER = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'hash' then
  local current = redis.call('HGET', KEYS[1], 'ver')
  if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'val', ARGV[2], 'ver', ARGV[1], 'exp', ARGV[4])
if ARGV[3] == '0' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

# Delete a key unless it holds a version at or above ARGV[1], leaving a tombstone: the key
# with only that version, for ARGV[2] ms. Returns 1 when a value (or a key of another type)
# was deleted, 0 otherwise.
DELETE_OLDER = """
local kind = redis.call('TYPE', KEYS[1]).ok
local deleted = 0
if kind == 'hash' then
  local current = redis.call('HGET', KEYS[1], 'ver')
  if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
  deleted = redis.call('HEXISTS', KEYS[1], 'val')
elseif kind ~= 'none' then
  deleted = 1
end
if kind ~= 'none' then redis.call('UNLINK', KEYS[1]) end
redis.call('HSET', KEYS[1], 'ver', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return deleted
"""

# Unlink the keys that hold a value, leaving tombstones to guard what they guard; returns
# how many went.
UNLINK_VALUES = """
local deleted = 0
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'none' and (kind ~= 'hash' or redis.call('HEXISTS', key, 'val') == 1) then
    redis.call('UNLINK', key)
    deleted = deleted + 1
  end
end
return deleted
"""


def _announcing(script: str, kind: str) -> str:
    """`script` followed by its change's event on the feed (KEYS[2], the fields `_event`
    writes), in one call: half the commands a write costs. ARGV after the script's own:
    origin, key, feed length; the version is ARGV[1] in both scripts. Only where both keys
    share a node (not Cluster)."""
    return f"""local function change()
{script}end
local result = change()
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[#ARGV], '*',
  'o', ARGV[#ARGV - 2], 'k', '{kind}', 'n', ARGV[#ARGV - 1], 'v', ARGV[1])
return result
"""


SET_NEWER_ANNOUNCED = _announcing(SET_NEWER, "set")
DELETE_OLDER_ANNOUNCED = _announcing(DELETE_OLDER, "delete")

EventKind = Literal["set", "delete", "pattern"]


RedisClient = Redis | RedisCluster


def make_client(settings: Settings, socket_timeout: float | None, pool_size: int) -> RedisClient:
    """A redis-py asyncio client for the configured topology: bounded pool, short timeouts,
    no retries. The client owns its pool (and sentinel connections): aclose() closes all.

    `socket_timeout` None leaves deadlines to the caller (asyncio.timeout around a whole
    batch, as the auto-pipeline does), which spares redis-py a timer per reply.
    """
    deadline = socket_timeout or settings.redis_socket_timeout_seconds
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        # redis-py 8's default ("auto") skips the check for connections the server dropped
        # while idle, so each would fail its next command and count as an outage.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        **settings.redis_tls_options(),
    }
    if settings.redis_cluster_nodes:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in settings.redis_cluster_nodes],
            username=settings.redis_username,
            password=settings.redis_password.get_secret_value() or None,
            max_connections=pool_size,
            # Cluster-wide SCAN and INFO bypass the auto-pipeline: each reply needs a deadline.
            **{**common, "socket_timeout": deadline},
        )
    if settings.redis_sentinels:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            settings.redis_sentinels,
            sentinel_kwargs={
                "socket_timeout": deadline,
                "socket_connect_timeout": settings.redis_connect_timeout_seconds,
                "password": settings.redis_sentinel_password_value(),
            },
            username=settings.redis_username,
            password=settings.redis_password.get_secret_value() or None,
            db=settings.redis_db,
            max_connections=pool_size,
            **common,
        )
        client: _SentinelClient = sentinel.master_for(
            settings.redis_sentinel_master, redis_class=_SentinelClient
        )
        client.sentinel_manager = sentinel
        return client
    pool = BlockingConnectionPool.from_url(
        settings.redis_connection_url(), max_connections=pool_size, timeout=deadline,
        **common,
    )  # fmt: skip
    return Redis.from_pool(pool)


class _SentinelClient(Redis):
    """A client of Sentinel's current master that also closes its connections to sentinels."""

    sentinel_manager: Sentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


class RedisTier:
    """Entries in Redis under the prefix, with Redis's own TTL, versioned; changes announced."""

    name = "redis"

    def __init__(
        self,
        client: RedisClient,
        prefix: str,
        timeout_seconds: float,
        origin: str = "",
        feed_max_length: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.origin = origin
        self.feed = f"{INTERNAL_NAMESPACE}{prefix}feed"
        self.epoch_key = f"{INTERNAL_NAMESPACE}{prefix}epoch"
        self._feed_max_length = feed_max_length
        self._pipe = AutoPipeline(client, timeout_seconds)
        self._clock = clock

    async def close(self) -> None:
        await self._pipe.close()
        await self.client.aclose()

    async def reset_connections(self) -> None:
        """Drop pooled connections (they may point at a dead or replaced server)."""
        if isinstance(self.client, RedisCluster):
            # Also forget the slot map, which the next command reloads: after a failover it
            # still names the dead primary, and with retries off a failed pipeline never
            # refreshes it (single commands do).
            await self.client.aclose()
        else:
            await self.client.connection_pool.disconnect()

    def _name(self, key: str) -> str:
        return self.prefix + key

    async def _run(self, *commands: tuple[Any, ...]) -> list[Any]:
        replies = await self._pipe.execute(*commands)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            # Redis restarted or flushed its script cache: send the script bodies once.
            replies = await self._pipe.execute(*(_with_script_body(c) for c in commands))
        for reply in replies:
            if isinstance(reply, Exception):
                raise TierError(f"redis replied with an error: {reply}")
        return replies

    # Reads

    async def get(self, key: str) -> Entry | None:
        fields = await self._read_own("HMGET", key, "val", "ver", "exp")
        if fields is None:
            return None
        raw, version, expires_ms = fields
        if raw is None:
            return None
        # Redis enforces the TTL itself; the stored expiry only says how long is left.
        expires_at = int(expires_ms) / 1000 if expires_ms and expires_ms != b"0" else None
        return Entry(raw, expires_at, int(version or 0))

    async def contains(self, key: str) -> bool:
        return bool(await self._read_own("HEXISTS", key, "val"))

    async def _read_own(self, command: str, key: str, *fields: str) -> Any:
        """The reply of a hash command on `key`, or None when the key is of another type
        (not something this service wrote)."""
        (reply,) = await self._pipe.execute((command, self._name(key), *fields))
        if isinstance(reply, ResponseError):
            return None
        if isinstance(reply, Exception):
            raise TierError(f"redis replied with an error: {reply}")
        return reply

    # Writes

    async def set(self, key: str, entry: Entry, *, announce: bool = True) -> bool:
        """Store the entry unless Redis holds a newer version; True when stored."""
        ttl_ms = expires_ms = 0
        if entry.expires_at is not None:
            ttl_ms = int((entry.expires_at - self._clock()) * 1000)
            expires_ms = int(entry.expires_at * 1000)
            if ttl_ms <= 0:
                return False  # already expired: nothing to store
        replies = await self._run(
            *self._change(
                SET_NEWER, "set", key, announce, entry.version, entry.raw, ttl_ms, expires_ms
            )
        )
        return bool(replies[0])

    async def delete(self, key: str, version: int, *, announce: bool = True) -> int:
        """Delete unless Redis holds a version at or above `version`; returns keys deleted."""
        replies = await self._run(
            *self._change(DELETE_OLDER, "delete", key, announce, version, TOMBSTONE_MILLISECONDS)
        )
        return int(replies[0])

    def _change(
        self, script: str, kind: EventKind, key: str, announce: bool, version: int, *args: Any
    ) -> list[tuple[Any, ...]]:
        """The commands of a versioned change to `key`, announced on the feed if asked."""
        if not announce:
            return [_script(script, (self._name(key),), version, *args)]
        # A Cluster keeps a key and the feed on different nodes: two commands there.
        if not isinstance(self.client, RedisCluster):
            return [
                _script(
                    _ANNOUNCED[script], (self._name(key), self.feed), version, *args,
                    self.origin, key, self._feed_max_length,
                )
            ]  # fmt: skip
        return [
            _script(script, (self._name(key),), version, *args),
            self._event(kind, key, version),
        ]

    async def delete_pattern(
        self,
        pattern: str,
        version: int,
        *,
        conditional: bool = False,
        announce: bool = True,
        limit: int | None = None,
    ) -> int:
        """SCAN MATCH inside the prefix and delete in batches; never KEYS.

        `conditional` keeps keys holding a version at or above `version` (for replaying an
        old delete); otherwise matches go with batched UNLINK. Stops after `limit` keys.
        """
        match = escape(self.prefix) + pattern
        if isinstance(self.client, RedisCluster):
            deleted = await self._delete_across_cluster(match, version, conditional, limit)
            if announce:
                await self._run(self._event("pattern", pattern, version))
            return deleted
        deleted, cursor = 0, 0
        while limit is None or deleted < limit:
            ((cursor, names),) = await self._run(
                ("SCAN", cursor, "MATCH", match, "COUNT", SCAN_BATCH)
            )
            # Never more than the limit; tombstones among the names count for nothing, so
            # what is left of the batch goes next (the cursor has moved past it).
            while names and (limit is None or deleted < limit):
                chunk = names if limit is None else names[: limit - deleted]
                names = names[len(chunk) :]
                deleted += await self._delete_names(chunk, version, conditional)
            if int(cursor) == 0:
                break
        if announce:
            await self._run(self._event("pattern", pattern, version))
        return deleted

    async def _delete_across_cluster(
        self, match: str, version: int, conditional: bool, limit: int | None
    ) -> int:
        """SCAN every primary (redis-py's cluster scan_iter) and delete key by key: a Cluster
        refuses multi-key commands across slots."""
        assert isinstance(self.client, RedisCluster)
        deleted, batch = 0, list[bytes]()
        try:
            async for name in self.client.scan_iter(match=match, count=SCAN_BATCH):
                batch.append(name)
                # A batch never holds more names than the limit has room for: tombstones
                # among them count for nothing, so scanning goes on until the limit is met.
                if len(batch) >= (
                    SCAN_BATCH if limit is None else min(SCAN_BATCH, limit - deleted)
                ):
                    deleted += await self._delete_names(batch, version, conditional, True)
                    batch = []
                    if limit is not None and deleted >= limit:
                        break
            if batch:
                deleted += await self._delete_names(batch, version, conditional, True)
        except (RedisError, OSError) as error:
            raise TierError(f"redis pattern delete failed: {error}") from error
        return deleted

    async def _delete_names(
        self, names: Sequence[bytes], version: int, conditional: bool, one_by_one: bool = False
    ) -> int:
        if one_by_one and not conditional:
            replies = await self._run(*(_script(UNLINK_VALUES, (n,)) for n in names))
            return sum(int(r) for r in replies)
        if not conditional:
            (count,) = await self._run(_script(UNLINK_VALUES, tuple(names)))
            return int(count)
        replies = await self._run(
            *(_script(DELETE_OLDER, (n,), version, TOMBSTONE_MILLISECONDS) for n in names)
        )
        return sum(int(r) for r in replies)

    def _event(self, kind: EventKind, key: str, version: int) -> tuple[Any, ...]:
        return (
            "XADD", self.feed, "MAXLEN", "~", self._feed_max_length, "*",
            "o", self.origin, "k", kind, "n", key, "v", version,
        )  # fmt: skip

    # The feed's bookkeeping

    async def epoch(self, candidate: str) -> str:
        """The id of Redis's current data set: set once, lost when Redis loses its data."""
        _, current = await self._run(
            ("SET", self.epoch_key, candidate, "NX"), ("GET", self.epoch_key)
        )
        return str(current.decode() if isinstance(current, bytes) else current)

    async def feed_info(self) -> tuple[str | None, str] | None:
        """(id of the oldest event still held or None, id of the newest event ever added),
        or None when the feed does not exist."""
        (info,) = await self._pipe.execute(("XINFO STREAM", self.feed))
        if isinstance(info, ResponseError) and "no such key" in str(info):
            return None
        if isinstance(info, Exception):
            raise TierError(f"redis replied with an error: {info}")
        first = info.get("first-entry")
        return (first[0].decode() if first else None), info["last-generated-id"].decode()

    async def read_feed(self, after: str, count: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """Events after id `after`, oldest first (no blocking: for catching up)."""
        (events,) = await self._run(("XRANGE", self.feed, f"({after}", "+", "COUNT", count))
        return [(event_id.decode(), fields) for event_id, fields in events or []]

    async def server_stats(self) -> dict[str, int]:
        """The server's own counters, as the stats route reports them."""
        if isinstance(self.client, RedisCluster):
            try:
                per_node = await self.client.info("stats", target_nodes=RedisCluster.PRIMARIES)
            except (RedisError, OSError) as error:
                raise TierError(f"redis INFO failed: {error}") from error
            info = {
                field: sum(int(node.get(field, 0)) for node in per_node.values())
                for field in _STATS_FIELDS
            }
        else:
            (info,) = await self._run(("INFO", "stats"))
        return {
            "totalConnections": int(info.get("total_connections_received", 0)),
            "totalCommands": int(info.get("total_commands_processed", 0)),
            "keyspaceHits": int(info.get("keyspace_hits", 0)),
            "keyspaceMisses": int(info.get("keyspace_misses", 0)),
        }


_STATS_FIELDS = (
    "total_connections_received", "total_commands_processed", "keyspace_hits", "keyspace_misses",
)  # fmt: skip
_ANNOUNCED = {SET_NEWER: SET_NEWER_ANNOUNCED, DELETE_OLDER: DELETE_OLDER_ANNOUNCED}
_SHAS = {
    script: hashlib.sha1(script.encode()).hexdigest()
    for script in (SET_NEWER, DELETE_OLDER, UNLINK_VALUES, *_ANNOUNCED.values())
}
_BODIES = {sha: script for script, sha in _SHAS.items()}


def _script(script: str, keys: tuple[str | bytes, ...], *args: Any) -> tuple[Any, ...]:
    return ("EVALSHA", _SHAS[script], len(keys), *keys, *args)


def _with_script_body(command: tuple[Any, ...]) -> tuple[Any, ...]:
    if command[0] != "EVALSHA":
        return command
    return ("EVAL", _BODIES[command[1]], *command[2:])
