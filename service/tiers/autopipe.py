"""Auto-pipelining: the Redis commands of concurrent requests share one round trip.

Commands queued during one turn of the event loop are sent together as one non-transactional
pipeline on one pooled connection, as ioredis and Lettuce do. Most of redis-py's cost is per
call, not per command, so a batch of N requests costs little more than one.

The pipeline runs in a task of its own, never in the request's: a client that disconnects
cancels only its wait for the reply, so no connection is ever abandoned mid-reply and no
request can be handed a reply meant for another. Every batch has a deadline; on timeout
redis-py closes the connection it was reading from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster

from service.tiers.base import TierError

Command = tuple[Any, ...]
_Waiter = tuple[Sequence[Command], "asyncio.Future[list[Any]]"]


class AutoPipeline:
    """Queues commands from concurrent callers and flushes them once per loop iteration."""

    def __init__(self, client: Redis | RedisCluster, timeout_seconds: float) -> None:
        self._client = client
        self._timeout = timeout_seconds
        self._queue: list[_Waiter] = []
        self._flush_scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()

    async def execute(self, *commands: Command) -> list[Any]:
        """Send the commands (in order, adjacent in one pipeline) and return their replies.

        A reply that is a Redis error is returned in place as an exception instance.
        Raises TierError when the connection fails or the deadline passes.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((commands, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._queue = self._queue, []
        task = asyncio.create_task(self._send(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[_Waiter]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._client.pipeline(transaction=False)
                for commands, _ in batch:
                    for command in commands:
                        pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except (Exception, asyncio.CancelledError) as error:
            reason = f"redis pipeline failed: {type(error).__name__}: {error}"
            for _, future in batch:
                if not future.done():
                    future.set_exception(TierError(reason))
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        position = 0
        for commands, future in batch:
            answer = replies[position : position + len(commands)]
            position += len(commands)
            if not future.done():
                future.set_result(answer)

    async def close(self) -> None:
        """Wait for batches already sent, so shutdown does not cut replies in half."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
