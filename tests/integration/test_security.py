"""Bearer tokens, the rate limit, and the guard rails on pattern deletes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.integration.conftest import ServiceFactory
from tests.procs import RedisProcess

API = "/api/performance/cache"
FULL, READ = "full-access-token", "read-only-token"


@pytest.fixture
async def guarded(make_service: ServiceFactory, redis_server: RedisProcess) -> Any:
    return await make_service(redis_server, cache_api_token=FULL, cache_read_token=READ)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_no_token_no_access(guarded: Any) -> None:
    for method, path in (("GET", f"{API}/k"), ("POST", API), ("DELETE", f"{API}/k"),
                         ("GET", f"{API}/stats")):  # fmt: skip
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {FULL}"}):
            response = await guarded.request(method, path, headers=headers, json={})
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["success"] is False


async def test_a_token_that_is_not_utf8_is_refused_in_json(guarded: Any) -> None:
    reader, writer = await asyncio.open_connection(guarded.server.host, guarded.server.port)
    writer.write(
        b"GET /api/performance/cache/k HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert json.loads(body)["error"] == "missing or invalid bearer token"


async def test_refusals_are_timed_under_their_route(guarded: Any) -> None:
    assert (await guarded.get(f"{API}/k")).status == 401
    text = await (await guarded.get("/metrics")).text()
    route = 'route="/api/performance/cache/{key}"'
    assert f"tiercache_request_duration_seconds_count{{{route}}} 1.0" in text


async def test_tokens_grant_what_they_should(guarded: Any) -> None:
    write = await guarded.post(API, json={"key": "k", "value": 1}, headers=bearer(FULL))
    assert write.status == 200
    assert (await guarded.get(f"{API}/k", headers=bearer(READ))).status == 200
    assert (await guarded.head(f"{API}/k", headers=bearer(READ))).status == 200
    denied = await guarded.post(API, json={"key": "k", "value": 2}, headers=bearer(READ))
    assert denied.status == 403
    assert (await guarded.delete(f"{API}/k", headers=bearer(READ))).status == 403
    assert (await (await guarded.get(f"{API}/k", headers=bearer(FULL))).json())["value"] == 1


async def test_operational_routes_stay_open(guarded: Any) -> None:
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert (await guarded.get(path)).status == 200


async def test_rate_limit_answers_429_with_retry_after(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server, rate_limit_per_second=1, rate_limit_burst=5)
    statuses = [(await client.get(f"{API}/k")).status for _ in range(8)]
    assert statuses[:5] == [404] * 5
    assert 429 in statuses[5:]
    limited = await client.get(f"{API}/k")
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await client.get("/health")).status == 200


async def test_deleting_everything_needs_confirmation(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    await client.post(API, json={"key": "k", "value": 1})
    for pattern in ("*", "**", "%3F*", "*%3F*"):  # %3F: a "?" in the path
        refused = await client.delete(f"{API}/{pattern}")
        assert refused.status == 400
        assert "confirm=all" in (await refused.json())["error"]
    assert (await client.get(f"{API}/k")).status == 200
    confirmed = await client.delete(f"{API}/*?confirm=all")
    body = await confirmed.json()
    assert body == {"success": True, "complete": True,
                    "deleted": {"redis": 1, "memory": 1, "database": 1}}  # fmt: skip


async def test_pattern_deletes_stop_at_the_bound_and_say_so(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server, cache_max_pattern_delete_keys=10)
    for i in range(25):
        await client.post(API, json={"key": f"b:{i}", "value": i})
    rounds = []
    while True:
        body = await (await client.delete(f"{API}/b:*")).json()
        rounds.append(body["deleted"]["redis"])
        assert max(body["deleted"].values()) <= 10
        if body["complete"]:
            break
        assert len(rounds) < 10
    assert rounds == [10, 10, 5]
    assert (await client.get(f"{API}/b:3")).status == 404
