"""Bad input gets a clear 4xx JSON error and changes nothing; a refused write is a 503."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from typing import Any
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from service.keys import memory_key, sqlite_key
from tests.integration.conftest import ServiceFactory
from tests.procs import RedisProcess

API = "/api/performance/cache"
LIMIT = 1000  # cache_max_value_bytes for these tests


@pytest.fixture
async def client(make_service: ServiceFactory, redis_server: RedisProcess) -> TestClient[Any, Any]:
    client = await make_service(redis_server, cache_max_value_bytes=LIMIT)
    response = await client.post(API, json={"key": "existing", "value": "original"})
    assert response.status == 200
    return client


async def assert_error(response: Any, status: int, mentions: str) -> None:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["success"] is False
    assert mentions in body["error"]
    assert "Traceback" not in body["error"]


async def assert_unchanged(client: TestClient[Any, Any], redis_server: RedisProcess) -> None:
    body = await (await client.get(f"{API}/existing")).json()
    assert body["value"] == "original"
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        assert sorted(await r.keys("cache:*")) == [b"cache:existing"]
    finally:
        await r.aclose()
    assert len(client.server.app[memory_key]) == 1
    assert await client.server.app[sqlite_key].count() == 1


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'"\\ud800"', "not valid JSON"),
    (b"[]", "JSON object"),
    (b'"a string"', "JSON object"),
    (b"42", "JSON object"),
    (b"null", "JSON object"),
    (b'{"value": 1}', "key must be"),
    (b'{"key": "", "value": 1}', "key must be"),
    (b'{"key": 7, "value": 1}', "key must be"),
    (b'{"key": null, "value": 1}', "key must be"),
    (b'{"key": ["a"], "value": 1}', "key must be"),
    (b'{"key": "existing"}', "value is required"),
    (b'{"key": "existing", "value": 2, "ttl": 0}', "ttl must be"),
    (b'{"key": "existing", "value": 2, "ttl": -5}', "ttl must be"),
    (b'{"key": "existing", "value": 2, "ttl": 1.5}', "ttl must be"),
    (b'{"key": "existing", "value": 2, "ttl": "60"}', "ttl must be"),
    (b'{"key": "existing", "value": 2, "ttl": true}', "ttl must be"),
    (b'{"key": "stats", "value": 2}', "reserved"),
    (b'{"key": "' + b"k" * 1025 + b'", "value": 2}', "longer than 1024 bytes"),
    (b'{"key": "' + "é".encode() * 513 + b'", "value": 2}', "longer than 1024 bytes"),
]


@pytest.mark.parametrize(("body", "mentions"), BAD_BODIES)
async def test_bad_post_bodies(
    client: TestClient[Any, Any], redis_server: RedisProcess, body: bytes, mentions: str
) -> None:
    response = await client.post(API, data=body, headers={"Content-Type": "application/json"})
    await assert_error(response, 400, mentions)
    await assert_unchanged(client, redis_server)


async def test_value_over_the_limit_is_413(
    client: TestClient[Any, Any], redis_server: RedisProcess
) -> None:
    response = await client.post(API, json={"key": "existing", "value": "x" * LIMIT})
    await assert_error(response, 413, "over the limit")
    await assert_unchanged(client, redis_server)


async def test_body_over_the_limit_is_413(
    client: TestClient[Any, Any], redis_server: RedisProcess
) -> None:
    huge = b'{"key": "existing", "value": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    response = await client.post(API, data=io.BytesIO(huge))
    await assert_error(response, 413, "too large")
    await assert_unchanged(client, redis_server)


async def test_key_in_path_over_1024_bytes(
    client: TestClient[Any, Any], redis_server: RedisProcess
) -> None:
    long_key = quote("k" * 1025)
    for method in ("GET", "DELETE"):
        response = await client.request(method, f"{API}/{long_key}")
        await assert_error(response, 400, "longer than 1024 bytes")
    response = await client.head(f"{API}/{long_key}")
    assert response.status == 400
    await assert_unchanged(client, redis_server)


async def test_deleting_the_reserved_stats_key_is_refused(
    client: TestClient[Any, Any], redis_server: RedisProcess
) -> None:
    await assert_error(await client.delete(f"{API}/stats"), 400, "reserved")
    await assert_unchanged(client, redis_server)


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/no%0Aroute", 404),
        ("GET", f"{API}", 405),
        ("PUT", f"{API}", 405),
        ("PATCH", f"{API}/existing", 405),
        ("POST", f"{API}/existing", 405),
        ("DELETE", f"{API}", 405),
    ],
)
async def test_unknown_routes_and_methods(
    client: TestClient[Any, Any], redis_server: RedisProcess, method: str, url: str, status: int
) -> None:
    response = await client.request(method, url)
    await assert_error(response, status, "allowed" if status == 405 else "no route")
    if status == 405:
        assert response.headers["Allow"] == ("POST" if url == API else "DELETE,GET,HEAD")
    await assert_unchanged(client, redis_server)


async def test_a_write_sqlite_refuses_is_503_and_no_tier_holds_it(
    make_service: ServiceFactory, redis_server: RedisProcess, tmp_path: Any
) -> None:
    """SQLite locked by another process: the durable tier refuses, so every tier refuses."""
    db_path = tmp_path / "locked.db"
    client = await make_service(
        redis_server, cache_db_path=db_path, sqlite_busy_timeout_seconds=0.2
    )
    assert (await client.post(API, json={"key": "existing", "value": "original"})).status == 200

    # check_same_thread=False: the lock is taken off the event loop, which must stay free to
    # let the service finish a transaction it may have in flight.
    locker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(locker.execute, "BEGIN EXCLUSIVE")
        for key in ("existing", "fresh"):
            response = await client.post(API, json={"key": key, "value": "new"})
            await assert_error(response, 503, "nothing changed")
        response = await client.delete(f"{API}/existing")
        await assert_error(response, 503, "nothing changed")
    finally:
        locker.close()
    await assert_unchanged(client, redis_server)
    assert (await client.get(f"{API}/fresh")).status == 404
