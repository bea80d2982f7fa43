"""Prometheus metrics: one registry per app, so several apps can live in one test process.

Metrics are updated where the event happens (a tier hit, a mode flip), never recomputed by a
scrape, so a scrape costs no Redis round trip and cannot hang on a dead Redis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# `_created` series double the exposition and no dashboard or alert of ours reads them.
disable_created_metrics()

PREFIX = "tiercache"
TIERS = ("redis", "memory", "database")
MODES = ("full", "degraded")

#: Request latency buckets in seconds: the cache answers in well under a millisecond when
#: healthy, and a request that waited out a Redis timeout lands in the 0.25-1 s buckets.
LATENCY_BUCKETS_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


def multiprocess() -> bool:
    """Whether several worker processes share their metrics through PROMETHEUS_MULTIPROC_DIR."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _gauge(
    name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
) -> Gauge:
    # With several workers each keeps its own gauge value, labelled with its pid; the series
    # of a worker that exited are dropped.
    return Gauge(name, documentation, labelnames, registry=registry, multiprocess_mode="liveall")


class Metrics:
    """Every metric the service exports, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if multiprocess():
            # Scrapes read every worker's files; process metrics are per process only.
            self.exposition: CollectorRegistry = CollectorRegistry()
            MultiProcessCollector(self.exposition)
        else:
            self.exposition = r
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self.tier_hits = Counter(
            f"{PREFIX}_tier_hits_total", "Reads answered by a tier.", ["tier"], registry=r
        )
        self.tier_misses = Counter(
            f"{PREFIX}_tier_misses_total", "Reads a tier could not answer.", ["tier"], registry=r
        )
        self.tier_errors = Counter(
            f"{PREFIX}_tier_errors_total",
            "Tier operations that failed (timeouts, lost connections, disk errors).",
            ["tier"],
            registry=r,
        )
        self.tier_entries = _gauge(
            f"{PREFIX}_tier_entries",
            "Entries held by a tier (memory and database; Redis is shared and not counted).",
            ["tier"],
            registry=r,
        )
        self.memory_bytes = _gauge(
            f"{PREFIX}_memory_bytes",
            "Bytes the memory tier accounts for (values plus per-entry bookkeeping).",
            registry=r,
        )
        self.memory_evictions = Counter(
            f"{PREFIX}_memory_evictions_total",
            "Entries the memory tier evicted to stay within its bounds (least recently used).",
            registry=r,
        )
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "Cache API requests by operation and outcome.",
            ["operation", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request received to response ready, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.redis_up = _gauge(
            f"{PREFIX}_redis_up",
            "1 if the health monitor's last check of Redis succeeded, else 0.",
            registry=r,
        )
        self.mode = _gauge(
            f"{PREFIX}_mode",
            "1 for the cascade's current mode, 0 for the other.",
            ["mode"],
            registry=r,
        )
        self.mode_transitions = Counter(
            f"{PREFIX}_mode_transitions_total",
            "Flips between full and degraded mode, by the mode entered.",
            ["to"],
            registry=r,
        )
        self.degraded_seconds = Counter(
            f"{PREFIX}_degraded_seconds_total",
            "Seconds spent in degraded mode (added when an outage ends and on each monitor tick).",
            registry=r,
        )
        self.reconnect_attempts = Counter(
            f"{PREFIX}_redis_reconnect_attempts_total",
            "Reconnection attempts made by the health monitor while Redis was down.",
            registry=r,
        )
        self.ping_duration = Histogram(
            f"{PREFIX}_redis_ping_duration_seconds",
            "Round-trip time of the health monitor's Redis pings that succeeded.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.redis_restarts = Counter(
            f"{PREFIX}_redis_restarts_total",
            "Times the Redis server behind the service changed (restart, failover: new run_id).",
            registry=r,
        )
        self.journal_pending = _gauge(
            f"{PREFIX}_journal_pending",
            "Changes made while Redis was unusable, waiting to be replayed into it.",
            registry=r,
        )
        self.journal_replayed = Counter(
            f"{PREFIX}_journal_replayed_total",
            "Journaled changes replayed into Redis, by whether Redis took them or held newer.",
            ["result"],
            registry=r,
        )
        self.invalidations = Counter(
            f"{PREFIX}_invalidations_total",
            "Changes announced by other instances and applied to this one's local tiers.",
            ["kind"],
            registry=r,
        )
        self.resyncs = Counter(
            f"{PREFIX}_resyncs_total",
            "Reconnections to the invalidation feed, by what had to be done to catch up.",
            ["outcome"],
            registry=r,
        )
        self.feed_lag = _gauge(
            f"{PREFIX}_invalidation_lag_seconds",
            "Age of the newest invalidation applied when it was applied.",
            registry=r,
        )
        for tier in TIERS:
            for counter in (self.tier_hits, self.tier_misses, self.tier_errors):
                counter.labels(tier)
        for mode in MODES:
            self.mode.labels(mode)
            self.mode_transitions.labels(mode)
        self._request_children: dict[tuple[str, str], Counter] = {}
        # Every series exists from the start, so dashboards and alerts never see "no data".
        for result in ("applied", "superseded", "expired"):
            self.journal_replayed.labels(result)
        for kind in ("set", "delete", "pattern"):
            self.invalidations.labels(kind)
        for outcome in ("first_contact", "caught_up", "feed_trimmed", "redis_lost_data"):
            self.resyncs.labels(outcome)

    def count_request(self, operation: str, outcome: str) -> None:
        """Count one API request; children are bound once, not looked up per request."""
        child = self._request_children.get((operation, outcome))
        if child is None:
            child = self._request_children[operation, outcome] = self.requests.labels(
                operation, outcome
            )
        child.inc()

    def duration_observer(self, route: str) -> Callable[[float], None]:
        """The `observe` of the latency histogram's child for `route`, bound once."""
        return self.request_duration.labels(route).observe
