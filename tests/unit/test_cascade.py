"""The cascade's policy over the three tiers, with fakeredis standing in for Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import fakeredis
import pytest

from service.cascade import Cascade
from service.coherence import Coherence
from service.errors import WriteRejected
from service.metrics import Metrics
from service.mode import Mode
from service.tiers.base import Entry, TierError
from service.tiers.memory import MemoryTier
from service.tiers.redis import RedisTier
from service.tiers.sqlite import SqliteTier
from service.versions import VersionClock
from tests.polling import poll


@dataclass
class World:
    cascade: Cascade
    redis: RedisTier
    server: fakeredis.FakeServer
    memory: MemoryTier
    database: SqliteTier
    mode: Mode
    metrics: Metrics

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    metrics = Metrics()
    mode = Mode(metrics)
    server = fakeredis.FakeServer()
    redis = RedisTier(fakeredis.FakeAsyncRedis(server=server), "cache:", 0.5)
    memory = MemoryTier(metrics, 1000, 10_000_000)
    database = SqliteTier(metrics, tmp_path / "c.db")
    await database.open()
    mode.redis_recovered("test")
    cascade = Cascade(redis, memory, database, mode, metrics, VersionClock())
    yield World(cascade, redis, server, memory, database, mode, metrics)
    await cascade.drain()
    await database.close()
    await redis.close()


async def test_write_goes_to_all_three_tiers(world: World) -> None:
    await world.cascade.set("k", b'{"a":1}', 60)
    assert (await world.redis.get("k")) is not None
    assert world.memory.get("k") is not None
    assert (await world.database.get("k")) is not None
    hit = await world.cascade.get("k")
    assert hit is not None
    assert hit.tier == "redis"
    assert hit.entry.raw == b'{"a":1}'


async def test_read_falls_through_and_promotes(world: World) -> None:
    await world.cascade.set("k", b"1", None)
    await world.redis.client.unlink("cache:k")
    hit = await world.cascade.get("k")
    assert hit is not None
    assert hit.tier == "memory"
    await world.cascade.drain()
    assert await world.redis.get("k") is not None

    await world.redis.client.unlink("cache:k")
    world.memory.delete("k")
    hit = await world.cascade.get("k")
    assert hit is not None
    assert hit.tier == "database"
    await world.cascade.drain()
    assert world.memory.get("k") is not None
    assert await world.redis.get("k") is not None
    assert world.sample("tiercache_tier_hits_total", tier="database") == 1
    assert world.sample("tiercache_tier_misses_total", tier="redis") == 2


async def test_miss_everywhere(world: World) -> None:
    assert await world.cascade.get("nope") is None
    assert not await world.cascade.contains("nope")
    for tier in ("redis", "memory", "database"):
        assert world.sample("tiercache_tier_misses_total", tier=tier) == 1


async def test_redis_failure_on_write_is_counted_and_degrades_but_succeeds(world: World) -> None:
    world.server.connected = False
    await world.cascade.set("k", b"1", None)
    assert not world.mode.redis_usable
    assert world.mode.failure.is_set()
    assert world.sample("tiercache_tier_errors_total", tier="redis") == 1
    hit = await world.cascade.get("k")
    assert hit is not None
    assert hit.tier == "memory"


async def test_degraded_mode_never_touches_redis(world: World) -> None:
    world.mode.redis_failed("test")

    async def explode(*_: object) -> None:
        raise AssertionError("Redis was used while degraded")

    world.redis._pipe.execute = explode  # type: ignore[assignment,method-assign]
    await world.cascade.set("k", b"1", None)
    assert (await world.cascade.get("k")) is not None
    assert await world.cascade.contains("k")
    assert (await world.cascade.delete("k")) == {"redis": 0, "memory": 1, "database": 1}
    assert await world.cascade.redis_server_stats() is None


async def test_sqlite_refusal_rejects_the_write_everywhere(world: World) -> None:
    await world.cascade.set("k", b"old", None)

    async def refuse(*_: object, **__: object) -> None:
        raise TierError("disk full")

    world.database.set = refuse  # type: ignore[assignment,method-assign]
    with pytest.raises(WriteRejected):
        await world.cascade.set("k", b"new", None)
    kept = world.memory.get("k")
    assert kept is not None
    assert kept.raw == b"old"
    redis_entry = await world.redis.get("k")
    assert redis_entry is not None
    assert redis_entry.raw == b"old"


async def test_delete_pattern_counts_per_tier(world: World) -> None:
    for key in ("a:1", "a:2", "b:1"):
        await world.cascade.set(key, b"1", None)
    await world.redis.client.unlink("cache:a:2")
    counts, complete = await world.cascade.delete_pattern("a:*")
    assert counts == {"redis": 1, "memory": 2, "database": 2}
    assert complete
    assert await world.cascade.get("a:1") is None
    assert await world.cascade.get("b:1") is not None


async def test_promotion_is_skipped_while_degraded(world: World) -> None:
    await world.cascade.set("k", b"1", None)
    await world.redis.client.unlink("cache:k")
    world.mode.redis_failed("test")
    await world.cascade.get("k")
    await asyncio.sleep(0)
    world.mode.redis_recovered("test")
    assert await world.redis.get("k") is None


async def test_redis_keeps_the_newest_version_whatever_the_arrival_order(world: World) -> None:
    older, newer = Entry(b"old", None, 100), Entry(b"new", None, 200)
    assert await world.redis.set("k", newer)
    assert not await world.redis.set("k", older, announce=False)  # e.g. a late promotion
    held = await world.redis.get("k")
    assert held == Entry(b"new", None, 200)
    assert await world.redis.delete("k", 150) == 0  # an older delete leaves it
    assert await world.redis.delete("k", 250) == 1


async def test_a_late_delete_takes_back_an_earlier_promotion(world: World) -> None:
    """A promotion racing a delete made elsewhere must not leave the value in Redis."""
    await world.cascade.set("k", b"v", None)
    await world.redis.client.unlink("cache:k")
    hit = await world.cascade.get("k")  # from memory: promoted in the background
    assert hit is not None
    assert hit.tier == "memory"
    deleted_at = world.cascade.versions.next()  # another instance's delete, heard late
    await world.cascade.undo_promotions("k".__eq__, deleted_at)
    assert await world.redis.get("k") is None
    # The undo left the delete's tombstone: promoting the older copy again is refused.
    await world.cascade.get("k")
    await world.cascade.drain()
    assert await world.redis.get("k") is None
    # A promotion newer than the delete is left alone.
    await world.cascade.set("k", b"w", None)
    await world.redis.client.unlink("cache:k")
    await world.cascade.get("k")
    await world.cascade.undo_promotions("k".__eq__, deleted_at)
    await world.cascade.drain()
    held = await world.redis.get("k")
    assert held is not None
    assert held.raw == b"w"


@pytest.mark.parametrize("change", ["overwrite", "delete", "pattern"])
async def test_reads_after_recovery_never_take_redis_copies_older_than_the_journal(
    world: World, change: str
) -> None:
    """Changes journaled while a recovery replays the journal reach Redis only after the flip;
    until they do, a read must serve them, not the older copy the replay already put there."""
    coherence = Coherence(
        world.cascade, world.cascade.versions, world.metrics,
        fakeredis.FakeAsyncRedis(server=world.server),
    )  # fmt: skip
    await coherence.open()
    await coherence.resync()
    world.mode.redis_failed("test")
    await world.cascade.set("k:1", b"1", None)  # journaled, and replayed before the flip

    high_water = world.database.journal_high_water

    async def a_change_arrives_during_the_replay() -> int:
        mark = await high_water()
        if change == "overwrite":
            await world.cascade.set("k:1", b"2", None)
        elif change == "delete":
            await world.cascade.delete("k:1")
        else:
            await world.cascade.delete_pattern("k:*")
        return mark

    world.database.journal_high_water = a_change_arrives_during_the_replay  # type: ignore[method-assign]
    await coherence.resync()
    held = await world.redis.get("k:1")  # the replay before the flip put the first write there
    assert held is not None
    assert held.raw == b"1"
    expected = b"2" if change == "overwrite" else None

    async with coherence._lock:  # the drain waits: Redis still holds the older copy
        world.mode.redis_recovered("test")
        hit = await world.cascade.get("k:1")
        assert (hit.entry.raw if hit else None) == expected
        assert await world.cascade.contains("k:1") == (expected is not None)

    async def drained() -> bool:  # the drain stops noting once the journal is replayed
        return not world.database.unreplayed.tracking

    assert await poll(drained, bool, within=5)
    assert world.database.journal_pending == 0
    held = await world.redis.get("k:1")
    assert (held.raw if held else None) == expected
    await coherence.close()


@pytest.mark.parametrize("change", ["delete", "pattern", "local delete"])
async def test_a_read_of_sqlite_in_flight_never_brings_back_what_a_change_dropped(
    world: World, change: str
) -> None:
    """The copy such a read finds is older than the change: not served, not put back into
    memory or Redis (where nothing would take it back)."""
    await world.cascade.set("k:1", b"old", None)
    await world.redis.client.unlink("cache:k:1")
    world.memory.delete("k:1")
    read_sqlite = world.database.get

    async def the_change_lands_while_sqlite_is_read(key: str) -> Entry | None:
        found = await read_sqlite(key)  # the old copy, read just before the change
        newer = world.cascade.versions.next()
        if change == "delete":  # announced by another instance, applied from the feed
            world.memory.invalidate(key, newer)
            await world.database.delete(key, below=newer)
        elif change == "pattern":
            world.memory.delete_pattern("k:*", below=newer)
            await world.database.delete_pattern("k:*", below=newer)
        else:
            await world.cascade.delete(key)
        return found

    world.database.get = the_change_lands_while_sqlite_is_read  # type: ignore[method-assign]
    assert await world.cascade.get("k:1") is None
    await world.cascade.drain()
    assert world.memory.get("k:1") is None
    assert await world.redis.get("k:1") is None
    assert world.sample("tiercache_tier_misses_total", tier="database") == 1


async def test_a_bounded_pattern_delete_does_not_hide_the_keys_it_left(world: World) -> None:
    for i in range(3):
        await world.cascade.set(f"k:{i}", b"v", None)
    _, complete = await world.cascade.delete_pattern("k:*", limit=1)
    assert not complete
    for i in range(3):
        world.memory.delete(f"k:{i}")
        await world.redis.client.unlink(f"cache:k:{i}")
    assert sum([await world.cascade.get(f"k:{i}") is not None for i in range(3)]) == 2
