"""The durable tier: one SQLite file per host, what survives restarts and Redis outages.

Writes are group-committed: every write and delete that arrives while a transaction is being
committed waits for the next one, so concurrent writers share one commit instead of queueing
for one each. A write is acknowledged only after its transaction committed. Reads use their
own connection, so they never wait behind a commit (WAL lets them run side by side).

Lookups of single keys are batched the same way: those that arrive while a batch is being read
are answered together by the next one, one thread hand-off for all of them. Keys found absent
are remembered, so a key asked for again costs no hand-off at all: only this process writes its
file, and only `set` adds rows, so "not in the file" stays true until a set of that key.

The same file holds the journal of changes made while Redis was unusable (written in the
transaction of the change itself, so it survives a crash) and a little metadata: this
instance's identity and its position in the invalidation feed.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import itertools
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import aiosqlite
import structlog

from service.glob import compile_pattern, literal_prefix, prefix_upper_bound
from service.metrics import Metrics
from service.tiers.base import Entry, TierError
from service.unreplayed import Unreplayed

log = structlog.get_logger("tiercache.sqlite")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL,
    version INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_expires_at ON entries (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('set', 'delete', 'pattern')),
    key TEXT NOT NULL,
    value BLOB,
    expires_at REAL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""

_UPSERT = (
    "INSERT INTO entries (key, value, expires_at, version) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
    "expires_at = excluded.expires_at, version = excluded.version"
)
_JOURNAL = "INSERT INTO journal (op, key, value, expires_at, version) VALUES (?, ?, ?, ?, ?)"
_LIVE = "(expires_at IS NULL OR expires_at > ?)"

#: The most keys one batched lookup asks for: well under SQLite's limit on bound parameters
#: (999 before 3.32), and more than a batch holds unless the reader fell far behind.
LOOKUP_BATCH_MAX_KEYS = 500

#: Memory for remembering keys absent from the file: an eighth of the memory tier's default
#: budget, tens of thousands of typical keys (a few thousand of the longest allowed).
ABSENT_KEYS_MAX_BYTES = 8 * 1024 * 1024
#: What remembering one key costs besides its text: the key object and its ordered-dict slot.
_ABSENT_KEY_OVERHEAD_BYTES = 144

OpKind = Literal["set", "delete", "pattern", "sweep", "forget", "meta", "keep_only_journaled"]


@dataclass(frozen=True, slots=True)
class JournalRow:
    """A change made while Redis was unusable, waiting to be replayed into it."""

    seq: int
    op: Literal["set", "delete", "pattern"]
    key: str
    entry: Entry | None
    version: int


def _new_future() -> asyncio.Future[int]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True)
class _Op:
    kind: OpKind
    key: str = ""
    entry: Entry | None = None
    #: For deletes: the version of the delete; with `below`, a conditional delete (only
    #: entries and journal rows older than `below` go).
    version: int = 0
    below: int | None = None
    #: For pattern deletes: delete at most this many entries.
    limit: int | None = None
    journal: bool = False
    #: False for a journal row alone, whose change was committed by an earlier transaction.
    apply: bool = True
    text: str = ""
    done: asyncio.Future[int] = field(default_factory=_new_future)

    @property
    def change_version(self) -> int:
        """The version of the change: its entry's for a set, its own for a delete."""
        return self.entry.version if self.entry else self.version


def _match_function(pattern: str, key: str) -> bool:
    return compile_pattern(pattern)(key)


@functools.cache
def _lookup_sql(keys: int) -> str:
    """The batched lookup of this many keys; expiry is checked on the rows, to tell an expired
    row (which a clock stepped back could revive) from a key with no row at all."""
    marks = ",".join("?" * keys)
    return f"SELECT key, value, expires_at, version FROM entries WHERE key IN ({marks})"


class _AbsentKeys:
    """Keys known to have no row in the file, within a memory budget (least recently asked
    for go first).

    An OrderedDict rather than cachetools' LRUCache: measured, half the memory per key and a
    third of the time per hit, which is the whole point of remembering misses.
    """

    __slots__ = ("_budget", "_keys", "_used")

    def __init__(self, max_bytes: int) -> None:
        self._budget = max_bytes
        #: key -> the bytes it accounts for
        self._keys: OrderedDict[str, int] = OrderedDict()
        self._used = 0

    def hit(self, key: str) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    def add(self, key: str) -> None:
        if key in self._keys:
            return
        cost = len(key) + _ABSENT_KEY_OVERHEAD_BYTES
        self._keys[key] = cost
        self._used += cost
        while self._used > self._budget:
            self._used -= self._keys.popitem(last=False)[1]

    def discard(self, key: str) -> None:
        self._used -= self._keys.pop(key, 0)

    def clear(self) -> None:
        self._keys.clear()
        self._used = 0

    def __len__(self) -> int:
        return len(self._keys)


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
        absent_keys_max_bytes: int = ABSENT_KEYS_MAX_BYTES,
    ) -> None:
        self._metrics = metrics
        self._path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout_seconds * 1000)
        self._clock = clock
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: list[_Op] = []
        self._journal_delta = 0
        self._flusher: asyncio.Task[None] | None = None
        self._entries = metrics.tier_entries.labels(self.name)
        self.journal_pending = 0
        #: Journal rows committed while a recovery runs (see service/unreplayed.py).
        self.unreplayed = Unreplayed()
        #: Lookups waiting for the next batch: key -> the futures of everyone asking for it.
        self._lookups: dict[str, list[asyncio.Future[Entry | None]]] = {}
        self._looker: asyncio.Task[None] | None = None
        self._absent = _AbsentKeys(absent_keys_max_bytes)
        #: Keys with a set submitted and not yet committed (or failed): how many such sets.
        self._unsettled: dict[str, int] = {}
        #: While a lookup batch is being read: keys whose set was submitted or settled since
        #: it started. Its misses of these keys may predate the set, so are not remembered.
        self._touched: set[str] | None = None
        self._lock_file: TextIO | None = None

    async def open(self) -> None:
        """Open (or create) the file; TierError, saying why, when it cannot be used."""
        # The file may hold rows from an earlier run: nothing is known absent yet.
        self._absent.clear()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._claim_file()
            self._writer = await self._connect()
            await self._writer.executescript(SCHEMA)
            self._reader = await self._connect()
            async with self._reader.execute("SELECT count(*) FROM journal") as cursor:
                row = await cursor.fetchone()
        except (OSError, sqlite3.Error) as error:
            await self.close()
            reason = str(error)
            if isinstance(error, FileExistsError | NotADirectoryError):
                reason = f"{error.filename} is not a directory"
            raise TierError(f"cannot open the SQLite file {self._path}: {reason}") from error
        self._set_journal_pending(int(row[0]) if row else 0)
        await self.sweep()

    def _claim_file(self) -> None:
        """Hold an exclusive lock beside the file for as long as it is open.

        One process per file: the file holds the instance's identity in the feed, its journal,
        and what the absent-key memory relies on (no other writer). A second process on the
        same file would share an identity and ignore the other's changes, so it is refused.
        """
        lock = open(self._path.with_name(self._path.name + ".lock"), "a")  # noqa: SIM115  # held until close()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise TierError(
                f"the SQLite file {self._path} is in use by another process: give each "
                "instance (and each worker) a CACHE_DB_PATH of its own"
            ) from None
        self._lock_file = lock

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
        if self._looker is not None:
            await asyncio.shield(self._looker)
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    # Reads

    async def get(self, key: str) -> Entry | None:
        if self._absent.hit(key):
            return None
        return await self._lookup(key)

    async def contains(self, key: str) -> bool:
        if self._absent.hit(key):
            return False
        return await self._lookup(key) is not None

    def _lookup(self, key: str) -> asyncio.Future[Entry | None]:
        """Queue a lookup for the next batch; the future is dropped, not failed, if its
        caller is cancelled."""
        if self._reader is None:
            raise TierError("sqlite tier is closed")
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        waiting = self._lookups.get(key)
        if waiting is None:
            self._lookups[key] = [future]
        else:
            waiting.append(future)
        if self._looker is None:
            # Started on the next turn of the loop: lookups queued in this one join its batch.
            self._looker = asyncio.create_task(self._lookup_loop())
        return future

    async def _lookup_loop(self) -> None:
        try:
            while self._lookups:
                if len(self._lookups) <= LOOKUP_BATCH_MAX_KEYS:
                    batch, self._lookups = self._lookups, {}
                else:
                    keys = list(itertools.islice(self._lookups, LOOKUP_BATCH_MAX_KEYS))
                    batch = {key: self._lookups.pop(key) for key in keys}
                await self._look_up(batch)
        finally:
            self._looker = None

    async def _look_up(self, batch: dict[str, list[asyncio.Future[Entry | None]]]) -> None:
        """Answer every future in the batch from one query."""
        keys = list(batch)
        now = self._clock()
        touched: set[str] = set()
        self._touched = touched
        try:
            rows = await self._read().execute_fetchall(_lookup_sql(len(keys)), keys)
        except (Exception, asyncio.CancelledError) as error:
            # Anything (even a closed connection's ValueError) reaches every waiter as a
            # TierError: a waiter left without an answer would wait forever.
            for waiting in batch.values():
                for future in waiting:
                    if not future.done():
                        future.set_exception(TierError(f"sqlite read failed: {error}"))
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        finally:
            self._touched = None
        found = {
            key: Entry(bytes(value), expires_at, version)
            if expires_at is None or expires_at > now
            else None
            for key, value, expires_at, version in rows
        }
        for key, waiting in batch.items():
            entry = found.get(key)
            if (
                entry is None
                and key not in found
                and key not in touched
                and key not in self._unsettled
            ):
                self._absent.add(key)
            for future in waiting:
                if not future.done():
                    future.set_result(entry)

    async def ready(self) -> bool:
        """Whether the file answers a trivial query."""
        try:
            async with self._read().execute("SELECT 1") as cursor:
                return await cursor.fetchone() is not None
        except (sqlite3.Error, TierError):
            return False

    async def journal_batch(self, limit: int = 500) -> list[JournalRow]:
        """The oldest pending journal rows, in the order they were made."""
        rows = await self._select(
            "SELECT seq, op, key, value, expires_at, version FROM journal ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [
            JournalRow(seq, op, key,
                       None if value is None else Entry(bytes(value), expires_at, version),
                       version)
            for seq, op, key, value, expires_at, version in rows
        ]  # fmt: skip

    async def journal_high_water(self) -> int:
        """The seq of the newest journal row (0 when empty)."""
        rows = await self._select("SELECT coalesce(max(seq), 0) FROM journal", ())
        return int(rows[0][0])

    async def journaled_keys(self) -> set[str]:
        """Keys whose latest local write is still waiting in the journal."""
        rows = await self._select("SELECT DISTINCT key FROM journal WHERE op = 'set'", ())
        return {str(row[0]) for row in rows}

    async def get_meta(self, name: str) -> str | None:
        rows = await self._select("SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def live_entries(self, after: str, limit: int) -> list[tuple[str, Entry]]:
        """Live entries in key order after `after`, for walking the whole tier in pages."""
        rows = await self._select(
            "SELECT key, value, expires_at, version FROM entries "
            f"WHERE key > ? AND {_LIVE} ORDER BY key LIMIT ?",
            (after, self._clock(), limit),
        )
        return [(key, Entry(bytes(value), exp, ver)) for key, value, exp, ver in rows]

    async def _select(self, sql: str, args: tuple[object, ...]) -> list[Any]:
        try:
            async with self._read().execute(sql, args) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as error:
            raise TierError(f"sqlite read failed: {error}") from error

    def _read(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise TierError("sqlite tier is closed")
        return self._reader

    # Writes: queued, then committed together

    async def set(self, key: str, entry: Entry, *, journal: bool = False) -> None:
        await self._submit(_Op("set", key, entry, journal=journal))

    async def delete(
        self, key: str, version: int = 0, *, journal: bool = False, below: int | None = None
    ) -> int:
        """Delete a key; `journal` records it for replay; `below` deletes only older data."""
        return await self._submit(_Op("delete", key, version=version, journal=journal, below=below))

    async def delete_pattern(
        self,
        pattern: str,
        version: int = 0,
        *,
        journal: bool = False,
        below: int | None = None,
        limit: int | None = None,
    ) -> int:
        return await self._submit(
            _Op("pattern", pattern, version=version, journal=journal, below=below, limit=limit)
        )

    async def journal(
        self, op: Literal["set", "delete", "pattern"], key: str, entry: Entry | None, version: int
    ) -> None:
        """Record a change for replay into Redis on its own (its data change committed already)."""
        kind: OpKind = op
        await self._submit(_Op(kind, key, entry, version=version, journal=True, apply=False))

    async def forget_journal(self, up_to_seq: int) -> None:
        """Drop journal rows up to and including `up_to_seq` (they were replayed)."""
        await self._submit(_Op("forget", version=up_to_seq))

    async def set_meta(self, name: str, value: str) -> None:
        await self._submit(_Op("meta", name, text=value))

    async def keep_only_journaled(self) -> int:
        """Drop every entry except those a pending journal row wrote; returns how many went."""
        return await self._submit(_Op("keep_only_journaled"))

    async def _submit(self, op: _Op) -> int:
        if self._writer is None:
            raise TierError("sqlite tier is closed")
        if op.kind == "set" and op.apply:
            # The only way a row enters the file: the key is no longer known absent.
            self._absent.discard(op.key)
            self._unsettled[op.key] = self._unsettled.get(op.key, 0) + 1
            if self._touched is not None:
                self._touched.add(op.key)
        self._pending.append(op)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())
        # Shielded: a client that disconnects must not cancel a commit others wait on.
        return await asyncio.shield(op.done)

    async def _flush_loop(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._commit(batch)
                finally:
                    self._settle(batch)
        finally:
            self._flusher = None

    def _settle(self, batch: Sequence[_Op]) -> None:
        """The sets of a finished transaction no longer keep their keys from being recorded
        as absent, except from a lookup that was being read meanwhile (it may have missed
        the commit)."""
        for op in batch:
            if op.kind == "set" and op.apply:
                left = self._unsettled[op.key] - 1
                if left:
                    self._unsettled[op.key] = left
                else:
                    del self._unsettled[op.key]
                if self._touched is not None:
                    self._touched.add(op.key)

    async def _commit(self, batch: Sequence[_Op]) -> None:
        assert self._writer is not None
        conn = self._writer
        results: list[int] = []
        self._journal_delta = 0
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
        self._set_journal_pending(self.journal_pending + self._journal_delta)
        if self.unreplayed.tracking:
            for op in batch:
                if op.journal:
                    self.unreplayed.note(op.kind, op.key, op.change_version)
        for op, count in zip(batch, results, strict=True):
            if not op.done.done():
                op.done.set_result(count)

    def _set_journal_pending(self, rows: int) -> None:
        self.journal_pending = rows
        self._metrics.journal_pending.set(rows)

    async def _apply(self, conn: aiosqlite.Connection, run: Sequence[_Op]) -> list[int]:
        """Run consecutive operations of one kind; returns a count for each."""
        kind = run[0].kind
        if kind == "set":
            rows = [(op.key, op.entry.raw, op.entry.expires_at, op.entry.version)
                    for op in run if op.entry and op.apply]  # fmt: skip
            if rows:
                await conn.executemany(_UPSERT, rows)
            await self._write_journal(conn, run)
            return [1] * len(run)
        return [await self._apply_one(conn, op) for op in run]

    async def _apply_one(self, conn: aiosqlite.Connection, op: _Op) -> int:
        if not op.apply:
            await self._write_journal(conn, [op])
            return 0
        if op.kind == "delete":
            count = await self._delete_key(conn, op.key, op.below)
        elif op.kind == "pattern":
            count = await self._delete_matching(conn, op.key, op.below, op.limit)
        elif op.kind == "sweep":
            cursor = await conn.execute(
                "DELETE FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (self._clock(),),
            )
            count = max(0, cursor.rowcount)
        elif op.kind == "forget":
            cursor = await conn.execute("DELETE FROM journal WHERE seq <= ?", (op.version,))
            self._journal_delta -= max(0, cursor.rowcount)
            count = max(0, cursor.rowcount)
        elif op.kind == "meta":
            await conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (op.key, op.text),
            )
            count = 1
        else:
            cursor = await conn.execute(
                "DELETE FROM entries WHERE key NOT IN (SELECT key FROM journal WHERE op = 'set')"
            )
            count = max(0, cursor.rowcount)
        await self._write_journal(conn, [op])
        return count

    async def _write_journal(self, conn: aiosqlite.Connection, ops: Sequence[_Op]) -> None:
        rows = [
            (op.kind, op.key, op.entry.raw if op.entry else None,
             op.entry.expires_at if op.entry else None,
             op.change_version)
            for op in ops
            if op.journal
        ]  # fmt: skip
        if rows:
            await conn.executemany(_JOURNAL, rows)
            self._journal_delta += len(rows)

    async def _delete_key(self, conn: aiosqlite.Connection, key: str, below: int | None) -> int:
        if below is None:
            cursor = await conn.execute("DELETE FROM entries WHERE key = ?", (key,))
            return max(0, cursor.rowcount)
        cursor = await conn.execute(
            "DELETE FROM entries WHERE key = ? AND version < ?", (key, below)
        )
        count = max(0, cursor.rowcount)
        # Journal rows this newer change supersedes must not be replayed over it.
        dropped = await conn.execute(
            "DELETE FROM journal WHERE op != 'pattern' AND key = ? AND version < ?", (key, below)
        )
        self._journal_delta -= max(0, dropped.rowcount)
        return count

    async def _delete_matching(
        self, conn: aiosqlite.Connection, pattern: str, below: int | None, limit: int | None
    ) -> int:
        # The literal prefix bounds a range scan on the primary key, so the cost grows with
        # the keys under that prefix, not with the whole table.
        prefix = literal_prefix(pattern)
        upper = prefix_upper_bound(prefix)
        where = "redis_match(?, key)"
        args: list[object] = [pattern]
        if prefix:
            where += " AND key >= ?"
            args.append(prefix)
        if upper is not None:
            where += " AND key < ?"
            args.append(upper)
        if below is not None:
            where += " AND version < ?"
            args.append(below)
        if limit is None:
            cursor = await conn.execute(f"DELETE FROM entries WHERE {where}", args)
        else:
            cursor = await conn.execute(
                f"DELETE FROM entries WHERE key IN (SELECT key FROM entries WHERE {where} LIMIT ?)",
                [*args, limit],
            )
        count = max(0, cursor.rowcount)
        if below is not None:
            dropped = await conn.execute(
                f"DELETE FROM journal WHERE op != 'pattern' AND {where}", args
            )
            self._journal_delta -= max(0, dropped.rowcount)
        return count

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
