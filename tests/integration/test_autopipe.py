"""The auto-pipeline against a real redis-server: the connections it keeps and how it paces
batches (held while one is in flight when Redis is near, never when it is far)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis

from service.settings import Settings
from service.tiers.autopipe import HOLD_BELOW_ROUND_TRIP_SECONDS, AutoPipeline
from service.tiers.base import TierError
from service.tiers.redis import RedisClient, make_client
from service.tiers.roundtrip import RoundTripFloor
from tests.procs import RedisProcess

KEYS = 20
TIMEOUT_SECONDS = 0.5


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[RedisClient]:
    settings = Settings(_env_file=None, redis_url=redis_server.url)
    client = make_client(settings, None, pool_size=8)
    await client.mset({f"k{i}": f"v{i}" for i in range(KEYS)})
    yield client
    await client.aclose()


def near() -> RoundTripFloor:
    floor = RoundTripFloor()
    floor.add(HOLD_BELOW_ROUND_TRIP_SECONDS / 10)
    return floor


def far() -> RoundTripFloor:
    floor = RoundTripFloor()
    floor.add(HOLD_BELOW_ROUND_TRIP_SECONDS * 10)
    return floor


def get(pipe: AutoPipeline, i: int) -> asyncio.Task[list[object]]:
    return asyncio.create_task(pipe.execute(("GET", f"k{i}")))


async def sent(pipe: AutoPipeline, batches: int) -> None:
    """Let the loop turn until that many batches are in flight."""
    for _ in range(100):
        if len(pipe._in_flight) >= batches:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(pipe._in_flight)} batches in flight, not {batches}")


async def two_batches_in_flight(
    pipe: AutoPipeline, redis_server: RedisProcess, size: int
) -> list[asyncio.Task[list[object]]]:
    """GETs of k0.. in two batches sent while Redis is paused, so both are out at once."""
    redis_server.pause()
    try:
        first = [get(pipe, i) for i in range(size)]
        await sent(pipe, 1)
        second = [get(pipe, i) for i in range(size, 2 * size)]
        await sent(pipe, 2)
    finally:
        redis_server.resume()
    return first + second


async def test_callers_wait_for_the_batch_in_flight_when_redis_is_near(
    client: RedisClient, redis_server: RedisProcess
) -> None:
    pipe = AutoPipeline(client, TIMEOUT_SECONDS, near())
    redis_server.pause()  # so that the first batch stays in flight
    try:
        first = [get(pipe, i) for i in range(5)]
        await sent(pipe, 1)
        held = [get(pipe, i) for i in range(5, 20)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(pipe._in_flight) == 1, "a second batch went out while one was in flight"
        assert len(pipe._queue) == 15
    finally:
        redis_server.resume()
    replies = await asyncio.gather(*first, *held)
    assert replies == [[f"v{i}".encode()] for i in range(20)]
    await pipe.close()


async def test_callers_do_not_wait_when_redis_is_far(
    client: RedisClient, redis_server: RedisProcess
) -> None:
    pipe = AutoPipeline(client, TIMEOUT_SECONDS, far())
    replies = await asyncio.gather(*await two_batches_in_flight(pipe, redis_server, 5))
    assert replies == [[f"v{i}".encode()] for i in range(10)]
    await pipe.close()


async def test_a_redis_on_this_host_is_measured_near(client: RedisClient) -> None:
    """The real floor of loopback round trips is under the threshold, so holding is on."""
    pipe = AutoPipeline(client, TIMEOUT_SECONDS)
    for i in range(50):
        await pipe.execute(("GET", f"k{i % KEYS}"))
    assert pipe.round_trips.seconds < HOLD_BELOW_ROUND_TRIP_SECONDS, pipe.round_trips.seconds
    await pipe.close()


async def test_a_held_batch_keeps_its_callers_deadline(
    client: RedisClient, redis_server: RedisProcess
) -> None:
    """Held behind a batch that hangs, callers still fail one timeout after they asked, not
    after the batch ahead of them gave up."""
    pipe = AutoPipeline(client, TIMEOUT_SECONDS, near())
    redis_server.pause()
    try:
        hung = get(pipe, 0)
        await asyncio.sleep(0.2)
        asked = time.monotonic()
        held = get(pipe, 1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert (len(pipe._in_flight), len(pipe._queue)) == (1, 1), "the caller was not held"
        for task in (hung, held):
            with pytest.raises(TierError, match="TimeoutError"):
                await task
        waited = time.monotonic() - asked
    finally:
        redis_server.resume()
    # Measured from its own start: 0.5 s, against 0.3 + 0.5 s if the deadline restarted when
    # the batch was sent.
    assert TIMEOUT_SECONDS - 0.05 <= waited <= TIMEOUT_SECONDS + 0.2, waited
    await pipe.close()


async def test_a_batch_whose_time_ran_out_while_held_sends_nothing(client: RedisClient) -> None:
    """Its callers are told it failed, so its commands must not run afterwards."""
    pipe = AutoPipeline(client, TIMEOUT_SECONDS, near())
    loop = asyncio.get_running_loop()
    caller: asyncio.Future[list[object]] = loop.create_future()
    await pipe._send([((("SET", "late", "1"),), caller)], deadline=loop.time() - 0.001)
    with pytest.raises(TierError):
        await caller
    assert await client.exists("late") == 0
    await pipe.close()


async def test_a_batch_cancelled_before_it_started_answers_its_callers(
    client: RedisClient,
) -> None:
    pipe = AutoPipeline(client, TIMEOUT_SECONDS, near())
    caller = get(pipe, 0)
    await sent(pipe, 1)
    for batch in pipe._in_flight:
        batch.cancel()  # as a cancel-all at shutdown would, before its first step
    with pytest.raises(TierError, match="cancelled"):
        await asyncio.wait_for(caller, timeout=2)
    await pipe.close()


async def test_a_closed_pipeline_sends_what_was_asked_and_refuses_the_rest(
    client: RedisClient,
) -> None:
    pipe = AutoPipeline(client, TIMEOUT_SECONDS, near())
    asked = get(pipe, 3)
    await asyncio.sleep(0)  # queued, not yet sent
    await pipe.close()
    assert asked.done(), "close() returned before what was asked had its reply"
    assert await asked == [b"v3"]
    with pytest.raises(TierError, match="closed"):
        await pipe.execute(("GET", "k1"))


async def test_connections_kept_between_batches_leave_the_pool_usable(
    redis_server: RedisProcess,
) -> None:
    """The pipeline keeps at most half the pool, so other users (the health monitor's
    INFO, a pattern delete's SCAN) still get a connection at once."""
    settings = Settings(_env_file=None, redis_url=redis_server.url)
    client = make_client(settings, None, pool_size=2)
    pipe = AutoPipeline(client, TIMEOUT_SECONDS, far())
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        # Two batches in flight at once: each holds one of the pool's two connections.
        await asyncio.gather(*await two_batches_in_flight(pipe, redis_server, 10))
        assert len(await admin.client_list()) == 3, "both pool connections were meant to be used"
        info = await asyncio.wait_for(client.info("server"), timeout=0.4)
        assert info["redis_version"]
    finally:
        await admin.aclose()
        await pipe.close()
        await client.aclose()
