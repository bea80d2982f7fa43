"""Redis Sentinel: when the master dies and a replica is promoted, the service follows it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.integration.conftest import ServiceFactory
from tests.load import SteadyLoad
from tests.polling import poll, wait_for_mode
from tests.procs import RedisProcess, SentinelProcess

pytestmark = pytest.mark.slow

API = "/api/performance/cache"


@pytest.fixture
def topology() -> Iterator[tuple[RedisProcess, RedisProcess, list[SentinelProcess]]]:
    master = RedisProcess().start()
    replica = RedisProcess(None, "--replicaof", "127.0.0.1", str(master.port)).start()
    sentinels = [SentinelProcess(master.port).start() for _ in range(3)]
    try:
        yield master, replica, sentinels
    finally:
        for process in (*sentinels, replica, master):
            process.stop()


async def role(port: int) -> str:
    r = aioredis.Redis(port=port)
    try:
        return str((await r.info("replication"))["role"])
    finally:
        await r.aclose()


async def test_failover_under_load_loses_no_request(
    make_service: ServiceFactory, topology: tuple[RedisProcess, RedisProcess, list[SentinelProcess]]
) -> None:
    master, replica, sentinels = topology
    client = await make_service(
        None,
        redis_url=None,
        redis_sentinels=",".join(f"127.0.0.1:{s.port}" for s in sentinels),
        redis_sentinel_master="mymaster",
    )

    await wait_for_mode(client, "full", within=5)
    await client.post(API, json={"key": "before", "value": 1})

    async with SteadyLoad(client) as load:
        await asyncio.sleep(0.5)
        master.kill()
        killed = time.monotonic()
        became = await poll(lambda: role(replica.port), lambda r: r == "master", within=20)
        assert became == "master"
        promoted = time.monotonic() - killed
        await wait_for_mode(client, "full", within=10)
        recovered = time.monotonic() - killed
        await asyncio.sleep(0.5)  # keep the load on the new master a little
    assert not load.failures, load.failures[:5]
    assert load.served > 100
    print(f"promoted after {promoted:.1f}s, service full again after {recovered:.1f}s")

    await client.post(API, json={"key": "after", "value": 2})
    r = aioredis.Redis(port=replica.port)
    try:
        assert json.loads(await r.hget("cache:after", "val")) == 2
        assert json.loads(await r.hget("cache:before", "val")) == 1  # replicated, or written back
    finally:
        await r.aclose()
    body: dict[str, Any] = await (await client.get(f"{API}/before")).json()
    assert body["value"] == 1
