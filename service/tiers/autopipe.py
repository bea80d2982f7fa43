"""Auto-pipelining: the Redis commands of concurrent requests share one round trip.

Commands queued during one turn of the event loop are sent together as one non-transactional
pipeline on one connection, as ioredis and Lettuce do. Most of redis-py's cost is per call,
not per command, so a batch of N requests costs little more than one. On one server (not
Cluster) commands are packed by hiredis, as redis-py's synchronous client does (its asyncio
connection packs in Python, which was the largest single cost of a batch), and the pipeline
keeps a few connections between batches instead of a pool checkout and release per batch.

The pipeline runs in a task of its own, never in the request's: a client that disconnects
cancels only its wait for the reply, so no connection is ever abandoned mid-reply and no
request can be handed a reply meant for another. Every batch has a deadline; a batch that
fails or runs out of time closes its connection, so no late reply can reach a later batch.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from service.tiers.base import TierError
from service.tiers.roundtrip import RoundTripFloor

#: Connections the auto-pipeline keeps between batches: enough for the batches that overlap
#: under load (a batch is in flight for about one Redis round trip).
IDLE_MAX = 4
#: A batch waits for the one in flight only when Redis is this close (its fastest recent round
#: trip): then the wait is short and saves the CPU of a round trip. Same host: 30-100 us.
HOLD_BELOW_ROUND_TRIP_SECONDS = 0.000_25

Command = tuple[Any, ...]
_Waiter = tuple[Sequence[Command], "asyncio.Future[list[Any]]"]


class AutoPipeline:
    """Queues commands from concurrent callers and flushes them once per loop iteration.

    When Redis is near (HOLD_BELOW_ROUND_TRIP_SECONDS), a batch is not sent while another is
    in flight: callers queue until its replies are in, then go together. Under load that
    doubles the requests per round trip (8 to 16 on the benchmark's 32 connections), and the
    CPU saved shortens waits more than the holding lengthens them. A far Redis gets a batch
    per loop iteration whatever is in flight, since holding would add a round trip of latency
    (bench/latency.py, 2.3 ms round trips at 1,000 req/s: p50 3.0 ms without, 4.7 ms with).
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        timeout_seconds: float,
        round_trips: RoundTripFloor | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout_seconds
        self._queue: list[_Waiter] = []
        #: When the oldest queued caller asked: its batch's deadline counts from then.
        self._queued_since = 0.0
        self._flush_scheduled = False
        self._closed = False
        self.round_trips = round_trips or RoundTripFloor()
        self._in_flight: set[asyncio.Task[None]] = set()
        #: Connections kept between batches rather than returned to the pool. At most half
        #: the pool, so the health monitor and pattern deletes always find one there.
        self._idle: list[AbstractConnection] = []
        self._idle_max = (
            0
            if isinstance(client, RedisCluster)
            else min(IDLE_MAX, client.connection_pool.max_connections // 2)
        )

    async def execute(self, *commands: Command) -> list[Any]:
        """Send the commands (in order, adjacent in one pipeline) and return their replies.

        A reply that is a Redis error is returned in place as an exception instance.
        Raises TierError when the connection fails or the deadline passes, and DataError,
        for this caller alone, when an argument cannot be encoded (a bug, not an outage).
        """
        if self._closed:
            raise TierError("redis tier is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._queue:
            self._queued_since = loop.time()
        self._queue.append((commands, future))
        if not self._flush_scheduled and not (self._in_flight and self._holding()):
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _holding(self) -> bool:
        # Never on Cluster: its batches go through redis-py's pipeline, which is not timed, so
        # the floor stays infinite.
        return self.round_trips.seconds <= HOLD_BELOW_ROUND_TRIP_SECONDS

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queue:
            return  # close() sent it already
        batch, self._queue = self._queue, []
        deadline = self._queued_since + self._timeout
        task = asyncio.create_task(self._send(batch, deadline))
        self._in_flight.add(task)
        task.add_done_callback(functools.partial(self._sent, batch))

    def _sent(self, batch: list[_Waiter], task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if task.cancelled():
            # Possibly before its first step, so before _send could answer anyone.
            _fail(batch, "redis pipeline cancelled")
        if self._queue and not self._flush_scheduled:
            self._flush()  # the callers held back while it was in flight

    async def _send(self, batch: list[_Waiter], deadline: float) -> None:
        try:
            if asyncio.get_running_loop().time() >= deadline:
                # Held behind a batch that used up the time: sent now, its commands would
                # still run after their callers had been told they failed.
                raise TimeoutError("deadline passed before it could be sent")
            async with asyncio.timeout_at(deadline):
                if isinstance(self._client, RedisCluster):
                    replies = await self._send_to_cluster(batch)
                else:
                    batch, packed = _pack(batch)
                    replies = await self._send_on_one_connection(batch, packed) if batch else []
        except (Exception, asyncio.CancelledError) as error:
            _fail(batch, f"redis pipeline failed: {type(error).__name__}: {error}")
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        position = 0
        for commands, future in batch:
            answer = replies[position : position + len(commands)]
            position += len(commands)
            if not future.done():
                future.set_result(answer)

    async def _send_to_cluster(self, batch: list[_Waiter]) -> list[Any]:
        """A cluster pipeline: redis-py groups the commands by the node owning their slot."""
        pipe = self._client.pipeline(transaction=False)
        for commands, _ in batch:
            for command in commands:
                pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def _send_on_one_connection(self, batch: list[_Waiter], packed: list[bytes]) -> list[Any]:
        """Write every command in one packet and read the replies in order: what a pipeline
        does, without building one per batch (a fifth of a cache hit's cost)."""
        assert isinstance(self._client, Redis)
        callbacks = self._client.response_callbacks
        connection = await self._checkout()
        every_reply_read = False
        try:
            started = time.perf_counter()
            await connection.send_packed_command(packed)
            replies: list[Any] = []
            for commands, _ in batch:
                for command in commands:
                    # What Redis.parse_response does for these commands, one layer less.
                    try:
                        reply = await connection.read_response()
                    except ResponseError as error:
                        replies.append(error)
                        continue
                    callback = callbacks.get(command[0])
                    replies.append(reply if callback is None else callback(reply))
            every_reply_read = True
        finally:
            # Otherwise replies may still be on their way: the connection is never reused.
            await self._put_back(connection, reusable=every_reply_read)
        self.round_trips.add(time.perf_counter() - started)
        return replies

    async def _checkout(self) -> AbstractConnection:
        """A connection ready for a batch: one this pipeline kept, or one from the pool.

        A kept connection gets the check the pool makes on checkout (closed by the server
        while idle, or holding stray bytes: then replaced), without the pool's condition,
        lock, timeout, event dispatch and observability hooks: those were a quarter of the
        instructions of a one-request batch (bench/FINDINGS.md, section 7).
        """
        while self._idle:
            connection = self._idle.pop()
            try:
                stale = not connection.is_connected or await connection.can_read()
            except RedisConnectionError:
                stale = True
            if not stale:
                return connection
            await self._put_back(connection, reusable=False)
        assert isinstance(self._client, Redis)
        pool = self._client.connection_pool
        fresh: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]  # unannotated upstream
        return fresh

    async def _put_back(self, connection: AbstractConnection, *, reusable: bool) -> None:
        """Keep the connection for the next batch, or close it unless reusable and give it
        back to the pool. Neither step can be cut short by a deadline or a cancellation:
        a connection that never got back would leave the pool one short for good."""
        if reusable and len(self._idle) < self._idle_max:
            self._idle.append(connection)
            return
        if not reusable:
            await connection.disconnect(nowait=True)  # closes without waiting: nothing to cut
        assert isinstance(self._client, Redis)
        await asyncio.shield(self._client.connection_pool.release(connection))

    async def close(self) -> None:
        """Send what was asked before, wait for every batch, so shutdown does not cut replies
        in half, then hand the kept connections back to the pool. Later calls get TierError."""
        self._closed = True
        self._flush()
        while self._in_flight:  # a batch finishing may send the one it held back
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        while self._idle:
            await self._put_back(self._idle.pop(), reusable=False)


def _fail(batch: list[_Waiter], reason: str) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(TierError(reason))


def _pack(batch: list[_Waiter]) -> tuple[list[_Waiter], list[bytes]]:
    """The callers whose commands could be encoded, and those commands in RESP.

    hiredis takes str, bytes, int and float arguments, which is all the service sends. It is
    called directly rather than through redis-py's HiredisRespSerializer, whose conversions
    for other types cost 1-3% more instructions per request (bench/instructions.py). A caller
    with any other argument, or a string that is not valid Unicode, gets a DataError of its
    own; the rest are sent.
    """
    sendable: list[_Waiter] = []
    packed: list[bytes] = []
    for commands, future in batch:
        try:
            pieces = [_pack_command(command) for command in commands]
        except (TypeError, UnicodeError) as error:
            if not future.done():
                future.set_exception(DataError(f"cannot encode {commands[0][0]}: {error}"))
            continue
        sendable.append((commands, future))
        packed += pieces
    return sendable, packed


def _pack_command(command: Command) -> bytes:
    if " " in command[0]:
        # "XINFO STREAM": redis-py sends such a name as two arguments; hiredis leaves it to us.
        command = (*command[0].split(), *command[1:])
    packed: bytes = hiredis.pack_command(command)
    return packed
