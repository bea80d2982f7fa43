"""The memory tier: bounds by entries and bytes, LRU eviction, TTL, glob deletes."""

from __future__ import annotations

from service.metrics import Metrics
from service.tiers.base import Entry
from service.tiers.memory import ENTRY_OVERHEAD_BYTES, MemoryTier


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make(max_entries: int = 100, max_bytes: int = 1_000_000) -> tuple[MemoryTier, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    return MemoryTier(metrics, max_entries, max_bytes, clock=clock), clock, metrics


def evictions(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("tiercache_memory_evictions_total") or 0.0


def test_get_set_delete() -> None:
    tier, _, _ = make()
    tier.set("a", Entry(b"1", None))
    assert tier.get("a") == Entry(b"1", None)
    assert tier.contains("a")
    assert tier.delete("a") == 1
    assert tier.delete("a") == 0
    assert tier.get("a") is None


def test_expired_entries_are_never_returned() -> None:
    tier, clock, _ = make()
    tier.set("a", Entry(b"1", clock.now + 10))
    clock.now += 9.999
    assert tier.get("a") is not None
    clock.now += 0.002
    assert tier.get("a") is None
    assert not tier.contains("a")
    tier.expire()
    assert len(tier) == 0


def test_an_already_expired_write_removes_the_old_value() -> None:
    tier, clock, _ = make()
    tier.set("a", Entry(b"old", None))
    tier.set("a", Entry(b"new", clock.now - 1))
    assert tier.get("a") is None


def test_entry_bound_evicts_least_recently_used() -> None:
    tier, _, metrics = make(max_entries=3)
    for key in "abc":
        tier.set(key, Entry(b"x", None))
    tier.get("a")  # a is now the most recently used
    tier.set("d", Entry(b"x", None))
    assert tier.get("b") is None
    assert {k for k in "acd" if tier.get(k)} == {"a", "c", "d"}
    assert len(tier) == 3
    assert evictions(metrics) == 1
    tier.set("a", Entry(b"y", None))  # overwriting is not an eviction
    assert evictions(metrics) == 1


def test_byte_bound_evicts_and_counts() -> None:
    per_entry = 100 + ENTRY_OVERHEAD_BYTES
    tier, _, metrics = make(max_bytes=per_entry * 5)
    for i in range(8):
        tier.set(f"k{i}", Entry(b"v" * 100, None))
    assert len(tier) == 5
    assert tier.bytes_used <= per_entry * 5
    assert evictions(metrics) == 3
    assert tier.get("k0") is None
    assert tier.get("k7") is not None


def test_value_larger_than_the_whole_tier_is_not_kept_and_drops_the_old_copy() -> None:
    tier, _, _ = make(max_bytes=1000)
    tier.set("big", Entry(b"small", None))
    tier.set("big", Entry(b"v" * 2000, None))
    assert tier.get("big") is None


def test_delete_pattern_uses_redis_glob() -> None:
    tier, _, _ = make()
    for key in ("user:1", "user:2", "user:10", "users", "a*b"):
        tier.set(key, Entry(b"1", None))
    assert tier.delete_pattern("user:?") == 2
    assert tier.get("user:10") is not None
    assert tier.delete_pattern("a\\*b") == 1
    assert tier.delete_pattern("nothing*") == 0
    assert sorted(k for k in ("user:10", "users") if tier.get(k)) == ["user:10", "users"]


def test_metrics_follow_the_contents() -> None:
    tier, _, metrics = make()
    tier.set("a", Entry(b"12345", None))
    assert metrics.registry.get_sample_value("tiercache_tier_entries", {"tier": "memory"}) == 1
    assert metrics.registry.get_sample_value("tiercache_memory_bytes") == tier.bytes_used
    tier.delete("a")
    assert metrics.registry.get_sample_value("tiercache_tier_entries", {"tier": "memory"}) == 0
