"""The health monitor against real redis-server processes that are killed, paused and restarted.

These are the fault-injection acceptance tests: while Redis is dead or frozen no request fails
or waits longer than the Redis timeout, the mode flips to degraded within two ping intervals,
reconnects are spaced by the backoff (one at a time, whatever the load), and the mode returns to
full soon after Redis is back. Every timing is measured with time.monotonic against generous
bounds (the test machine has two noisy cores), and every wait polls a condition to a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

import monitor
from service.keys import memory_key, settings_key
from tests.integration.conftest import FAST_MONITOR, ServiceFactory
from tests.procs import RedisProcess

pytestmark = pytest.mark.slow

API = "/api/performance/cache"
INTERVAL = FAST_MONITOR["health_interval_seconds"]
BASE = FAST_MONITOR["reconnect_backoff_base_seconds"]
CAP = FAST_MONITOR["reconnect_backoff_cap_seconds"]
#: The most a request may wait for Redis: the socket timeout bounds its whole Redis work (the
#: default; the tests below check it against the settings the app actually runs with).
REDIS_TIMEOUT = 0.25
#: Slack for scheduling noise on a loaded two-core machine; bounds are still well below what
#: a broken monitor would show (a missed ping interval, a request waiting out a 5 s default).
MARGIN = 0.5
POLL = 0.02
#: What a request may take beyond the Redis timeout and its healthy latency.
LATENCY_MARGIN = 0.25
OUTAGE_SECONDS = 3.0
#: Redis answers again -> full: at most one backoff wait (capped), one interval, and slack.
RECOVERY_BOUND = CAP + INTERVAL + MARGIN

Client = TestClient[Any, Any]


# Polling and reading the service


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    within: float,
    what: str,
    every: float = POLL,
) -> float:
    """Poll `condition` until true; return the seconds it took, fail after `within` seconds."""
    started = time.monotonic()
    deadline = started + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {within:.2f}s")
        await asyncio.sleep(every)


async def time_to(condition: Callable[[], Awaitable[bool]], within: float) -> float | None:
    """Poll `condition`; the seconds until it held, or None if it did not within `within`."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            return None
        await asyncio.sleep(POLL)
    return time.monotonic() - started


def ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


async def health(client: Client) -> dict[str, Any]:
    async with client.get("/health") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def stats(client: Client) -> dict[str, Any]:
    async with client.get(f"{API}/stats") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def mode_is(client: Client, name: str) -> bool:
    return bool((await health(client))["mode"] == name)


async def wait_mode(client: Client, name: str, within: float) -> float:
    return await wait_for(lambda: mode_is(client, name), within, f"in {name} mode")


async def metric(client: Client, sample_name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when the series is absent)."""
    async with client.get("/metrics") as response:
        assert response.status == 200
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


def redis_down(client: Client) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await metric(client, "tiercache_redis_up") == 0

    return condition


async def put(client: Client, key: str, value: Any) -> None:
    async with client.post(API, json={"key": key, "value": value}) as response:
        assert response.status == 200, await response.text()


async def get(client: Client, key: str) -> tuple[int, dict[str, Any]]:
    async with client.get(f"{API}/{key}") as response:
        return response.status, await response.json()


# Redis processes, without blocking the event loop the service runs on


async def kill(server: RedisProcess) -> None:
    await asyncio.to_thread(server.kill)


async def start(server: RedisProcess) -> None:
    await asyncio.to_thread(server.start)


@contextlib.asynccontextmanager
async def paused(server: RedisProcess) -> AsyncIterator[None]:
    """SIGSTOP for the block; SIGCONT whatever happens in it."""
    server.pause()
    try:
        yield
    finally:
        server.resume()


def app_of(client: Client) -> web.Application:
    app: web.Application | None = client.app
    assert app is not None
    return app


def redis_port(client: Client) -> int:
    url = str(app_of(client)[settings_key].redis_url)
    port = urlsplit(url).port
    assert port is not None
    return port


# Steady client traffic


@dataclass
class Traffic:
    """`workers` clients, each in a loop: write its key, read it back, read a missing key.

    Records every response's status and latency. A write must answer 200, a read of the
    worker's own key 200 and a read of a never-written key 404; anything else (a 5xx, a
    dropped connection) is a failure. Values read back that are not the last one written are
    kept apart in `stale`: that is the cache's coherence, which some tests check and some not.
    """

    client: Client
    workers: int
    name: str
    pause: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(n)) for n in range(self.workers)]

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def max_latency(self) -> float:
        return max(self.latencies, default=0.0)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _request(self, method: str, path: str, expect: int, **kw: Any) -> Any:
        started = time.monotonic()
        try:
            async with self.client.request(method, path, **kw) as response:
                status, raw = response.status, await response.read()
        except Exception as error:  # a dropped connection is a failed request too
            self.latencies.append(time.monotonic() - started)
            self.failures.append(f"{method} {path}: {type(error).__name__}: {error}")
            return None
        self.latencies.append(time.monotonic() - started)
        if status != expect:
            self.failures.append(f"{method} {path}: {status} (expected {expect}): {raw[:200]!r}")
            return None
        return json.loads(raw)

    async def _worker(self, n: int) -> None:
        key = f"{self.name}-{n}"
        seq = 0
        while not self._stop.is_set():
            value = {"worker": n, "seq": seq}
            await self._request("POST", API, 200, json={"key": key, "value": value})
            body = await self._request("GET", f"{API}/{key}", 200)
            if body is not None and body["value"] != value:
                self.stale.append(f"{key}: read {body['value']} after writing {value}")
            await self._request("GET", f"{API}/{self.name}-never-{n}-{seq}", 404)
            seq += 1
            await asyncio.sleep(self.pause)


@contextlib.asynccontextmanager
async def traffic(
    client: Client, workers: int, name: str, pause: float = 0.0
) -> AsyncIterator[Traffic]:
    load = Traffic(client, workers, name, pause)
    try:
        yield load
    finally:
        await load.stop()


# The backoff's arithmetic


def backoff_range(failures: int) -> tuple[float, float]:
    """EqualJitterBackoff.compute(failures) lies in [t/2, t] with t = min(cap, base * 2**n)."""
    top = min(CAP, BASE * 2**failures)
    return top / 2, top


def attempts_within(window: float, *, longest: bool, per_attempt: float = 0.0) -> int:
    """How many reconnect attempts start within `window` seconds of the flip to degraded.

    Each attempt waits its backoff and is then counted. `longest` takes every wait at its
    maximum (the fewest attempts) plus `per_attempt` seconds for the check itself and event
    loop lag; otherwise every wait is at its minimum and checks take no time (the most).
    """
    elapsed, count = 0.0, 0
    while True:
        low, high = backoff_range(count)
        elapsed += high + per_attempt if longest else low
        if elapsed > window:
            return count
        count += 1


# Tests


# Recovery must not chase the writes journaled while it replays: the journal is replayed in
# batches up to where it stood when Redis came back, the rest right after the flip.
async def test_kill_degrades_within_two_intervals_and_no_request_fails(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    assert await mode_is(client, "full")
    assert await metric(client, "tiercache_redis_up") == 1

    async with traffic(client, workers=8, name="kill", pause=0.005) as load:
        await wait_for(lambda: load.count > 50, 5, "serving traffic")
        killed = time.monotonic()
        await kill(redis_server)
        await wait_mode(client, "degraded", 2 * INTERVAL + MARGIN)
        flip = time.monotonic() - killed
        # redis_up is the monitor's own verdict: it follows at its next check at the latest.
        await wait_for(redis_down(client), 2 * INTERVAL + MARGIN - flip, "redis_up 0")
        up_zero = time.monotonic() - killed
        # Stay down long enough for several reconnect attempts to fail under the traffic.
        served, down = load.count, time.monotonic()
        await wait_for(
            lambda: load.count > served + 50 and time.monotonic() - down > 0.6, 5, "serving"
        )

        await start(redis_server)
        back = await time_to(lambda: mode_is(client, "full"), RECOVERY_BOUND)
        served = load.count
        await wait_for(lambda: load.count > served + 50, 5, "serving again")

    print(f"\nkill: flip {ms(flip)}, redis_up 0 after {ms(up_zero)}, back to full {ms(back)} "
          f"(bound {ms(RECOVERY_BOUND)}), {load.count} requests, "
          f"max latency {ms(load.max_latency)}")  # fmt: skip
    assert load.failures == []
    assert load.stale == []  # each worker reads back what it just wrote, throughout
    assert back is not None, f"not full within {RECOVERY_BOUND:.2f}s of redis-server answering"
    assert await metric(client, "tiercache_redis_up") == 1


async def test_kill_detected_by_ping_alone(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    """No request touches Redis here: only the monitor's ping can notice the death."""
    client = await make_service(redis_server)
    assert await mode_is(client, "full")
    killed = time.monotonic()
    await kill(redis_server)
    await wait_mode(client, "degraded", 2 * INTERVAL + MARGIN)
    flip = time.monotonic() - killed
    print(f"\nping alone: flip {flip * 1000:.0f} ms (interval {INTERVAL * 1000:.0f} ms)")
    assert flip <= 2 * INTERVAL + MARGIN


async def test_sigstop_under_load_bounds_every_request(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    settings = app_of(client)[settings_key]
    assert settings.redis_socket_timeout_seconds == REDIS_TIMEOUT
    assert await mode_is(client, "full")

    async with traffic(client, workers=50, name="stop") as load:
        await wait_for(lambda: load.count > 200, 5, "serving traffic")
        healthy_max = load.max_latency
        async with paused(redis_server):
            stopped = time.monotonic()
            await wait_mode(client, "degraded", REDIS_TIMEOUT + 2 * INTERVAL + MARGIN)
            flip = time.monotonic() - stopped
            # Frozen long enough for reconnect attempts to time out while requests flow.
            served, down = load.count, time.monotonic()
            await wait_for(
                lambda: load.count > served + 200 and time.monotonic() - down > 1.0, 5, "serving"
            )
            attempts = await metric(client, "tiercache_redis_reconnect_attempts_total")
        # The attempt in flight at SIGCONT may time out first, then one backoff wait (capped).
        back = await time_to(lambda: mode_is(client, "full"), REDIS_TIMEOUT + RECOVERY_BOUND)
        served = load.count
        await wait_for(lambda: load.count > served + 200, 5, "serving again")

    # A request waits for Redis once, at most its timeout, on top of what it costs anyway
    # under this load (measured before the freeze; it grows when the machine is busy).
    bound = REDIS_TIMEOUT + healthy_max + LATENCY_MARGIN
    print(f"\nsigstop: flip {ms(flip)}, back to full {ms(back)} "
          f"(bound {ms(REDIS_TIMEOUT + RECOVERY_BOUND)}), {load.count} requests, max latency "
          f"healthy {ms(healthy_max)}, overall {ms(load.max_latency)} (bound {ms(bound)}); "
          f"{attempts:.0f} reconnect attempts while frozen; "
          f"{len(load.stale)} stale reads")  # fmt: skip
    assert load.failures == []
    assert attempts >= 1
    assert load.max_latency <= bound, sorted(load.latencies)[-10:]
    assert back is not None, f"not full within {REDIS_TIMEOUT + RECOVERY_BOUND:.2f}s of SIGCONT"


async def test_long_outage_reconnects_at_backoff_pace_one_at_a_time(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    health_monitor = monitor.get_monitor(app_of(client))
    assert await mode_is(client, "full")
    assert await metric(client, "tiercache_redis_reconnect_attempts_total") == 0

    most_in_flight = 0
    samples = 0
    sampling = True

    async def sample() -> None:
        nonlocal most_in_flight, samples
        while sampling:
            most_in_flight = max(most_in_flight, health_monitor.attempts_in_flight)
            samples += 1
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    try:
        async with traffic(client, workers=100, name="outage") as load:
            await wait_for(lambda: load.count > 200, 5, "serving traffic")
            killed = time.monotonic()
            await kill(redis_server)
            await wait_mode(client, "degraded", 2 * INTERVAL + MARGIN)
            degraded_seen = time.monotonic()
            await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - killed))  # the outage
            asked = time.monotonic()
            attempts = await metric(client, "tiercache_redis_reconnect_attempts_total")
            answered = time.monotonic()
        # The flip happened between the kill and our seeing it; the count was read between
        # asking and the answer. Widest and narrowest windows the attempts could fall in:
        most = attempts_within(answered - killed, longest=False)
        fewest = attempts_within(asked - degraded_seen, longest=True, per_attempt=0.05)
    finally:
        sampling = False
        await sampler

    print(f"\noutage {answered - killed:.2f}s: {attempts:.0f} attempts, "
          f"bounds [{fewest}, {most}]; {load.count} requests; "
          f"in flight max {most_in_flight} over {samples} samples")  # fmt: skip
    assert load.failures == []
    assert fewest <= attempts <= most
    assert samples > 100
    assert most_in_flight <= 1  # never two at once (a refused connect is often too quick to see)


async def test_dead_endpoint_sees_one_connection_at_a_time_under_load(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    """A Redis that accepts connections and never answers, seen from the server's side.

    The monitor's counter and gauge could lie; the sockets cannot. Whatever the request load,
    at most one connection is open to the dead endpoint at any moment, and no more
    connections are made than the monitor counted attempts.
    """
    client = await make_service(redis_server)
    assert await mode_is(client, "full")
    open_now = 0
    most_open = 0
    accepted = 0

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most_open, accepted
        accepted += 1
        open_now += 1
        most_open = max(most_open, open_now)
        try:
            while await reader.read(4096):  # never reply; wait for the client to give up
                pass
        finally:
            open_now -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async with traffic(client, workers=100, name="blackhole") as load:
        await wait_for(lambda: load.count > 200, 5, "serving traffic")
        await kill(redis_server)
        await wait_mode(client, "degraded", 2 * INTERVAL + MARGIN)
        before = await metric(client, "tiercache_redis_reconnect_attempts_total")
        blackhole = await asyncio.start_server(swallow, "127.0.0.1", redis_server.port)
        try:
            await asyncio.sleep(2.0)  # the outage: a fixed duration, not a wait for anything
            attempts = await metric(client, "tiercache_redis_reconnect_attempts_total")
        finally:
            blackhole.close()
            await blackhole.wait_closed()

    print(f"\nblack hole: {accepted} connections, {attempts - before:.0f} attempts counted, "
          f"at most {most_open} open at once, {load.count} requests")  # fmt: skip
    assert load.failures == []
    assert accepted >= 1
    assert most_open == 1
    # The attempt running when the black hole opened may already be counted, hence the +1.
    assert accepted <= attempts - before + 1
    assert await mode_is(client, "degraded")


async def test_absent_at_start_then_redis_appears(make_service: ServiceFactory) -> None:
    client = await make_service(None)
    body = await health(client)
    assert body["mode"] == "degraded"
    assert isinstance(body["degradedSince"], float)
    first = await stats(client)
    assert first["mode"] == "degraded"
    assert first["redis"]["connected"] is False
    assert first["redis"]["server"] is None

    await put(client, "early", {"n": 1})
    status, got = await get(client, "early")
    assert (status, got["value"], got["tier"]) == (200, {"n": 1}, "memory")
    app_of(client)[memory_key].delete("early")
    status, got = await get(client, "early")
    assert (status, got["value"], got["tier"]) == (200, {"n": 1}, "database")

    server = RedisProcess(redis_port(client))
    try:
        await start(server)
        appeared = time.monotonic()
        await wait_mode(client, "full", RECOVERY_BOUND)
        back = time.monotonic() - appeared
        print(f"\nabsent at start: full {back * 1000:.0f} ms after redis-server answered")
        assert (await health(client))["degradedSince"] is None
        assert await metric(client, "tiercache_redis_restarts_total") == 0

        await put(client, "late", {"n": 2})
        redis = aioredis.Redis.from_url(server.url)
        try:
            assert await redis.exists("cache:late") == 1
        finally:
            await redis.aclose()
    finally:
        await asyncio.to_thread(server.stop)


async def test_restart_while_healthy_is_counted_once(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    assert await mode_is(client, "full")
    assert await metric(client, "tiercache_redis_restarts_total") == 0

    await asyncio.to_thread(redis_server.restart)

    async def restart_counted() -> bool:
        return await metric(client, "tiercache_redis_restarts_total") >= 1

    await wait_for(restart_counted, CAP + 2 * INTERVAL + MARGIN, "counting the restart")
    await wait_mode(client, "full", RECOVERY_BOUND)
    # Two more successful pings against the same new server must not count it again.
    pings = await metric(client, "tiercache_redis_ping_duration_seconds_count")

    async def pinged_twice() -> bool:
        return await metric(client, "tiercache_redis_ping_duration_seconds_count") >= pings + 2

    await wait_for(pinged_twice, 2 * INTERVAL + MARGIN + 1, "pinging the new server")
    assert await metric(client, "tiercache_redis_restarts_total") == 1


async def test_degraded_since_is_shown_while_degraded_and_null_when_full(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    client = await make_service(redis_server)
    assert (await health(client))["degradedSince"] is None
    assert (await stats(client))["degradedSince"] is None

    before = time.time()
    await kill(redis_server)
    await wait_mode(client, "degraded", 2 * INTERVAL + MARGIN)
    body, stat = await health(client), await stats(client)
    assert body["mode"] == stat["mode"] == "degraded"
    assert isinstance(body["degradedSince"], float)
    assert before <= body["degradedSince"] <= time.time()
    assert stat["degradedSince"] == body["degradedSince"]
    assert stat["redis"]["connected"] is False

    await start(redis_server)
    await wait_mode(client, "full", RECOVERY_BOUND)
    body, stat = await health(client), await stats(client)
    assert body["degradedSince"] is None
    assert stat["degradedSince"] is None
    assert stat["mode"] == "full"
    assert stat["redis"]["connected"] is True


# redis-py 8's default maintenance-notification mode skips the dead-connection check: a
# connection the server closed would fail its next command and flip the mode for nothing.
async def test_connections_dropped_by_a_healthy_redis_are_not_an_outage(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    """Redis closing idle connections (its `timeout`, a proxy, CLIENT KILL) is no outage."""
    client = await make_service(redis_server)
    await put(client, "kept", "value")
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        dropped = await admin.client_kill_filter(_type="normal", skipme=True)
    finally:
        await admin.aclose()
    assert dropped >= 2  # the monitor's connection and the request pool's
    pings = await metric(client, "tiercache_redis_ping_duration_seconds_count")

    async def pinged_twice() -> bool:
        return await metric(client, "tiercache_redis_ping_duration_seconds_count") >= pings + 2

    await wait_for(pinged_twice, 2 * INTERVAL + MARGIN + 1, "pinging after the drop")
    status, got = await get(client, "kept")
    assert (status, got["tier"]) == (200, "redis")
    assert await metric(client, "tiercache_mode_transitions_total", to="degraded") == 0
    assert await metric(client, "tiercache_redis_restarts_total") == 0


async def test_writes_made_while_redis_was_frozen_win_after_recovery(
    make_service: ServiceFactory, redis_server: RedisProcess
) -> None:
    """Redis keeps its data through SIGSTOP; what changed meanwhile must not be undone."""
    client = await make_service(redis_server)
    await put(client, "frozen", "before")
    await put(client, "gone", "before")
    async with paused(redis_server):
        # Let the monitor notice, so that no request below even tries Redis.
        await wait_mode(client, "degraded", REDIS_TIMEOUT + 2 * INTERVAL + MARGIN)
        await put(client, "frozen", "during")
        async with client.delete(f"{API}/gone") as response:
            assert response.status == 200
        assert (await get(client, "frozen"))[1]["value"] == "during"
        assert (await get(client, "gone"))[0] == 404
    await wait_mode(client, "full", REDIS_TIMEOUT + CAP + INTERVAL + MARGIN)

    status, got = await get(client, "frozen")
    assert (status, got.get("value")) == (200, "during"), got
    status, got = await get(client, "gone")
    assert status == 404, got


async def test_degraded_time_is_current_at_every_scrape(make_service: ServiceFactory) -> None:
    """Even while the monitor waits out a long backoff, a scrape counts the time up to now."""
    client = await make_service(
        None, reconnect_backoff_base_seconds=60, reconnect_backoff_cap_seconds=60
    )
    assert await mode_is(client, "degraded")
    started = time.monotonic()
    first = await metric(client, "tiercache_degraded_seconds_total")
    await asyncio.sleep(0.3)  # the monitor sleeps for 30-60 s meanwhile
    second = await metric(client, "tiercache_degraded_seconds_total")
    elapsed = time.monotonic() - started
    # Between the two scrapes, the counter grew by the wall time between them: about the
    # sleep, at most the time from asking for the first to receiving the second (measured,
    # so a loaded machine that slows the scrapes down does not break the bound).
    assert 0.25 <= second - first <= elapsed, (second - first, elapsed)
