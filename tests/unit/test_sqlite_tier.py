"""The SQLite tier: durable entries, TTL, sweeping, glob deletes, group commit, batched
lookups and the keys it remembers as absent."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.metrics import Metrics
from service.tiers.base import Entry, TierError
from service.tiers.sqlite import (
    _ABSENT_KEY_OVERHEAD_BYTES,
    LOOKUP_BATCH_MAX_KEYS,
    SqliteTier,
    _AbsentKeys,
)


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


# Batched lookups and the keys known absent


def count_batches(tier: SqliteTier) -> list[int]:
    """Record the size of every lookup batch the tier reads from now on."""
    sizes: list[int] = []
    original = tier._look_up

    async def counting(batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        await original(batch)

    tier._look_up = counting  # type: ignore[method-assign]
    return sizes


async def test_concurrent_lookups_share_one_query(tier: SqliteTier, clock: Clock) -> None:
    await tier.set("a", Entry(b"1", None, 7))
    await tier.set("b", Entry(b"2", clock.now + 5))
    await tier.set("c", Entry(b"3", clock.now + 500))
    clock.now += 10  # b has expired
    sizes = count_batches(tier)
    results = await asyncio.gather(
        tier.get("a"), tier.get("b"), tier.get("c"), tier.get("absent"), tier.get("a"),
        tier.contains("a"), tier.contains("b"), tier.contains("absent"),
    )  # fmt: skip
    assert results == [
        Entry(b"1", None, 7), None, Entry(b"3", clock.now + 490), None, Entry(b"1", None, 7),
        True, False, False,
    ]  # fmt: skip
    assert sizes == [4]  # a, b, c, absent: one query, each key asked for once


async def test_a_lookup_batch_is_bounded(tier: SqliteTier) -> None:
    await tier.set("k7", Entry(b"7", None))
    sizes = count_batches(tier)
    results = await asyncio.gather(*(tier.get(f"k{i}") for i in range(1_200)))
    assert sizes == [LOOKUP_BATCH_MAX_KEYS, LOOKUP_BATCH_MAX_KEYS, 200]
    assert results[7] == Entry(b"7", None)
    assert results.count(None) == 1_199


async def test_a_failed_lookup_fails_every_waiter(
    tier: SqliteTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(sql: str, args: object) -> list[object]:
        raise sqlite3.OperationalError("disk I/O error")

    assert tier._reader is not None
    monkeypatch.setattr(tier._reader, "execute_fetchall", failing)
    results = await asyncio.gather(
        tier.get("a"), tier.get("b"), tier.contains("c"), return_exceptions=True
    )
    assert [type(r) for r in results] == [TierError] * 3
    assert all("disk I/O error" in str(r) for r in results)
    monkeypatch.undo()
    assert len(tier._absent) == 0  # a failed lookup proves nothing absent
    await tier.set("a", Entry(b"1", None))
    assert await tier.get("a") == Entry(b"1", None)


async def test_a_cancelled_lookup_leaves_the_others_answered(tier: SqliteTier) -> None:
    await tier.set("a", Entry(b"1", None))
    tasks = [asyncio.create_task(tier.get(key)) for key in ("a", "a", "b")]
    await asyncio.sleep(0)  # all three are queued
    tasks[1].cancel()
    assert await tasks[0] == Entry(b"1", None)
    assert await tasks[2] is None
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert await tier.get("a") == Entry(b"1", None)


async def test_an_absent_key_costs_no_query_until_it_is_set(tier: SqliteTier) -> None:
    assert await tier.get("k") is None
    sizes = count_batches(tier)
    assert await tier.get("k") is None
    assert not await tier.contains("k")
    assert sizes == []
    await tier.set("k", Entry(b"1", None))
    assert await tier.get("k") == Entry(b"1", None)
    assert await tier.contains("k")
    # Removals never make a key present: once it is gone it may be remembered again.
    await tier.delete("k")
    assert not await tier.contains("k")
    assert await tier.get("k") is None
    assert sizes == [1, 1, 1]  # get and contains while present, contains after the delete


async def test_an_expired_row_is_not_remembered_as_absent(tier: SqliteTier, clock: Clock) -> None:
    await tier.set("k", Entry(b"1", clock.now + 5))
    clock.now += 10
    assert await tier.get("k") is None
    assert len(tier._absent) == 0
    assert await tier.sweep() == 1
    assert await tier.get("k") is None
    assert len(tier._absent) == 1


def hold_lookups(tier: SqliteTier) -> tuple[asyncio.Event, asyncio.Event]:
    """Make lookups wait, after their query ran and before they answer, for `release`;
    `queried` is set when a query has run."""
    queried, release = asyncio.Event(), asyncio.Event()
    assert tier._reader is not None
    original = tier._reader.execute_fetchall

    async def held(sql: str, args: list[str]) -> list[object]:
        rows = list(await original(sql, args))
        queried.set()
        await release.wait()
        return rows

    tier._reader.execute_fetchall = held  # type: ignore[method-assign,assignment]
    return queried, release


def hold_commits(tier: SqliteTier) -> asyncio.Event:
    """Make transactions wait for the returned event before they start."""
    release = asyncio.Event()
    original = tier._commit

    async def held(batch):  # type: ignore[no-untyped-def]
        await release.wait()
        await original(batch)

    tier._commit = held  # type: ignore[method-assign]
    return release


@pytest.mark.parametrize("contains", [False, True])
async def test_a_set_during_a_lookup_is_not_hidden(tier: SqliteTier, contains: bool) -> None:
    """The lookup read the file before the set; its miss must not outlive the set."""
    queried, release = hold_lookups(tier)
    lookup = asyncio.create_task(tier.contains("k") if contains else tier.get("k"))
    await queried.wait()
    await tier.set("k", Entry(b"1", None))  # submitted and committed mid-lookup
    release.set()
    assert not await lookup  # it read the file before the commit
    assert await tier.get("k") == Entry(b"1", None)
    assert await tier.contains("k")


async def test_a_set_committed_during_a_lookup_is_not_hidden(tier: SqliteTier) -> None:
    """Submitted before the lookup started, committed after its query ran."""
    commit = hold_commits(tier)
    setting = asyncio.create_task(tier.set("k", Entry(b"1", None)))
    await asyncio.sleep(0)  # submitted, waiting to commit
    queried, release = hold_lookups(tier)
    lookup = asyncio.create_task(tier.get("k"))
    await queried.wait()
    commit.set()
    await setting
    release.set()
    assert await lookup is None
    assert await tier.get("k") == Entry(b"1", None)


async def test_a_set_still_committing_after_a_lookup_is_not_hidden(tier: SqliteTier) -> None:
    """Submitted before the lookup, committed only after it answered."""
    commit = hold_commits(tier)
    setting = asyncio.create_task(tier.set("k", Entry(b"1", None)))
    await asyncio.sleep(0)
    assert await tier.get("k") is None  # not committed yet
    commit.set()
    await setting
    assert await tier.get("k") == Entry(b"1", None)


async def test_reopening_forgets_what_was_absent(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "cache.db"
    tier = SqliteTier(Metrics(), path, clock=clock)
    await tier.open()
    try:
        assert await tier.get("k") is None
        await tier.close()
        other = SqliteTier(Metrics(), path, clock=clock)
        await other.open()
        await other.set("k", Entry(b"1", None))
        await other.close()
        await tier.open()
        assert await tier.get("k") == Entry(b"1", None)
    finally:
        await tier.close()


def test_absent_keys_stay_within_their_budget() -> None:
    absent = _AbsentKeys(3 * (_ABSENT_KEY_OVERHEAD_BYTES + 2))
    for key in ("k1", "k2", "k3"):
        absent.add(key)
    assert absent.hit("k1")  # now the most recently asked for
    absent.add("k4")
    assert len(absent) == 3
    assert not absent.hit("k2")
    assert all(absent.hit(key) for key in ("k1", "k3", "k4"))
    absent.discard("k3")
    absent.add("k5")
    assert all(absent.hit(key) for key in ("k1", "k4", "k5"))


async def test_one_process_per_file_a_second_opener_is_refused(tmp_path: Path) -> None:
    first = SqliteTier(Metrics(), tmp_path / "c.db")
    await first.open()
    second = SqliteTier(Metrics(), tmp_path / "c.db")
    with pytest.raises(TierError, match="in use by another process"):
        await second.open()
    await first.close()
    await second.open()  # the lock went with the first tier
    await second.set("k", Entry(b"1", None, 1))
    assert await second.get("k") == Entry(b"1", None, 1)
    await second.close()


async def test_an_unusable_path_is_a_tier_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    tier = SqliteTier(Metrics(), tmp_path / "file" / "c.db")
    with pytest.raises(TierError, match=r"SQLite file .*file/c\.db: .*file is not a directory"):
        await tier.open()
