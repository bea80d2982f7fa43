"""Several instances sharing one real redis-server: no stale reads, no lost writes.

Instances are real apps on their own test servers and SQLite files; a TCP proxy between one
instance and Redis cuts and heals only that instance's link.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from service.keys import memory_key, metrics_key, sqlite_key
from service.settings import Settings
from service.tiers.base import Entry
from service.tiers.redis import TOMBSTONE_MILLISECONDS, RedisTier, make_client
from tests.integration.conftest import ServiceFactory
from tests.polling import poll, wait_for_mode
from tests.procs import RedisProcess
from tests.proxy import LinkProxy

API = "/api/performance/cache"
#: The rules promise convergence within a propagation window of at most 1 s.
WINDOW_SECONDS = 1.0
Client = TestClient[Any, Any]


def url(key: str) -> str:
    return f"{API}/{quote(key, safe='')}"


async def read(client: Client, key: str) -> Any:
    """The value an instance serves for key, or None on a miss."""
    response = await client.get(url(key))
    if response.status == 404:
        return None
    assert response.status == 200, await response.text()
    return (await response.json())["value"]


async def write(client: Client, key: str, value: Any) -> None:
    response = await client.post(API, json={"key": key, "value": value})
    assert response.status == 200, await response.text()


async def delete(client: Client, key_or_pattern: str) -> dict[str, int]:
    response = await client.delete(url(key_or_pattern))
    assert response.status == 200, await response.text()
    deleted: dict[str, int] = (await response.json())["deleted"]
    return deleted


async def eventually(
    client: Client, key: str, expected: Any, within: float = WINDOW_SECONDS
) -> None:
    got = await poll(lambda: read(client, key), lambda v: v == expected, within=within)
    assert got == expected, f"{key}: served {got!r}, expected {expected!r}"


async def in_redis(redis_server: RedisProcess, key: str) -> Any:
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        raw = await r.hget(f"cache:{key}", "val")
    finally:
        await r.aclose()
    return None if raw is None else json.loads(raw)


@pytest.fixture
async def proxy(redis_server: RedisProcess) -> AsyncIterator[LinkProxy]:
    link = await LinkProxy(redis_server.port).start()
    yield link
    await link.close()


@pytest.fixture
async def pair(
    make_service: ServiceFactory, redis_server: RedisProcess, proxy: LinkProxy
) -> tuple[Client, Client]:
    """Instance A reaches Redis through the proxy; instance B directly."""
    a = await make_service(None, redis_url=proxy.url)
    b = await make_service(redis_server)
    await wait_for_mode(a, "full")
    return a, b


async def test_delete_and_overwrite_reach_the_other_instance(pair: tuple[Client, Client]) -> None:
    a, b = pair
    await write(a, "k", "v1")
    assert await read(b, "k") == "v1"
    await write(b, "only-b", 1)  # B's local tiers hold it too now
    await delete(a, "only-b")
    await eventually(b, "only-b", None)

    await write(a, "k", "v2")
    assert await read(b, "k") == "v2"
    await delete(a, "k")
    await eventually(b, "k", None)


async def test_pattern_delete_clears_the_other_instances_local_tiers(
    pair: tuple[Client, Client],
) -> None:
    a, b = pair
    for i in range(5):
        await write(b, f"user:{i}", i)
    await write(b, "keep:1", 1)
    await delete(a, "user:*")
    b_memory, b_database = b.server.app[memory_key], b.server.app[sqlite_key]

    async def leftovers() -> int:
        held = [k for i in range(5) if b_memory.get(k := f"user:{i}") or await b_database.get(k)]
        return len(held)

    assert await poll(leftovers, lambda n: n == 0, within=WINDOW_SECONDS) == 0
    for i in range(5):
        assert await read(b, f"user:{i}") is None
    assert await read(b, "keep:1") == 1


async def test_a_disconnected_instance_catches_up_before_serving(
    pair: tuple[Client, Client], proxy: LinkProxy
) -> None:
    a, b = pair
    for key in ("x", "y", "z"):
        await write(a, key, "old")
        assert await read(a, key) == "old"
    await proxy.cut()
    await wait_for_mode(a, "degraded")
    await write(b, "x", "new")
    await delete(b, "y")
    await delete(b, "z*")
    await proxy.heal()
    await wait_for_mode(a, "full")
    # The mode flips only after catching up: no stale value is served once full.
    assert await read(a, "x") == "new"
    assert await read(a, "y") is None
    assert await read(a, "z") is None


async def test_outage_writes_and_others_writes_converge_on_the_newest(
    pair: tuple[Client, Client], proxy: LinkProxy, redis_server: RedisProcess
) -> None:
    a, b = pair
    await write(a, "deleted-by-b", "a-before")
    await write(a, "deleted-by-a", "b-will-not-see")
    await proxy.cut()
    await wait_for_mode(a, "degraded")
    await write(a, "same", "a-degraded")  # older than B's write below
    await write(b, "same", "b-full")
    await write(b, "newer-in-a", "b-first")
    await write(a, "newer-in-a", "a-later")  # newer than B's
    await write(a, "only-a", "a")
    await write(b, "only-b", "b")
    await delete(b, "deleted-by-b")
    await delete(a, "deleted-by-a")
    await proxy.heal()
    await wait_for_mode(a, "full")

    expected = {
        "same": "b-full",
        "newer-in-a": "a-later",
        "only-a": "a",
        "only-b": "b",
        "deleted-by-b": None,
        "deleted-by-a": None,
    }
    for key, value in expected.items():
        assert await in_redis(redis_server, key) == value, key
        for client in (a, b):
            await eventually(client, key, value)
    assert a.server.app[sqlite_key].journal_pending == 0


async def test_redis_restarted_empty_during_an_outage_gets_the_outage_writes(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    a = await make_service(redis_server)
    b = await make_service(redis_server)
    await write(a, "before", 1)
    redis_server.kill()
    await wait_for_mode(a, "degraded")
    await wait_for_mode(b, "degraded")
    await write(a, "during-a", "a")
    await write(b, "during-b", "b")
    await delete(a, "before")
    redis_server.start()  # empty: no persistence
    await wait_for_mode(a, "full")
    await wait_for_mode(b, "full")
    for key, value in {"during-a": "a", "during-b": "b", "before": None}.items():
        assert await in_redis(redis_server, key) == value, key
        for client in (a, b):
            await eventually(client, key, value)


async def test_redis_losing_its_data_keeps_acknowledged_writes(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    """Rule 2: a restart without persistence between two pings loses nothing acknowledged."""
    a = await make_service(redis_server)
    for i in range(20):
        await write(a, f"k{i}", i)
    redis_server.restart()  # quick enough that a may never see an outage
    for i in range(20):
        await eventually(a, f"k{i}", i, within=5)

    async def written_back() -> int:
        values = [await in_redis(redis_server, f"k{i}") for i in range(20)]
        return sum(v is not None for v in values)

    assert await poll(written_back, lambda n: n == 20, within=5) == 20


async def test_an_instance_behind_a_trimmed_feed_drops_what_may_be_stale(
    make_service: ServiceFactory, redis_server: RedisProcess, proxy: LinkProxy
) -> None:
    """Rule 3: when the feed no longer covers the time away, local copies are not trusted."""
    a = await make_service(None, redis_url=proxy.url, feed_max_length=100)
    b = await make_service(redis_server, feed_max_length=100)
    await wait_for_mode(a, "full")
    await write(a, "stale?", "a")
    await proxy.cut()
    await wait_for_mode(a, "degraded")
    await write(a, "mine", "journaled")
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        await r.unlink("cache:stale?")  # evicted in Redis; B's change below never reaches A
        for i in range(400):
            await write(b, f"filler{i}", i)
    finally:
        await r.aclose()
    await proxy.heal()
    await wait_for_mode(a, "full")
    registry = a.server.app[metrics_key].registry
    assert registry.get_sample_value("tiercache_resyncs_total", {"outcome": "feed_trimmed"}) == 1
    assert a.server.app[memory_key].get("stale?") is None
    assert await a.server.app[sqlite_key].get("stale?") is None
    assert await read(a, "stale?") is None
    assert await read(a, "mine") == "journaled"
    assert await in_redis(redis_server, "mine") == "journaled"


# Deletes leave tombstones ----------------------------------------------------------------


async def test_an_older_write_arriving_after_a_delete_does_not_bring_the_key_back(
    redis_server: RedisProcess,
) -> None:
    """Two instances replaying their journals at once, or a write that outlived its client's
    deadline, can deliver a write older than a delete after it: the newest change wins."""
    settings = Settings(_env_file=None, redis_url=redis_server.url)
    tier = RedisTier(make_client(settings, None, 4), "cache:", 0.5)
    try:
        assert await tier.set("k", Entry(b"1", None, 100))
        assert await tier.delete("k", 300) == 1
        assert not await tier.set("k", Entry(b"2", None, 200))  # older than the delete
        assert await tier.get("k") is None
        assert not await tier.contains("k")
        assert 0 < await tier.client.pttl("cache:k") <= TOMBSTONE_MILLISECONDS
        assert await tier.set("k", Entry(b"3", None, 400))  # newer: a value again, no TTL
        assert await tier.get("k") == Entry(b"3", None, 400)
        assert await tier.client.pttl("cache:k") == -1
        # A key deleted before it was ever written is guarded too.
        assert await tier.delete("never", 500) == 0
        assert not await tier.set("never", Entry(b"x", None, 450))
        # Pattern deletes count the values they removed, and leave tombstones where they are.
        assert await tier.set("p", Entry(b"1", None, 600))
        assert await tier.delete_pattern("*", 700) == 2  # k and p, not "never"
        assert not await tier.set("never", Entry(b"x", None, 460))
    finally:
        await tier.close()


async def test_tombstones_take_no_room_in_a_pattern_delete_limit(
    redis_server: RedisProcess,
) -> None:
    settings = Settings(_env_file=None, redis_url=redis_server.url)
    tier = RedisTier(make_client(settings, None, 4), "cache:", 0.5)
    try:
        for i in range(4):
            await tier.delete(f"t{i}", 100)  # tombstones, matched by the pattern too
        for i in range(3):
            assert await tier.set(f"u{i}", Entry(b"1", None, 200))
        assert await tier.delete_pattern("[tu]*", 300, limit=3) == 3
        assert [await tier.get(f"u{i}") for i in range(3)] == [None] * 3
    finally:
        await tier.close()


# A randomized run against a model ------------------------------------------------------


@pytest.mark.slow
async def test_random_interleavings_converge_to_the_model(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    rng = random.Random(20261126)
    proxies = [await LinkProxy(redis_server.port).start() for _ in range(3)]
    try:
        clients = [await make_service(None, redis_url=p.url) for p in proxies]
        for client in clients:
            await wait_for_mode(client, "full")
        keys = [f"r{i}" for i in range(8)]
        model: dict[str, Any] = {}
        cut: set[int] = set()
        for step in range(120):
            roll = rng.random()
            who = rng.randrange(3)
            key = rng.choice(keys)
            if roll < 0.08 and len(cut) < 2:
                await proxies[who].cut()
                cut.add(who)
            elif roll < 0.16 and cut:
                healed = rng.choice(sorted(cut))
                await proxies[healed].heal()
                cut.discard(healed)
            elif roll < 0.6:
                await write(clients[who], key, step)
                model[key] = step
            elif roll < 0.75:
                await delete(clients[who], key)
                model.pop(key, None)
            elif roll < 0.8:
                await delete(clients[who], "r[0-3]")
                for k in keys[:4]:
                    model.pop(k, None)
            else:
                await read(clients[who], key)  # reads in between must not disturb anything
        for healed in sorted(cut):
            await proxies[healed].heal()
        for client in clients:
            await wait_for_mode(client, "full", within=10)
        for key in keys:
            assert await in_redis(redis_server, key) == model.get(key), key
            for client in clients:
                await eventually(client, key, model.get(key))
    finally:
        for p in proxies:
            await p.close()


async def test_near_cache_mode_serves_memory_first_and_stays_coherent(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    a = await make_service(redis_server, cache_read_mode="near")
    b = await make_service(redis_server, cache_read_mode="near")
    await write(a, "hot", "v1")
    first = await (await b.get(url("hot"))).json()
    assert (first["tier"], first["value"]) == ("redis", "v1")
    second = await (await b.get(url("hot"))).json()
    assert (second["tier"], second["value"]) == ("memory", "v1"), "the near cache filled"
    await write(a, "hot", "v2")
    await eventually(b, "hot", "v2")  # the feed dropped B's near copy
    await delete(a, "hot")
    await eventually(b, "hot", None)
