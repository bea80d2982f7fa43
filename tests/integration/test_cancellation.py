"""Requests cancelled mid-flight never leave a connection that answers someone else."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiohttp import ClientTimeout
from redis.exceptions import DataError

from service.settings import Settings
from service.tiers.base import Entry
from service.tiers.redis import RedisTier, make_client
from tests.integration.conftest import ServiceFactory
from tests.procs import RedisProcess

KEYS = 300
ROUNDS = 6
CONCURRENCY = 400


@pytest.fixture
async def tier(redis_server: RedisProcess) -> Any:
    settings = Settings(_env_file=None, redis_url=redis_server.url, redis_pool_size=8)
    tier = RedisTier(make_client(settings, 0.25, 8), "cache:", 0.5)
    for i in range(KEYS):
        await tier.set(f"k{i}", Entry(f'"value-{i}"'.encode(), None))
    yield tier
    await tier.close()


async def test_cancelled_tier_calls_never_cross_replies(tier: RedisTier) -> None:
    rng = random.Random(1234)
    checked = cancelled = 0

    async def read(i: int) -> None:
        nonlocal checked
        entry = await tier.get(f"k{i}")
        assert entry is not None
        assert entry.raw == f'"value-{i}"'.encode(), f"k{i} got another key's reply"
        checked += 1

    for _ in range(ROUNDS):
        tasks = [asyncio.create_task(read(rng.randrange(KEYS))) for _ in range(CONCURRENCY)]
        # Cancel a third of them at random points: before sending, while queued, mid-reply.
        for task in rng.sample(tasks, CONCURRENCY // 3):
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.004), task.cancel)
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, asyncio.CancelledError):
                cancelled += 1
            elif outcome is not None:
                raise outcome
    assert checked > ROUNDS * CONCURRENCY // 2
    assert cancelled > 0
    # After all that, every connection in the pool still answers in order.
    for i in range(KEYS):
        entry = await tier.get(f"k{i}")
        assert entry is not None
        assert entry.raw == f'"value-{i}"'.encode()


async def test_http_clients_that_give_up_do_not_disturb_others(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server, redis_pool_size=4)
    for i in range(100):
        await client.post("/api/performance/cache", json={"key": f"h{i}", "value": i})
    rng = random.Random(99)
    impatient = ClientTimeout(total=0.002)
    wrong: list[str] = []
    served = 0

    async def read(i: int, patient: bool) -> None:
        nonlocal served
        try:
            response = await client.get(
                f"/api/performance/cache/h{i}", timeout=None if patient else impatient
            )
            body = await response.json()
        except TimeoutError:
            return
        served += 1
        if body["value"] != i:
            wrong.append(f"h{i} -> {body}")

    for _ in range(4):
        await asyncio.gather(*(read(rng.randrange(100), rng.random() < 0.6) for _ in range(200)))
    assert not wrong
    assert served > 300


async def test_a_command_that_cannot_be_encoded_fails_alone(tier: RedisTier) -> None:
    """One caller's unencodable argument is its own error, not its whole batch's."""
    pipe = tier._pipe

    def read(i: int) -> asyncio.Task[list[Any]]:
        key = f"cache:k{i}"
        return asyncio.create_task(pipe.execute(("HGET", key, "val"), ("EXISTS", key)))

    first = [read(i) for i in range(3)]
    not_unicode = asyncio.create_task(pipe.execute(("HGET", "cache:\ud800", "val")))
    not_a_string = asyncio.create_task(pipe.execute(("HGET", "cache:k0", None)))
    last = [read(i) for i in range(3, 6)]
    await asyncio.sleep(0)
    assert len(pipe._queue) == 8, "the callers were meant to share one batch"
    replies = await asyncio.gather(*first, *last)
    assert replies == [[f'"value-{i}"'.encode(), 1] for i in range(6)]
    for failed in (not_unicode, not_a_string):
        with pytest.raises(DataError, match="cannot encode HGET"):
            await failed
    # A name of two words ("XINFO STREAM") is sent as two arguments, as redis-py does, and
    # its reply still gets redis-py's parsing for that command.
    (info,) = await pipe.execute(("XINFO STREAM", tier.feed))
    assert info["length"] == KEYS
