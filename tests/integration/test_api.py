"""The HTTP API over the real app and a real redis-server: round trips, tiers, TTLs, bad input."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis

from service.keys import memory_key, sqlite_key
from tests.integration.conftest import ServiceFactory
from tests.polling import poll
from tests.procs import RedisProcess

API = "/api/performance/cache"

JSON_VALUES: list[Any] = [
    "text",
    "",
    "ünïcødé ✓ 🚀",
    0,
    -17,
    2**53,
    3.25,
    True,
    False,
    None,
    [],
    [1, "two", None, [3.5]],
    {},
    {"nested": {"list": [1, 2, {"deep": True}], "s": "x"}},
]


def path(key: str) -> str:
    return f"{API}/{quote(key, safe='')}"


@pytest.fixture
async def redis_client(redis_server: RedisProcess) -> Any:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("value", JSON_VALUES, ids=lambda v: type(v).__name__)
async def test_round_trip_every_json_type(
    make_service: ServiceFactory, redis_server: RedisProcess, value: Any
) -> None:
    client = await make_service(redis_server)
    response = await client.post(API, json={"key": "k", "value": value})
    assert response.status == 200
    assert await response.json() == {"success": True, "message": "Cache set successfully"}

    response = await client.get(path("k"))
    assert response.status == 200
    assert await response.json() == {
        "success": True, "value": value, "source": "cache", "tier": "redis", "ttl": None,
    }  # fmt: skip

    response = await client.delete(path("k"))
    assert await response.json() == {
        "success": True, "deleted": {"redis": 1, "memory": 1, "database": 1},
    }  # fmt: skip
    assert (await client.get(path("k"))).status == 404


@pytest.mark.parametrize(
    "key",
    [
        "user:42",
        "a/b/c",
        "with space",
        "ключ",
        "emoji 🚀",
        "q?x",
        "per%cent",
        "line\nbreak",
        "x" * 1024,
    ],
)
async def test_keys_of_every_shape(
    make_service: ServiceFactory, redis_server: RedisProcess, redis_client: Any, key: str
) -> None:
    client = await make_service(redis_server)
    assert (await client.post(API, json={"key": key, "value": key})).status == 200
    body = await (await client.get(path(key))).json()
    assert body["value"] == key
    # Operators find the key in Redis under the prefix, exactly as written.
    assert json.loads(await redis_client.hget(f"cache:{key}", "val")) == key
    assert (await client.head(path(key))).status == 200
    assert (await (await client.delete(path(key))).json())["deleted"]["database"] == 1


async def test_ttl_is_reported_and_stored_in_every_tier(
    make_service: ServiceFactory, redis_server: RedisProcess, redis_client: Any
) -> None:
    client = await make_service(redis_server)
    await client.post(API, json={"key": "t", "value": 1, "ttl": 100})
    body = await (await client.get(path("t"))).json()
    assert body["tier"] == "redis"
    assert 99 <= body["ttl"] <= 100
    assert 99_000 <= await redis_client.pttl("cache:t") <= 100_000
    memory = client.server.app[memory_key].get("t")
    database = await client.server.app[sqlite_key].get("t")
    assert memory is not None
    assert database is not None
    for entry in (memory, database):
        assert entry.expires_at is not None
        assert 99 <= entry.expires_at - time.time() <= 100


async def test_promotion_from_memory_keeps_remaining_ttl(
    make_service: ServiceFactory, redis_server: RedisProcess, redis_client: Any
) -> None:
    client = await make_service(redis_server)
    await client.post(API, json={"key": "p", "value": "v", "ttl": 100})
    await redis_client.unlink("cache:p")  # as if evicted by Redis: memory still has it
    body = await (await client.get(path("p"))).json()
    assert body["tier"] == "memory"
    assert 98 <= body["ttl"] <= 100

    async def promoted() -> int:
        return int(await redis_client.pttl("cache:p"))

    pttl = await poll(promoted, lambda v: v > 0)
    assert 97_000 <= pttl <= 100_000, "promoted with the remaining TTL, not a fresh one"
    assert (await (await client.get(path("p"))).json())["tier"] == "redis"


async def test_promotion_from_database_fills_memory_and_redis(
    make_service: ServiceFactory, redis_server: RedisProcess, redis_client: Any
) -> None:
    client = await make_service(redis_server)
    await client.post(API, json={"key": "d", "value": [1], "ttl": 50})
    await redis_client.unlink("cache:d")
    client.server.app[memory_key].delete("d")

    body = await (await client.get(path("d"))).json()
    assert body["tier"] == "database"
    assert 48 <= body["ttl"] <= 50
    memory = client.server.app[memory_key].get("d")
    assert memory is not None
    assert memory.expires_at is not None
    assert 48 <= memory.expires_at - time.time() <= 50

    async def promoted() -> int:
        return int(await redis_client.pttl("cache:d"))

    assert 47_000 <= await poll(promoted, lambda v: v > 0) <= 50_000


async def test_expired_entries_are_served_by_no_tier(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    await client.post(API, json={"key": "short", "value": 1, "ttl": 1})
    assert (await client.get(path("short"))).status == 200

    async def status() -> int:
        return (await client.get(path("short"))).status

    started = time.monotonic()
    assert await poll(status, lambda s: s == 404, within=5) == 404
    assert time.monotonic() - started < 3
    app = client.server.app
    assert app[memory_key].get("short") is None
    assert await app[sqlite_key].get("short") is None
    assert (await client.head(path("short"))).status == 404


async def test_pattern_delete_clears_all_tiers_and_nothing_else(
    make_service: ServiceFactory, redis_server: RedisProcess, redis_client: Any
) -> None:
    client = await make_service(redis_server)
    await redis_client.set("other-app:user:1", "keep")  # another application's key
    for key in ("user:1", "user:2", "user:10", "session:1"):
        await client.post(API, json={"key": key, "value": key})

    response = await client.delete(path("user:?"))
    assert await response.json() == {
        "success": True, "complete": True, "deleted": {"redis": 2, "memory": 2, "database": 2},
    }  # fmt: skip
    assert (await client.get(path("user:1"))).status == 404
    assert (await client.get(path("user:10"))).status == 200
    assert await redis_client.get("other-app:user:1") == b"keep"

    response = await client.delete(f"{API}/nothing*")
    assert await response.json() == {
        "success": True, "complete": True, "deleted": {"redis": 0, "memory": 0, "database": 0},
    }  # fmt: skip


async def test_escaped_glob_characters_delete_one_literal_key(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    for key in ("a*", "ab", "a?"):
        await client.post(API, json={"key": key, "value": 1})
    response = await client.delete(path("a\\*"))
    assert (await response.json())["deleted"] == {"redis": 1, "memory": 1, "database": 1}
    assert (await client.get(path("ab"))).status == 200
    assert (await client.get(path("a?"))).status == 200
    assert (await client.get(path("a*"))).status == 404


async def test_values_survive_a_restart_through_sqlite(
    make_service: ServiceFactory, redis_server: RedisProcess, tmp_path: Any
) -> None:
    db = tmp_path / "restart.db"
    first = await make_service(None, cache_db_path=db)
    await first.post(API, json={"key": "kept", "value": {"n": 1}})
    await first.post(API, json={"key": "ttl", "value": 2, "ttl": 300})
    await first.close()

    second = await make_service(None, cache_db_path=db)
    body = await (await second.get(path("kept"))).json()
    assert body == {"success": True, "value": {"n": 1}, "source": "cache",
                    "tier": "database", "ttl": None}  # fmt: skip
    ttl_body = await (await second.get(path("ttl"))).json()
    assert 295 <= ttl_body["ttl"] <= 300


async def test_stats_shape_and_hit_rates(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    fresh = await (await client.get(f"{API}/stats")).json()
    assert [fresh[t]["hitRate"] for t in ("redis", "memory", "database")] == ["0%"] * 3
    await client.post(API, json={"key": "s", "value": 1})
    for _ in range(2):
        await client.get(path("s"))
    await client.get(path("missing"))
    body = await (await client.get(f"{API}/stats")).json()
    assert body["success"] is True
    assert body["mode"] == "full"
    assert body["degradedSince"] is None
    assert body["redis"]["connected"] is True
    assert body["redis"]["hits"] == 2
    assert body["redis"]["misses"] == 1
    assert body["redis"]["hitRate"] == "66.67%"
    assert body["redis"]["errors"] == 0
    assert set(body["redis"]["server"]) == {
        "totalConnections", "totalCommands", "keyspaceHits", "keyspaceMisses",
    }  # fmt: skip
    assert body["memory"]["entries"] == 1
    assert body["memory"]["hitRate"] == "0.00%"
    assert body["database"]["total_entries"] == 1
    assert body["database"]["misses"] == 1


async def test_health_ready_and_metrics(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    health = await client.get("/health")
    assert health.status == 200
    assert (await health.json())["mode"] == "full"
    ready = await client.get("/ready")
    assert ready.status == 200
    await client.post(API, json={"key": "m", "value": 1})
    await client.get(path("m"))
    text = await (await client.get("/metrics")).text()
    assert 'tiercache_tier_hits_total{tier="redis"} 1.0' in text
    assert "tiercache_redis_up 1.0" in text
    assert 'tiercache_requests_total{operation="set",outcome="ok"} 1.0' in text
    # Latency is labelled by route template; unknown paths and methods share one label.
    assert (await client.get("/nope")).status == 404
    assert (await client.put(API)).status == 405
    text = await (await client.get("/metrics")).text()
    key_route = 'route="/api/performance/cache/{key}"'
    assert f"tiercache_request_duration_seconds_count{{{key_route}}} 1.0" in text
    assert 'tiercache_request_duration_seconds_count{route="unmatched"} 2.0' in text
