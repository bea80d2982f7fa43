"""Fixtures shared by every test: throwaway redis-server processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import RedisProcess, redis_process


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisProcess]:
    """One redis-server for tests that only read and write (never kill or pause it)."""
    with redis_process() as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A redis-server of the test's own, free to kill, pause and restart."""
    with redis_process() as server:
        yield server
