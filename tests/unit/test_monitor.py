"""HealthMonitor on a scripted Redis, a fake clock and a sleep that only records what it was asked.

fakeredis does not implement INFO, so the client is a stub whose `info("server")` answers from
a script: a run_id string is a healthy server, an exception a failed check. When the script
runs out the stub raises `EndOfScript`, which ends `run()`. Every sleep advances the fake clock
by what was asked and is recorded with whether Redis was in use at the time, which tells a
healthy tick (in use) from a backoff pause (degraded).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp import web
from redis.backoff import AbstractBackoff, EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import monitor
from monitor.health import MAX_COUNTED_FAILURES, HealthMonitor
from service.keys import metrics_key, mode_key, settings_key
from service.metrics import Metrics
from service.mode import Mode
from service.settings import Settings

DOWN = RedisConnectionError("Connection refused")
INTERVAL = 1.0
STABLE = 5.0


class EndOfScript(BaseException):
    """The scripted Redis has nothing more to say: the test is over.

    A BaseException, so that no `except Exception` in the monitor can swallow it.
    """


class ScriptedRedis:
    """Answers INFO server from a script; notes how many checks were in flight at each call."""

    def __init__(self, script: Sequence[str | BaseException]) -> None:
        self.script = list(script)
        self.calls = 0
        self.monitor: HealthMonitor | None = None
        self.in_flight_seen: list[int] = []

    async def info(self, section: str) -> dict[str, Any]:
        assert section == "server"
        self.calls += 1
        if self.monitor is not None:
            self.in_flight_seen.append(self.monitor.attempts_in_flight)
        if not self.script:
            raise EndOfScript
        answer = self.script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return {"redis_version": "7.0.15", "run_id": answer}


class Harness:
    """A monitor over a ScriptedRedis, a real Mode and Metrics, a fake clock and sleep."""

    def __init__(
        self,
        script: Sequence[str | BaseException],
        *,
        base: float = 0.1,
        cap: float = 100.0,
        backoff: AbstractBackoff | None = None,
        hooks: Sequence[Any] = (),
        timeout: float = 0.5,
    ) -> None:
        self.now = 1_000.0
        self.sleeps: list[tuple[float, bool]] = []
        self.metrics = Metrics()
        self.mode = Mode(self.metrics)
        self.client = ScriptedRedis(script)
        self.monitor = HealthMonitor(
            self.client,  # type: ignore[arg-type]
            self.mode,
            self.metrics,
            interval_seconds=INTERVAL,
            timeout_seconds=timeout,
            backoff=backoff or EqualJitterBackoff(cap=cap, base=base),
            stable_seconds=STABLE,
            before_recover=hooks,
            clock=lambda: self.now,
            sleep=self.sleep,
        )
        self.client.monitor = self.monitor

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append((seconds, self.mode.redis_usable))
        self.now += seconds
        await asyncio.sleep(0)

    async def run(self) -> None:
        """start() then run() until the script is exhausted."""
        await self.monitor.start()
        with pytest.raises(EndOfScript):
            await self.monitor.run()

    @property
    def pauses(self) -> list[float]:
        """The backoff waits, in order (sleeps taken while degraded)."""
        return [seconds for seconds, usable in self.sleeps if not usable]

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def jitter_range(failures: int, base: float, cap: float) -> tuple[float, float]:
    """EqualJitterBackoff: half the capped exponential, plus up to as much again at random."""
    top = min(cap, base * 2**failures)
    return top / 2, top


# Backoff


async def test_reconnect_delays_grow_exponentially_with_equal_jitter() -> None:
    harness = Harness([DOWN] * 12, base=0.05, cap=0.5)
    await harness.run()

    # Start-up failed, then 11 attempts failed and a 12th was asked for: 12 waits.
    assert len(harness.pauses) == 12
    for failures, delay in enumerate(harness.pauses):
        low, high = jitter_range(failures, 0.05, 0.5)
        assert low <= delay <= high, (failures, delay)
    capped = harness.pauses[4:]  # 0.05 * 2**4 = 0.8 > cap: every wait in [0.25, 0.5]
    assert len(set(capped)) > 1, "no jitter"
    assert harness.value("tiercache_redis_reconnect_attempts_total") == 12
    assert harness.mode.name == "degraded"


async def test_counted_failures_stop_at_the_cap() -> None:
    class Recording(AbstractBackoff):
        def __init__(self) -> None:
            self.asked: list[int] = []

        def reset(self) -> None:
            pass

        def compute(self, failures: int) -> float:
            self.asked.append(failures)
            return 0.5

    backoff = Recording()
    harness = Harness([DOWN] * (MAX_COUNTED_FAILURES + 10), backoff=backoff)
    await harness.run()
    assert backoff.asked[: MAX_COUNTED_FAILURES + 1] == list(range(MAX_COUNTED_FAILURES + 1))
    assert set(backoff.asked[MAX_COUNTED_FAILURES:]) == {MAX_COUNTED_FAILURES}


async def test_only_one_check_in_flight_and_a_hung_check_times_out() -> None:
    harness = Harness(["a", "a", DOWN, DOWN, "a", "a"], timeout=0.05)
    await harness.run()
    assert harness.client.in_flight_seen == [1] * 7
    assert harness.monitor.attempts_in_flight == 0

    class Hung:
        async def info(self, section: str) -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    hung = Harness([], timeout=0.05)
    hung.monitor._client = Hung()  # type: ignore[assignment]
    started = time.monotonic()
    assert await hung.monitor.check() is False
    assert time.monotonic() - started < 1.0
    assert hung.monitor.attempts_in_flight == 0


# Flap damping


async def test_failures_are_remembered_when_redis_drops_before_stable_seconds() -> None:
    # Down at start-up and for 3 attempts, up at the 4th (failures counted: 4), two good
    # pings (2 s of health < STABLE), down again: the next wait continues at 2**4.
    harness = Harness([DOWN, DOWN, DOWN, DOWN, "a", "a", "a", DOWN], base=0.1)
    await harness.run()

    assert [usable for _, usable in harness.sleeps] == [False] * 4 + [True] * 3 + [False]
    low, high = jitter_range(4, 0.1, 100.0)
    assert low <= harness.pauses[-1] <= high
    # The start-up verdict is not a transition (the mode starts degraded); the drop is.
    assert harness.value("tiercache_mode_transitions_total", to="degraded") == 1


async def test_failures_are_forgotten_after_stable_seconds_of_health() -> None:
    # The same, but healthy for 6 pings (6 s >= STABLE): the next outage starts over at 2**0.
    script: list[str | BaseException] = [DOWN, DOWN, DOWN, DOWN, "a", *["a"] * 6, DOWN]
    harness = Harness(script, base=0.1)
    await harness.run()

    assert [usable for _, usable in harness.sleeps] == [False] * 4 + [True] * 7 + [False]
    low, high = jitter_range(0, 0.1, 100.0)
    assert low <= harness.pauses[-1] <= high


# Server identity


@pytest.mark.parametrize(
    ("script", "restarts"),
    [
        pytest.param(["a", "a", "b", "b"], 1, id="changed-while-healthy"),
        pytest.param(["a", DOWN, "a", "a"], 0, id="same-server-after-outage"),
        pytest.param(["a", DOWN, DOWN, "b", "b"], 1, id="new-server-after-outage"),
        pytest.param([DOWN, "a", "a"], 0, id="first-server-seen-late"),
        pytest.param(["a", "b", "c", "c"], 2, id="two-changes"),
    ],
)
async def test_a_changed_run_id_is_counted_as_a_restart(
    script: list[str | BaseException], restarts: int
) -> None:
    harness = Harness(script)
    await harness.run()
    assert harness.value("tiercache_redis_restarts_total") == restarts
    assert harness.mode.redis_epoch == restarts
    assert harness.monitor.run_id == next(s for s in reversed(script) if isinstance(s, str))


async def test_a_restart_seen_while_healthy_does_not_flip_the_mode() -> None:
    harness = Harness(["a", "a", "b", "b"])
    await harness.run()
    assert harness.mode.name == "full"
    assert harness.value("tiercache_mode_transitions_total", to="degraded") == 0


# Recovery hooks


async def test_recovery_hooks_run_in_order_before_the_flip() -> None:
    calls: list[tuple[str, bool]] = []
    harness: Harness

    def hook(name: str) -> Any:
        async def run() -> None:
            calls.append((name, harness.mode.redis_usable))

        return run

    harness = Harness([DOWN, "a"], hooks=[hook("first"), hook("second")])
    harness.monitor.add_recovery_hook(hook("added"))
    await harness.run()

    assert calls == [("first", False), ("second", False), ("added", False)]
    assert harness.mode.name == "full"


async def test_a_failing_recovery_hook_keeps_the_mode_degraded() -> None:
    outcomes: list[bool] = []
    harness: Harness

    async def flaky() -> None:
        failing = not outcomes
        outcomes.append(harness.mode.redis_usable)
        if failing:
            raise RuntimeError("could not reset connections")

    # Start-up down; first reconnect answers but the hook fails; the second succeeds.
    harness = Harness([DOWN, "a", "a", "a"], base=0.1, hooks=[flaky])
    await harness.run()

    assert outcomes == [False, False]
    assert [usable for _, usable in harness.sleeps] == [False, False, True, True]
    # The failed recovery counted as a failure: the second wait is in the 2**1 range.
    low, high = jitter_range(1, 0.1, 100.0)
    assert low <= harness.pauses[1] <= high
    assert harness.value("tiercache_redis_reconnect_attempts_total") == 2
    assert harness.value("tiercache_mode_transitions_total", to="full") == 1
    assert harness.mode.name == "full"


async def test_a_failing_hook_at_start_up_leaves_the_service_degraded() -> None:
    calls = 0

    async def fails_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("not yet")

    harness = Harness(["a", "a"], hooks=[fails_once])
    await harness.monitor.start()
    assert harness.mode.name == "degraded"
    assert harness.mode.degraded_since() is not None
    with pytest.raises(EndOfScript):
        await harness.monitor.run()
    assert calls == 2
    assert harness.mode.name == "full"


# Waking up


async def test_a_request_failure_wakes_the_monitor_at_once() -> None:
    """Real time here: the healthy wait must end on the failure event, not the interval."""
    metrics = Metrics()
    mode = Mode(metrics)
    client = ScriptedRedis(["a"] * 10)
    health_monitor = HealthMonitor(
        client,  # type: ignore[arg-type]
        mode,
        metrics,
        interval_seconds=60.0,
        timeout_seconds=0.5,
        backoff=EqualJitterBackoff(cap=0.002, base=0.001),
        stable_seconds=STABLE,
    )
    await health_monitor.start()
    assert mode.name == "full"
    recovering = asyncio.Event()

    async def note_recovery() -> None:
        recovering.set()

    health_monitor.add_recovery_hook(note_recovery)
    task = asyncio.create_task(health_monitor.run())
    try:
        await asyncio.sleep(0.01)
        assert client.calls == 1  # waiting out its 60 s interval
        failed = time.monotonic()
        mode.redis_failed("redis pipeline failed: TimeoutError")
        assert mode.name == "degraded"
        async with asyncio.timeout(2):
            await recovering.wait()
        await asyncio.sleep(0)
        assert mode.name == "full"
        assert time.monotonic() - failed < 1.0
        assert client.calls == 2
        assert metrics.registry.get_sample_value("tiercache_redis_reconnect_attempts_total") == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    "error",
    [RedisTimeoutError("Timeout reading"), ConnectionResetError(104, "reset"), TimeoutError()],
    ids=["redis-timeout", "os-error", "builtin-timeout"],
)
async def test_every_expected_error_is_a_failed_check(error: BaseException) -> None:
    harness = Harness(["a", error])
    await harness.run()
    assert harness.mode.name == "degraded"
    assert harness.mode.reason.startswith("ping failed (")
    assert harness.value("tiercache_redis_up") == 0


async def test_redis_up_is_the_last_check_not_the_mode() -> None:
    # Up at start-up, then a request reports a failure: the mode is degraded at once, but
    # the gauge keeps the monitor's own verdict until its next check answers.
    harness = Harness(["a"])
    await harness.monitor.start()
    assert harness.value("tiercache_redis_up") == 1
    harness.mode.redis_failed("redis pipeline failed: TimeoutError")
    assert harness.mode.name == "degraded"
    assert harness.value("tiercache_redis_up") == 1
    harness.client.script = [DOWN]
    with pytest.raises(EndOfScript):
        await harness.monitor.run()
    assert harness.value("tiercache_redis_up") == 0


# An exception of an unexpected type in a check must count as a failed check, not end the
# monitor task (nothing awaits it until shutdown, and the mode would be frozen).
async def test_an_unexpected_error_in_a_check_does_not_end_the_monitor() -> None:
    harness = Harness(["a", ValueError("unparseable INFO reply"), "a"])
    await harness.run()
    assert harness.value("tiercache_mode_transitions_total", to="degraded") == 1
    assert harness.mode.name == "full"


# Shutdown


class LosesOneCancellation:
    """Answers, then loses the first cancellation that reaches it, as redis-py does on 3.11.

    redis-py's Connection.send_packed_command wraps the socket write in asyncio.wait_for, and
    Python 3.11's wait_for returns the result instead of raising CancelledError when the write
    finishes in the same loop iteration as the cancellation (fixed in 3.12). Against a Redis
    that accepts connections but does not answer, about one monitor cancellation in a hundred
    is lost that way (measured with the real client); the integration suite hit it as a
    teardown that hung for the full pytest timeout.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.lost = asyncio.Event()
        self.waiting = asyncio.Event()

    async def info(self, section: str) -> dict[str, Any]:
        self.calls += 1
        if self.calls > 1 and not self.lost.is_set():
            self.waiting.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.lost.set()  # and carry on as if the write had simply completed
        return {"run_id": "a"}


# A cancellation lost inside redis-py (asyncio.wait_for on Python 3.11) must not make app
# shutdown wait forever: the task is cancelled again until it ends.
async def test_shutdown_stops_the_monitor_even_when_a_cancellation_is_lost() -> None:
    app = web.Application()
    metrics = Metrics()
    app[settings_key] = Settings(
        _env_file=None, redis_url="redis://127.0.0.1:1/0", health_interval_seconds=0.01
    )
    app[metrics_key] = metrics
    app[mode_key] = Mode(metrics)
    health_monitor = monitor.setup(app)
    real_client = health_monitor._client
    stub = LosesOneCancellation()
    health_monitor._client = stub  # type: ignore[assignment]
    app.freeze()
    await app.startup()
    try:
        async with asyncio.timeout(2):
            await stub.waiting.wait()  # the monitor is inside a check: shut down now
        started = time.monotonic()
        async with asyncio.timeout(3):
            await app.cleanup()
        assert stub.lost.is_set()
        assert time.monotonic() - started < 2.5
    finally:
        for task in asyncio.all_tasks():
            if task.get_name() == "redis-health-monitor":
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await real_client.aclose()
