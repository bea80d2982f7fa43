"""Coherence between instances that share one Redis: invalidation feed, catch-up, journal.

Every write and delete an instance makes is announced on a capped Redis Stream (the feed, see
service/tiers/redis.py). Each instance follows the feed and drops what other instances changed
from its own memory and SQLite tiers, so a Redis miss never falls through to a copy another
instance has since deleted or overwritten. Each instance saves its position in the feed in its
SQLite file and, after a disconnect or a restart, catches up from there before it uses Redis
again. The rules, with their windows, are stated in README ("Coherence").

While Redis is unusable, changes are journaled in SQLite. When Redis is back the journal is
replayed (newest version wins, atomically in Redis) before the mode flips to full.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Coroutine
from typing import Any

import structlog
from redis.exceptions import RedisError

from service.cascade import Cascade
from service.glob import compile_pattern
from service.metrics import Metrics
from service.tasks import stop_task
from service.tiers.base import TierError
from service.tiers.redis import RedisClient
from service.tiers.sqlite import JournalRow
from service.versions import VersionClock

log = structlog.get_logger("tiercache.coherence")

#: Events read per XREAD / XRANGE call, and journal rows or entries replayed per step.
BATCH = 500
#: How long one XREAD waits for news before checking on the mode again.
FEED_BLOCK_MILLISECONDS = 1000
#: Pause after a failed feed read; the monitor decides the mode meanwhile.
FEED_RETRY_SECONDS = 0.2
#: Pause after a read that brought events, so a busy feed is read in batches: a read costs
#: far more than the events in it (a tenth of a write's CPU when read per event), and this
#: adds at most this much to the 1 s propagation window. An idle feed is read at once.
FEED_LINGER_SECONDS = 0.05
START = "0-0"
#: How often, at most, the feed position is written to SQLite while following the feed.
POSITION_SAVE_SECONDS = 1.0

_META_ORIGIN = "instance_id"
_META_EPOCH = "feed_epoch"
_META_POSITION = "feed_position"


def _independent_runs(rows: list[JournalRow]) -> list[list[JournalRow]]:
    """Split journal rows, in order, into runs that touch distinct keys and no pattern."""
    runs: list[list[JournalRow]] = []
    current: list[JournalRow] = []
    keys: set[str] = set()
    for row in rows:
        if row.op == "pattern" or row.key in keys:
            if current:
                runs.append(current)
            current, keys = [], set()
        if row.op == "pattern":
            runs.append([row])
            continue
        current.append(row)
        keys.add(row.key)
    if current:
        runs.append(current)
    return runs


def _id(event_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = event_id.partition("-")
    return int(milliseconds), int(sequence or 0)


class Coherence:
    """Follows the feed for this instance, catches it up after outages, replays the journal."""

    def __init__(
        self,
        cascade: Cascade,
        versions: VersionClock,
        metrics: Metrics,
        feed_client: RedisClient,
    ) -> None:
        self._cascade = cascade
        self._redis = cascade.redis
        self._memory = cascade.memory
        self._database = cascade.database
        mode = cascade.mode
        self._mode = mode
        self._versions = versions
        self._metrics = metrics
        self._feed_client = feed_client
        self._lock = asyncio.Lock()
        self._epoch: str | None = None
        self.position = START
        self._seen_redis_epoch = mode.redis_epoch
        self._background: set[asyncio.Task[None]] = set()
        self._position_saved_at = 0.0

    async def open(self) -> None:
        """Load this instance's identity and feed position from its SQLite file."""
        origin = await self._database.get_meta(_META_ORIGIN)
        if origin is None:
            origin = uuid.uuid4().hex
            await self._database.set_meta(_META_ORIGIN, origin)
        self._redis.origin = origin
        self._epoch = await self._database.get_meta(_META_EPOCH)
        self.position = await self._database.get_meta(_META_POSITION) or START

    async def close(self) -> None:
        for task in list(self._background):
            await stop_task(task)
        if self._epoch is not None:
            with contextlib.suppress(TierError):
                await self._save_position()
        await self._feed_client.aclose()

    # Reconnecting: the monitor runs this after Redis answers and before flipping to full.

    async def resync(self) -> None:
        """Catch up with what others changed meanwhile, then replay this instance's journal."""
        async with self._lock:
            self._seen_redis_epoch = self._mode.redis_epoch
            outcome = await self._catch_up()
            # Only what was journaled before now: writes keep arriving (and being journaled)
            # until the flip, and chasing them could keep the service degraded under load.
            # Those are noted from here on, so reads do not take Redis's older copies for them.
            self._database.unreplayed.start()
            try:
                await self._replay_journal(up_to=await self._database.journal_high_water())
                await self._save_position()
            except BaseException:
                self._database.unreplayed.stop()  # still degraded: Redis is not read
                raise
        self._metrics.resyncs.labels(outcome).inc()
        log.info("resynchronised with redis", outcome=outcome, position=self.position)
        # Rows journaled during the replay go right after the flip (compare-and-set makes
        # their order against newer writes irrelevant); after data loss, all local entries.
        self._start_background(self._drain_journal(), "journal-drain")
        if outcome == "redis_lost_data":
            self._start_background(self._write_back(), "redis-writeback")

    async def _catch_up(self) -> str:
        epoch = await self._redis.epoch(uuid.uuid4().hex)
        info = await self._redis.feed_info()
        first, last = (None, START) if info is None else info
        if self._epoch is None:
            # First contact: nothing here predates the feed we start following.
            self._epoch, self.position = epoch, last
            return "first_contact"
        if epoch != self._epoch or _id(self.position) > _id(last):
            # Redis restarted empty, was flushed, or failed over to a replica that lags us.
            # What this instance holds is served and written back; only the changes other
            # instances announced just before the loss can have been missed.
            self._epoch, self.position = epoch, last
            return "redis_lost_data"
        if self.position != last and (first is None or _id(first) > _id(self.position)):
            # The feed was trimmed past our position while Redis kept its data: anything
            # held here may have changed meanwhile. Keep only changes not yet in Redis.
            self._memory.keep_only(await self._database.journaled_keys())
            await self._database.keep_only_journaled()
            self.position = last
            return "feed_trimmed"
        while True:
            events = await self._redis.read_feed(self.position, BATCH)
            if not events:
                return "caught_up"
            await self._apply(events)

    async def _replay_journal(self, up_to: int | None) -> None:
        """Replay journal rows (up to seq `up_to`) into Redis, a batch at a time."""
        while self._database.journal_pending:
            rows = [
                row
                for row in await self._database.journal_batch(BATCH)
                if up_to is None or row.seq <= up_to
            ]
            if not rows:
                break
            for run in _independent_runs(rows):
                # Changes to different keys go concurrently, sharing round trips; a key seen
                # again, or a pattern, waits for what came before it in the journal.
                for result in await asyncio.gather(*(self._replay(row) for row in run)):
                    self._metrics.journal_replayed.labels(result).inc()
            await self._database.forget_journal(rows[-1].seq)

    async def _drain_journal(self) -> None:
        await self._mode.usable.wait()
        try:
            async with self._lock:
                await self._replay_journal(up_to=None)
            self._database.unreplayed.stop()
        except TierError as error:
            log.warning("journal drain interrupted; it resumes at the next recovery",
                        error=str(error))  # fmt: skip

    async def _replay(self, row: JournalRow) -> str:
        if row.op == "set":
            assert row.entry is not None
            if row.entry.expires_at is not None and row.entry.expires_at <= time.time():
                return "expired"
            if await self._redis.set(row.key, row.entry):
                return "applied"
            # Another instance wrote this key later: our copy is the older one.
            await self._cascade.drop_superseded(row.key, row.version)
            return "superseded"
        if row.op == "delete":
            await self._redis.delete(row.key, row.version)
        else:
            await self._redis.delete_pattern(row.key, row.version, conditional=True)
        return "applied"

    # Following the feed while full

    async def run(self) -> None:
        """Apply other instances' changes as they are announced, until cancelled."""
        while True:
            await self._mode.usable.wait()
            if self._mode.redis_epoch != self._seen_redis_epoch:
                # The monitor saw a different Redis (restart or failover) without an outage.
                with contextlib.suppress(TierError, RedisError, OSError):
                    await self.resync()
                continue
            try:
                reply: Any = await self._feed_client.xread(
                    {self._redis.feed: self.position},
                    count=BATCH,
                    block=FEED_BLOCK_MILLISECONDS,
                )
                events = [
                    (event_id.decode(), fields)
                    for _, stream_events in reply or []
                    for event_id, fields in stream_events
                ]
                if events:
                    async with self._lock:
                        await self._apply(events)
                        # The position is a resume hint: replaying a few events again after
                        # a crash is harmless, so it is saved at most once per interval.
                        if time.monotonic() - self._position_saved_at >= POSITION_SAVE_SECONDS:
                            await self._save_position()
                    await asyncio.sleep(FEED_LINGER_SECONDS)
            except (RedisError, OSError, TierError) as error:
                log.debug("feed read failed", error=str(error))
                await asyncio.sleep(FEED_RETRY_SECONDS)

    async def _apply(self, events: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """Drop local data that other instances' newer changes superseded."""
        work: list[Awaitable[object]] = []
        for event_id, fields in events:
            if _id(event_id) <= _id(self.position):
                continue
            self.position = event_id
            if fields.get(b"o", b"").decode() == self._redis.origin:
                continue
            kind = fields[b"k"].decode()
            target = fields[b"n"].decode()
            version = int(fields[b"v"])
            self._versions.observe(version)
            self._metrics.invalidations.labels(kind).inc()
            if kind == "pattern":
                self._memory.delete_pattern(target, below=version)
                work.append(self._database.delete_pattern(target, below=version))
                work.append(self._cascade.undo_promotions(compile_pattern(target), version))
            else:
                self._memory.invalidate(target, version)
                work.append(self._database.delete(target, below=version))
                if kind == "delete":
                    work.append(self._cascade.undo_promotions(target.__eq__, version))
        if events:
            self._metrics.feed_lag.set(max(0.0, time.time() - _id(events[-1][0])[0] / 1000))
        await asyncio.gather(*work)

    async def _save_position(self) -> None:
        assert self._epoch is not None
        self._position_saved_at = time.monotonic()
        await self._database.set_meta(_META_EPOCH, self._epoch)
        await self._database.set_meta(_META_POSITION, self.position)

    # After Redis lost its data: put back what this instance still holds

    def _start_background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_back(self) -> None:
        """Copy every live local entry into Redis; a newer version there always wins."""
        await self._mode.usable.wait()
        after, written = "", 0
        try:
            while self._mode.redis_usable:
                page = await self._database.live_entries(after, BATCH)
                if not page:
                    break
                results = await asyncio.gather(
                    *(self._redis.set(key, entry, announce=False) for key, entry in page)
                )
                written += sum(results)
                after = page[-1][0]
        except TierError as error:
            log.warning("write-back to redis interrupted", error=str(error), written=written)
            return
        log.info("wrote local entries back into redis", written=written)
