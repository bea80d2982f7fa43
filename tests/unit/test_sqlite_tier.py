"""The SQLite tier: durable entries, TTL, sweeping, glob deletes, group commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.metrics import Metrics
from service.tiers.base import Entry
from service.tiers.sqlite import SqliteTier


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def tier(tmp_path: Path, clock: Clock) -> AsyncIterator[SqliteTier]:
    tier = SqliteTier(Metrics(), tmp_path / "db" / "cache.db", clock=clock)
    await tier.open()
    yield tier
    await tier.close()


async def test_round_trip_and_overwrite(tier: SqliteTier) -> None:
    await tier.set("k", Entry(b'"a"', None))
    await tier.set("k", Entry(b'"b"', 2_000.0))
    assert await tier.get("k") == Entry(b'"b"', 2_000.0)
    assert await tier.contains("k")
    assert await tier.count() == 1
    assert await tier.delete("k") == 1
    assert await tier.delete("k") == 0
    assert await tier.get("k") is None


async def test_expired_rows_are_not_served_and_are_swept(tier: SqliteTier, clock: Clock) -> None:
    await tier.set("short", Entry(b"1", clock.now + 5))
    await tier.set("long", Entry(b"1", clock.now + 500))
    await tier.set("forever", Entry(b"1", None))
    clock.now += 10
    assert await tier.get("short") is None
    assert not await tier.contains("short")
    assert await tier.count() == 2
    assert await tier.sweep() == 1
    assert await tier.delete("short") == 0


async def test_delete_pattern_follows_redis_glob(tier: SqliteTier) -> None:
    for key in ("user:1", "user:2", "user:10", "user", "usex:1", "other:user:1", "é:1", "[x]"):
        await tier.set(key, Entry(b"1", None))
    assert await tier.delete_pattern("user:?") == 2
    assert await tier.delete_pattern("user*") == 2  # user:10 and user
    assert await tier.delete_pattern("?:1") == 0  # é is two bytes: ? is one
    assert await tier.delete_pattern("??:1") == 1
    assert await tier.delete_pattern("\\[x]") == 1
    assert await tier.count() == 2  # usex:1, other:user:1


async def test_concurrent_writes_share_commits(tier: SqliteTier) -> None:
    commits = 0
    original = tier._commit

    async def counting(batch):  # type: ignore[no-untyped-def]
        nonlocal commits
        commits += 1
        await original(batch)

    tier._commit = counting  # type: ignore[method-assign]
    await asyncio.gather(*(tier.set(f"k{i}", Entry(b"1", None)) for i in range(200)))
    assert await tier.count() == 200
    assert commits < 20, f"{commits} commits for 200 concurrent writes"


async def test_writes_then_deletes_keep_their_order_in_one_batch(tier: SqliteTier) -> None:
    results = await asyncio.gather(
        tier.set("a", Entry(b"1", None)),
        tier.delete("a"),
        tier.set("b", Entry(b"1", None)),
        tier.delete_pattern("b*"),
        tier.set("b", Entry(b"2", None)),
    )
    assert results == [None, 1, None, 1, None]
    assert await tier.get("a") is None
    assert await tier.get("b") == Entry(b"2", None)


async def test_entries_survive_reopening(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "cache.db"
    first = SqliteTier(Metrics(), path, clock=clock)
    await first.open()
    await first.set("kept", Entry(b"[1]", clock.now + 100))
    await first.close()
    second = SqliteTier(Metrics(), path, clock=clock)
    await second.open()
    try:
        assert await second.get("kept") == Entry(b"[1]", clock.now + 100)
    finally:
        await second.close()
