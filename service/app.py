"""The app factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

import monitor
from service.cascade import Cascade
from service.coherence import FEED_BLOCK_MILLISECONDS, Coherence
from service.keys import (
    cascade_key,
    coherence_key,
    memory_key,
    metrics_key,
    mode_key,
    redis_key,
    settings_key,
    sqlite_key,
)
from service.metrics import Metrics
from service.mode import Mode
from service.routes import setup_routes
from service.security import auth_guard, rate_limit_guard
from service.settings import Settings
from service.tasks import stop_task
from service.tiers.memory import MemoryTier
from service.tiers.redis import RedisTier, make_client
from service.tiers.sqlite import SqliteTier
from service.versions import VersionClock

#: Room in a request body beyond the value itself (the key, the ttl, JSON punctuation and
#: escapes that decode shorter than they are written).
BODY_OVERHEAD_BYTES = 64 * 1024


def create_app(settings: Settings) -> web.Application:
    # No middleware: any costs every request; what every request needs wraps each handler.
    app = web.Application(
        client_max_size=2 * settings.cache_max_value_bytes + BODY_OVERHEAD_BYTES,
    )
    metrics = Metrics()
    mode = Mode(metrics)
    # The whole of a batch's Redis work, connecting included, must fit in the socket timeout.
    redis_timeout = settings.redis_socket_timeout_seconds
    redis = RedisTier(
        # No per-reply socket timeout: every batch of commands runs under redis_timeout.
        make_client(settings, None, settings.redis_pool_size),
        settings.cache_key_prefix,
        redis_timeout,
        feed_max_length=settings.feed_max_length,
    )
    memory = MemoryTier(metrics, settings.memory_max_entries, settings.memory_max_bytes)
    sqlite = SqliteTier(
        metrics,
        settings.cache_db_path,
        settings.sqlite_synchronous,
        settings.sqlite_busy_timeout_seconds,
    )

    app[settings_key] = settings
    app[metrics_key] = metrics
    app[mode_key] = mode
    app[redis_key] = redis
    app[memory_key] = memory
    app[sqlite_key] = sqlite
    versions = VersionClock()
    cascade = Cascade(
        redis, memory, sqlite, mode, metrics, versions,
        near_cache=settings.cache_read_mode == "near",
    )  # fmt: skip
    app[cascade_key] = cascade
    # A blocking XREAD waits up to FEED_BLOCK_MILLISECONDS: its socket must wait longer.
    feed_timeout = FEED_BLOCK_MILLISECONDS / 1000 + settings.redis_socket_timeout_seconds
    coherence = Coherence(
        cascade, versions, metrics, make_client(settings, feed_timeout, pool_size=1)
    )
    app[coherence_key] = coherence

    app.cleanup_ctx.append(sqlite_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(cascade_ctx)
    app.cleanup_ctx.append(coherence_ctx)
    guards = [auth_guard(settings), rate_limit_guard(settings)]
    setup_routes(app, [g for g in guards if g is not None])
    # Last: it stops first, before the clients it watches are closed. Before it flips back
    # to full it drops dead pooled connections, catches up on the feed, replays the journal.
    monitor.setup(app, before_recover=(redis.reset_connections, coherence.resync))
    return app


async def sqlite_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the SQLite tier and sweep expired rows (and stale memory entries) periodically."""
    sqlite = app[sqlite_key]
    memory = app[memory_key]
    interval = app[settings_key].sqlite_sweep_interval_seconds
    await sqlite.open()

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            memory.expire()
            with contextlib.suppress(Exception):  # logged and counted by the tier
                await sqlite.sweep()

    task = asyncio.create_task(sweep_forever(), name="sqlite-sweeper")
    yield
    await stop_task(task)
    await sqlite.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[redis_key].close()


async def cascade_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[cascade_key].drain()


async def coherence_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load this instance's feed position, then follow the feed while the app runs."""
    coherence = app[coherence_key]
    await coherence.open()
    task = asyncio.create_task(coherence.run(), name="invalidation-feed")
    yield
    await stop_task(task)
    await coherence.close()
