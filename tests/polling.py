"""Waiting for a condition with a deadline, measured rather than guessed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def poll(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    within: float = 3.0,
    every: float = 0.02,
) -> T:
    """Call `probe` until `done(result)` holds or `within` seconds pass; the last result."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if done(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(every)
