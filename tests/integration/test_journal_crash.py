"""The degraded-mode journal survives kill -9 and is replayed into Redis after a restart."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.polling import wait_for_mode
from tests.procs import RedisProcess, ServiceProcess

API = "/api/performance/cache"


@pytest.fixture
def absent_redis() -> Iterator[RedisProcess]:
    """A RedisProcess whose port is chosen but which is not running yet."""
    server = RedisProcess()
    yield server
    server.stop()


async def test_journal_survives_a_crash_and_is_replayed(
    absent_redis: RedisProcess, tmp_path: Path
) -> None:
    service = ServiceProcess(tmp_path, REDIS_URL=absent_redis.url).start()
    try:
        async with aiohttp.ClientSession(service.base_url) as http:
            health = await (await http.get("/health")).json()
            assert health["mode"] == "degraded"
            for i in range(10):
                response = await http.post(API, json={"key": f"j{i}", "value": {"n": i}})
                assert response.status == 200
            assert (await http.delete(f"{API}/j9")).status == 200
        service.kill()

        with sqlite3.connect(tmp_path / "cache.db") as db:
            ops = [row[0] for row in db.execute("SELECT op FROM journal ORDER BY seq")]
        assert ops == ["set"] * 10 + ["delete"]

        absent_redis.start()
        service.start()
        async with aiohttp.ClientSession(service.base_url) as http:
            await wait_for_mode(http, "full")
            body = await (await http.get(f"{API}/j3")).json()
            assert body["value"] == {"n": 3}
            assert body["tier"] == "redis"
        r = aioredis.Redis.from_url(absent_redis.url)
        try:
            for i in range(9):
                assert json.loads(await r.hget(f"cache:j{i}", "val")) == {"n": i}
            assert not await r.hexists("cache:j9", "val")  # its delete's tombstone, no value
        finally:
            await r.aclose()
        with sqlite3.connect(tmp_path / "cache.db") as db:
            assert db.execute("SELECT count(*) FROM journal").fetchone()[0] == 0
    finally:
        service.stop()
