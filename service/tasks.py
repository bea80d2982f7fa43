"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger("tiercache.tasks")

#: How long to wait for a cancelled task before cancelling it again.
RECANCEL_SECONDS = 1.0


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait until it has ended.

    Cancels again while it runs on: on Python 3.11, redis-py's use of `asyncio.wait_for` can
    swallow a cancellation that lands just as a socket write completes, and the task would
    then loop on forever, holding the app's shutdown with it.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_SECONDS)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task had failed", task=task.get_name(), error=repr(task.exception()))
