"""The Redis health monitor as an aiohttp subsystem: `setup(app)` and `get_monitor(app)`.

Register it after the tiers it watches: cleanup contexts unwind in reverse order, so the
monitor stops before the Redis client it uses is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from redis.backoff import EqualJitterBackoff

from monitor.health import HealthMonitor, RecoveryHook
from service.keys import metrics_key, mode_key, settings_key
from service.tasks import stop_task
from service.tiers.redis import make_client

__all__ = ["HealthMonitor", "get_monitor", "setup"]

_monitor_key = web.AppKey("health_monitor", HealthMonitor)


def setup(app: web.Application, before_recover: tuple[RecoveryHook, ...] = ()) -> HealthMonitor:
    """Create the monitor and run its loop for the app's lifetime."""
    settings = app[settings_key]
    # Its own single connection: a request pool that is exhausted or full of dead sockets
    # must not make a healthy Redis look down, nor a ping wait behind requests.
    client = make_client(settings, settings.health_timeout_seconds, pool_size=1)
    monitor = HealthMonitor(
        client,
        app[mode_key],
        app[metrics_key],
        interval_seconds=settings.health_interval_seconds,
        timeout_seconds=settings.health_timeout_seconds + settings.redis_connect_timeout_seconds,
        backoff=EqualJitterBackoff(
            cap=settings.reconnect_backoff_cap_seconds,
            base=settings.reconnect_backoff_base_seconds,
        ),
        stable_seconds=settings.health_stable_seconds,
        before_recover=before_recover,
    )
    app[_monitor_key] = monitor

    async def run_monitor(app: web.Application) -> AsyncIterator[None]:
        await monitor.start()
        task = asyncio.create_task(monitor.run(), name="redis-health-monitor")
        yield
        await stop_task(task)
        await client.aclose()

    app.cleanup_ctx.append(run_monitor)
    return monitor


def get_monitor(app: web.Application) -> HealthMonitor:
    """The app's monitor; raises if `setup` was never called on it."""
    try:
        return app[_monitor_key]
    except KeyError:
        raise RuntimeError("monitor.setup(app) was not called for this app") from None
