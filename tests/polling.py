"""Waiting for a condition with a deadline, measured rather than guessed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

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


class _Http(Protocol):
    def get(self, path: str) -> Any: ...


async def mode_of(http: _Http) -> str:
    """The cascade mode a service reports on /health (any aiohttp client or test client)."""
    body = await (await http.get("/health")).json()
    return str(body["mode"])


async def wait_for_mode(http: _Http, mode: str, within: float = 10.0) -> None:
    """Wait until the service reports `mode`; fail with how long was waited."""
    seen = await poll(lambda: mode_of(http), lambda m: m == mode, within=within)
    assert seen == mode, f"still {seen!r}, not {mode!r}, after {within}s"
