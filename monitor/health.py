"""The Redis health monitor: pings on an interval, reconnects with backoff, flips the mode.

While Redis is healthy it pings every `interval` (or at once when a request reports a Redis
failure). While degraded it is the only thing in the process that talks to Redis: one attempt
at a time, spaced by redis-py's EqualJitterBackoff, so a dead Redis sees no reconnect storm
whatever the request load.

Flapping is damped: the backoff's failure count is only forgotten once Redis has stayed up
for `stable_seconds`. A Redis that keeps dropping right after recovering is therefore retried
at ever longer intervals (up to the cap) instead of flipping the mode every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from redis.asyncio import RedisCluster
from redis.backoff import AbstractBackoff
from redis.exceptions import RedisError

from service.metrics import Metrics
from service.mode import Mode
from service.tiers.redis import RedisClient

log = structlog.get_logger("tiercache.monitor")

#: More doublings than this cannot change a capped backoff; keeps 2**failures small.
MAX_COUNTED_FAILURES = 32

RecoveryHook = Callable[[], Awaitable[None]]


class HealthMonitor:
    """One background loop per process deciding whether the cascade may use Redis."""

    def __init__(
        self,
        client: RedisClient,
        mode: Mode,
        metrics: Metrics,
        *,
        interval_seconds: float,
        timeout_seconds: float,
        backoff: AbstractBackoff,
        stable_seconds: float,
        before_recover: Sequence[RecoveryHook] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._mode = mode
        self._metrics = metrics
        self._interval = interval_seconds
        self._timeout = timeout_seconds
        self._backoff = backoff
        self._stable = stable_seconds
        self._before_recover = list(before_recover)
        self._clock = clock
        self._sleep = sleep
        self._failures = 0
        self._up_since: float | None = None
        self._last_error = ""
        self.run_id: str | None = None
        self.attempts_in_flight = 0

    def add_recovery_hook(self, hook: RecoveryHook) -> None:
        """Run `hook` after Redis answers and before the mode flips back to full."""
        self._before_recover.append(hook)

    async def check(self) -> bool:
        """One health check: INFO server (a ping that also tells which server answered)."""
        self.attempts_in_flight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                run_id = await self._server_id()
        except Exception as error:  # whatever it is, Redis did not answer as it should
            self._last_error = f"{type(error).__name__}: {error}".rstrip(": ")
            self._metrics.redis_up.set(0)
            if not isinstance(error, RedisError | OSError | TimeoutError):
                log.error("unexpected error checking redis", error=self._last_error)
            return False
        finally:
            self.attempts_in_flight -= 1
        self._metrics.redis_up.set(1)
        self._metrics.ping_duration.observe(time.perf_counter() - started)
        self._notice_server(run_id)
        return True

    async def _server_id(self) -> str:
        """Which server answers: its run_id; for a Cluster, the run_ids of all its primaries
        (a failover changes one of them)."""
        if isinstance(self._client, RedisCluster):
            per_node = await self._client.info("server", target_nodes=RedisCluster.PRIMARIES)
            return ",".join(sorted(str(info.get("run_id", "")) for info in per_node.values()))
        info = await self._client.info("server")
        return str(info.get("run_id", ""))

    def _notice_server(self, run_id: str) -> None:
        if self.run_id is not None and run_id != self.run_id:
            self._metrics.redis_restarts.inc()
            self._mode.redis_epoch += 1
            log.warning(
                "Redis server changed (restart or failover)",
                previous_run_id=self.run_id,
                run_id=run_id,
            )
        self.run_id = run_id

    async def start(self) -> None:
        """The first verdict, before the app serves: full if Redis answers now."""
        if await self.check():
            await self._recover("redis answered at start-up")
        else:
            self._mode.redis_failed(f"redis unreachable at start-up ({self._last_error})")

    async def run(self) -> None:
        """Loop until cancelled."""
        while True:
            self._mode.account_degraded_time()
            if self._mode.redis_usable:
                await self._wait_healthy_tick()
                if self._mode.failure.is_set():
                    continue  # a request already reported a failure: reconnect instead
                if not await self.check():
                    self._mode.redis_failed(f"ping failed ({self._last_error})")
                    self._up_since = None
                elif self._up_since is not None and self._clock() - self._up_since >= self._stable:
                    self._failures = 0
            else:
                self._up_since = None
                await self._pause(self._backoff.compute(min(self._failures, MAX_COUNTED_FAILURES)))
                self._failures += 1
                self._metrics.reconnect_attempts.inc()
                if await self.check():
                    await self._recover("reconnected")

    async def _recover(self, reason: str) -> None:
        try:
            for hook in self._before_recover:
                await hook()
        except Exception as error:  # a hook's failure keeps us degraded; we retry later
            log.error("recovery step failed, staying degraded", error=str(error))
            return
        self._up_since = self._clock()
        self._mode.redis_recovered(reason)

    async def _wait_healthy_tick(self) -> None:
        """Sleep one interval, or less if a request reports a Redis failure meanwhile."""
        if self._sleep is not None:
            await self._sleep(self._interval)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._interval):
                await self._mode.failure.wait()

    async def _pause(self, seconds: float) -> None:
        await (self._sleep or asyncio.sleep)(seconds)
