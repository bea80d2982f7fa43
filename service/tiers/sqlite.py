"""The durable tier: one SQLite file per host, what survives restarts and Redis outages.

Writes are group-committed: every write and delete that arrives while a transaction is being
committed waits for the next one, so concurrent writers share one commit instead of queueing
for one each. A write is acknowledged only after its transaction committed. Reads use their
own connection, so they never wait behind a commit (WAL lets them run side by side).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiosqlite
import structlog

from service.glob import compile_pattern, literal_prefix, prefix_upper_bound
from service.metrics import Metrics
from service.tiers.base import Entry, TierError

log = structlog.get_logger("tiercache.sqlite")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_expires_at ON entries (expires_at)
    WHERE expires_at IS NOT NULL;
"""

_UPSERT = (
    "INSERT INTO entries (key, value, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


def _new_future() -> asyncio.Future[int]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True)
class _Op:
    kind: Literal["set", "delete", "pattern", "sweep"]
    key: str
    entry: Entry | None = None
    done: asyncio.Future[int] = field(default_factory=_new_future)


def _match_function(pattern: str, key: str) -> bool:
    return compile_pattern(pattern)(key)


class SqliteTier:
    """Entries in a SQLite file; expired rows are never served and are swept in the background."""

    name = "database"

    def __init__(
        self,
        metrics: Metrics,
        path: Path,
        synchronous: str = "NORMAL",
        busy_timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout_seconds * 1000)
        self._clock = clock
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None
        self._entries = metrics.tier_entries.labels(self.name)

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._writer.executescript(SCHEMA)
        self._reader = await self._connect()
        await self.sweep()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(f"PRAGMA synchronous={self._synchronous}")
        await conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        await conn.create_function("redis_match", 2, _match_function, deterministic=True)
        return conn

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    # Reads

    async def get(self, key: str) -> Entry | None:
        try:
            async with self._read().execute(
                f"SELECT value, expires_at FROM entries WHERE key = ? AND {_LIVE}",
                (key, self._clock()),
            ) as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as error:
            raise TierError(f"sqlite read failed: {error}") from error
        return None if row is None else Entry(bytes(row[0]), row[1])

    async def contains(self, key: str) -> bool:
        try:
            async with self._read().execute(
                f"SELECT 1 FROM entries WHERE key = ? AND {_LIVE}", (key, self._clock())
            ) as cursor:
                return await cursor.fetchone() is not None
        except sqlite3.Error as error:
            raise TierError(f"sqlite read failed: {error}") from error

    async def ready(self) -> bool:
        """Whether the file answers a trivial query."""
        try:
            async with self._read().execute("SELECT 1") as cursor:
                return await cursor.fetchone() is not None
        except (sqlite3.Error, TierError):
            return False

    def _read(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise TierError("sqlite tier is closed")
        return self._reader

    # Writes: queued, then committed together

    async def set(self, key: str, entry: Entry) -> None:
        await self._submit(_Op("set", key, entry))

    async def delete(self, key: str) -> int:
        return await self._submit(_Op("delete", key))

    async def delete_pattern(self, pattern: str) -> int:
        return await self._submit(_Op("pattern", pattern))

    async def _submit(self, op: _Op) -> int:
        if self._writer is None:
            raise TierError("sqlite tier is closed")
        self._pending.append(op)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())
        # Shielded: a client that disconnects must not cancel a commit others wait on.
        return await asyncio.shield(op.done)

    async def _flush_loop(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._commit(batch)
        finally:
            self._flusher = None

    async def _commit(self, batch: Sequence[_Op]) -> None:
        assert self._writer is not None
        conn = self._writer
        results: list[int] = []
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for run in _runs(batch):
                    results.extend(await self._apply(conn, run))
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            self._metrics.tier_errors.labels(self.name).inc()
            log.error("sqlite write failed", error=str(error), batch=len(batch))
            for op in batch:
                if not op.done.done():
                    op.done.set_exception(TierError(f"sqlite write failed: {error}"))
            return
        for op, count in zip(batch, results, strict=True):
            if not op.done.done():
                op.done.set_result(count)

    async def _apply(self, conn: aiosqlite.Connection, run: Sequence[_Op]) -> list[int]:
        """Run consecutive operations of one kind; returns rows changed for each."""
        kind = run[0].kind
        if kind == "set":
            rows = [(op.key, op.entry.raw, op.entry.expires_at) for op in run if op.entry]
            await conn.executemany(_UPSERT, rows)
            return [1] * len(run)
        counts = []
        for op in run:
            if kind == "delete":
                cursor = await conn.execute("DELETE FROM entries WHERE key = ?", (op.key,))
                counts.append(max(0, cursor.rowcount))
            elif kind == "pattern":
                counts.append(await self._delete_matching(conn, op.key))
            else:
                cursor = await conn.execute(
                    "DELETE FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?",
                    (self._clock(),),
                )
                counts.append(max(0, cursor.rowcount))
        return counts

    async def _delete_matching(self, conn: aiosqlite.Connection, pattern: str) -> int:
        # The literal prefix bounds a range scan on the primary key, so the cost grows with
        # the keys under that prefix, not with the whole table.
        prefix = literal_prefix(pattern)
        upper = prefix_upper_bound(prefix)
        where, args = "redis_match(?, key)", [pattern]
        if prefix:
            where += " AND key >= ?"
            args.append(prefix)
        if upper is not None:
            where += " AND key < ?"
            args.append(upper)
        cursor = await conn.execute(f"DELETE FROM entries WHERE {where}", args)
        return max(0, cursor.rowcount)

    async def sweep(self) -> int:
        """Delete expired rows (through the write queue); returns how many."""
        swept = await self._submit(_Op("sweep", ""))
        await self.count()
        return swept

    async def count(self) -> int:
        """Count live entries afresh and publish the figure."""
        try:
            async with self._read().execute(
                f"SELECT count(*) FROM entries WHERE {_LIVE}", (self._clock(),)
            ) as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as error:
            raise TierError(f"sqlite read failed: {error}") from error
        total = int(row[0]) if row else 0
        self._entries.set(total)
        return total


def _runs(batch: Sequence[_Op]) -> list[list[_Op]]:
    """Split a batch into runs of consecutive operations of the same kind, keeping order."""
    runs: list[list[_Op]] = []
    for op in batch:
        if runs and runs[-1][0].kind == op.kind:
            runs[-1].append(op)
        else:
            runs.append([op])
    return runs
