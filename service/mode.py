"""The cascade's mode switch: full (Redis in use) or degraded (memory and SQLite only).

The health monitor alone decides when Redis is healthy again; the request path may only say
"Redis just failed", which flips to degraded at once and wakes the monitor. The cascade reads
`redis_usable` and never pings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from service.metrics import Metrics

log = structlog.get_logger("tiercache.mode")

FULL = "full"
DEGRADED = "degraded"


class Mode:
    """Full or degraded, with when it last changed and why; updates its metrics and logs."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self.redis_usable = False
        self.since = clock()
        self.reason = "starting"
        self._decided = False  # the first verdict is logged even when it keeps "degraded"
        self._accounted_until = self.since
        self.failure = asyncio.Event()
        #: Set while Redis is usable, for background work that needs it to wait its turn.
        self.usable = asyncio.Event()
        #: Incremented each time Redis is found to be a different server (restart, failover).
        self.redis_epoch = 0
        self._publish()

    @property
    def name(self) -> str:
        return FULL if self.redis_usable else DEGRADED

    def degraded_since(self) -> float | None:
        return None if self.redis_usable else self.since

    def redis_failed(self, reason: str) -> None:
        """Stop using Redis now; the monitor takes over reconnecting."""
        self.failure.set()
        self.usable.clear()
        if self.redis_usable or not self._decided:
            self._flip(False, reason)

    def redis_recovered(self, reason: str) -> None:
        """Called by the monitor once Redis answers again."""
        self.failure.clear()
        self.usable.set()
        if not self.redis_usable:
            self._flip(True, reason)

    def account_degraded_time(self) -> None:
        """Add the time degraded since last accounted, so the counter grows during an outage."""
        now = self._clock()
        if not self.redis_usable and self._decided:
            self._metrics.degraded_seconds.inc(max(0.0, now - self._accounted_until))
        self._accounted_until = now

    def _flip(self, usable: bool, reason: str) -> None:
        self.account_degraded_time()
        now = self._clock()
        lasted = now - self.since
        # The start-up verdict is not a transition: no flip happened.
        changed = self._decided and usable != self.redis_usable
        self._decided = True
        self.redis_usable = usable
        self.since = now
        self.reason = reason
        if changed:
            self._metrics.mode_transitions.labels(self.name).inc()
        if usable:
            # At start-up there was no outage to report the length of.
            outage = {"outage_seconds": round(lasted, 3)} if changed else {}
            log.info("Redis available, using full cascade", reason=reason, **outage)
        else:
            log.warning("Redis not available, using memory/DB cache", reason=reason)
        self._publish()

    def _publish(self) -> None:
        self._metrics.mode.labels(FULL).set(1 if self.redis_usable else 0)
        self._metrics.mode.labels(DEGRADED).set(0 if self.redis_usable else 1)
