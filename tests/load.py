"""A steady write-and-read load through the API, for fault tests that count failed requests."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

API = "/api/performance/cache"


class SteadyLoad:
    """Workers that each write a key and read it back, in a loop, until the block ends.

    Every answer that is not a 200 is recorded in `failures`.
    """

    def __init__(self, client: Any, workers: int = 4, keys_per_worker: int = 10) -> None:
        self.client = client
        self.workers = workers
        self.keys_per_worker = keys_per_worker
        self.failures: list[str] = []
        self.served = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> SteadyLoad:
        self._tasks = [asyncio.create_task(self._work(w)) for w in range(self.workers)]
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _work(self, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            key = f"load-{worker}-{i % self.keys_per_worker}"
            for response in (
                await self.client.post(API, json={"key": key, "value": i}),
                await self.client.get(f"{API}/{key}"),
            ):
                self.served += 1
                if response.status != 200:
                    self.failures.append(
                        f"{response.method} {response.url.path}: {response.status}"
                    )
            i += 1
            await asyncio.sleep(0.005)
