"""The memory tier: bounds by entries and bytes, LRU eviction, TTL, glob deletes."""

from __future__ import annotations

import pytest

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
    per_entry = len("k0") + 100 + ENTRY_OVERHEAD_BYTES
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


def test_an_expired_entry_found_by_a_read_is_dropped() -> None:
    tier, clock, metrics = make()
    tier.set("a", Entry(b"1", clock.now + 10))
    tier.set("b", Entry(b"2", clock.now + 10))
    tier.set("c", Entry(b"3", None))
    clock.now += 10  # expiry is exclusive: at expires_at the entry is gone
    assert tier.get("a") is None
    assert len(tier) == 2
    assert not tier.contains("b")
    assert len(tier) == 1
    assert tier.bytes_used == len("c") + 1 + ENTRY_OVERHEAD_BYTES
    assert metrics.registry.get_sample_value("tiercache_tier_entries", {"tier": "memory"}) == 1
    assert metrics.registry.get_sample_value("tiercache_memory_bytes") == tier.bytes_used
    assert evictions(metrics) == 0  # expiry is not an eviction


def test_expire_drops_expired_entries_only() -> None:
    tier, clock, metrics = make()
    for i in range(10):
        tier.set(f"t{i}", Entry(b"x", clock.now + 1 + i))
        tier.set(f"n{i}", Entry(b"x", None))
    clock.now += 5.5
    tier.expire()
    assert len(tier) == 15
    assert sorted(k for k in (f"t{i}" for i in range(10)) if tier.contains(k)) == [
        f"t{i}" for i in range(5, 10)
    ]
    assert tier.bytes_used == 15 * (2 + 1 + ENTRY_OVERHEAD_BYTES)
    assert metrics.registry.get_sample_value("tiercache_tier_entries", {"tier": "memory"}) == 15
    assert metrics.registry.get_sample_value("tiercache_memory_bytes") == tier.bytes_used


def test_expired_entries_are_not_counted_by_deletes_or_invalidated() -> None:
    tier, clock, _ = make()
    tier.set("user:1", Entry(b"1", clock.now + 1, version=1))
    tier.set("user:2", Entry(b"1", None, version=1))
    tier.set("gone", Entry(b"1", clock.now + 1, version=1))
    tier.set("old", Entry(b"1", clock.now + 1, version=1))
    clock.now += 2
    assert tier.delete_pattern("user:*") == 1
    assert tier.delete("gone") == 0
    assert tier.invalidate("old", below=5) == 0
    assert len(tier) == 1  # user:1, expired, is left for expire()
    tier.expire()
    assert len(tier) == 0
    assert tier.bytes_used == 0


def test_reads_refresh_recency_but_contains_does_not() -> None:
    tier, _, _ = make(max_entries=3)
    for key in "abc":
        tier.set(key, Entry(b"x", None))
    assert tier.contains("a")  # a stays the least recently used
    tier.get("b")
    tier.set("d", Entry(b"x", None))  # evicts a
    tier.set("e", Entry(b"x", None))  # evicts c
    assert [k for k in "abcde" if tier.contains(k)] == ["b", "d", "e"]


def test_overwrite_accounts_bytes_and_refreshes_recency() -> None:
    per_entry = 1 + 100 + ENTRY_OVERHEAD_BYTES
    tier, _, metrics = make(max_bytes=per_entry * 3)
    for key in "abc":
        tier.set(key, Entry(b"v" * 100, None))
    tier.set("a", Entry(b"w" * 50, None))  # smaller, and now the most recently used
    assert tier.bytes_used == 3 * per_entry - 50
    assert evictions(metrics) == 0
    tier.set("a", Entry(b"w" * 150, None))  # 50 more than fit: b, the least recent, goes
    assert [k for k in "abc" if tier.contains(k)] == ["a", "c"]
    assert tier.bytes_used == 2 * per_entry + 50
    assert evictions(metrics) == 1


@pytest.mark.parametrize(("max_entries", "max_bytes"), [(7, 10**9), (10**9, 7_000), (20, 5_000)])
def test_both_bounds_hold_under_churn(max_entries: int, max_bytes: int) -> None:
    tier, clock, metrics = make(max_entries=max_entries, max_bytes=max_bytes)
    expected = 0
    for i in range(500):
        key = f"key{i % 37}:{i}"
        entry = Entry(b"v" * (i % 300), clock.now + 3 if i % 4 == 0 else None)
        tier.set(key, entry)
        expected += len(key) + len(entry.raw) + ENTRY_OVERHEAD_BYTES
        if i % 50 == 0:
            clock.now += 1
            tier.expire()
        assert len(tier) <= max_entries
        assert tier.bytes_used <= max_bytes
        assert tier.get(key) == entry  # the newest write is always held
    assert evictions(metrics) > 0
    held = [k for k in (f"key{i % 37}:{i}" for i in range(500)) if tier.contains(k)]
    assert len(held) == len(tier)


def test_key_length_counts_towards_the_byte_bound() -> None:
    tier, _, _ = make(max_bytes=1_000 + ENTRY_OVERHEAD_BYTES)
    tier.set("k" * 600, Entry(b"v" * 400, None))
    assert len(tier) == 1
    tier.set("k" * 601, Entry(b"v" * 400, None))  # one byte too big to hold at all
    assert tier.get("k" * 601) is None
    assert tier.get("k" * 600) is not None  # nothing was evicted for it
