"""Fixtures for tests against real redis-server processes: the real app over real Redis."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.settings import Settings
from tests.procs import RedisProcess, free_port

#: Fast monitor settings for tests: faults are noticed in tenths of a second, not seconds.
FAST_MONITOR = {
    "health_interval_seconds": 0.2,
    "reconnect_backoff_base_seconds": 0.05,
    "reconnect_backoff_cap_seconds": 0.5,
    "health_stable_seconds": 1.0,
}

ServiceFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def make_settings(redis: RedisProcess | None, db_path: Path, **overrides: Any) -> Settings:
    """Settings for a test app; with no RedisProcess it points at a port nothing listens on."""
    url = redis.url if redis is not None else f"redis://127.0.0.1:{free_port()}/0"
    values: dict[str, Any] = {"redis_url": url, "cache_db_path": db_path, **FAST_MONITOR}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def make_service(aiohttp_client: Any, tmp_path: Path) -> ServiceFactory:
    """Start the real app on a test server: `await make_service(redis_process, **settings)`.

    Each call gets its own SQLite file unless `cache_db_path` is given.
    """
    counter = itertools.count()

    async def factory(redis: RedisProcess | None, **overrides: Any) -> TestClient[Any, Any]:
        overrides.setdefault("cache_db_path", tmp_path / f"cache-{next(counter)}.db")
        db_path = overrides.pop("cache_db_path")
        client: TestClient[Any, Any] = await aiohttp_client(
            create_app(make_settings(redis, db_path, **overrides))
        )
        return client

    return factory
