"""Process RSS of the memory tier alone while distinct keys are written past its bound.

Inserts --keys distinct keys (default 1M) with JSON values of about 200 bytes into the real
`service.tiers.memory.MemoryTier`, bounded at --bound-mib (default 64 MiB) and by no useful
entry count, as the harness's `rss` scenario does through the service. A fraction of the
entries (--ttl-fraction) carry a TTL; the clock is simulated at --rate writes per second and
`MemoryTier.expire()` runs every --sweep-seconds of it, as the service's sweeper does.

Prints VmRSS (from /proc/self/status) minus the RSS before the first insert, with the tier's
entry count and bytes_used: when the tier first evicts ("fill"), then every --every keys.
The tier meets the harness's target when RSS - start <= bound + 32 MiB and RSS grows by at
most 10% of the bound after fill. Last, the RSS growth per entry held, less the mean key and
value length: what ENTRY_OVERHEAD_BYTES should be.

glibc raises its mmap threshold when a large block is freed, so the tier's hash table, once
resized, lands in the heap and leaves holes there; MALLOC_MMAP_THRESHOLD_=131072 in the
environment keeps the threshold fixed and separates that from what the tier holds.

    .venv/bin/python bench/memory_tier_rss.py [--keys 1000000] [--bound-mib 64]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.metrics import Metrics
from service.tiers.base import Entry
from service.tiers.memory import ENTRY_OVERHEAD_BYTES, MemoryTier

MiB = 1024 * 1024


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--bound-mib", type=int, default=64)
    p.add_argument("--value-bytes", type=int, default=200)
    p.add_argument("--ttl-fraction", type=float, default=0.1)
    p.add_argument("--rate", type=float, default=4000.0, help="simulated writes per second")
    p.add_argument("--sweep-seconds", type=float, default=60.0)
    p.add_argument("--every", type=int, default=200_000)
    args = p.parse_args()

    now = [1_000_000.0]
    metrics = Metrics()
    bound = args.bound_mib * MiB
    tier = MemoryTier(metrics, 100_000_000, bound, clock=lambda: now[0])
    rng = random.Random(1)
    pad = "x" * (args.value_bytes - 30)
    next_sweep = now[0] + args.sweep_seconds
    start = rss()
    filled = False
    print(
        f"bound {args.bound_mib} MiB, ENTRY_OVERHEAD_BYTES {ENTRY_OVERHEAD_BYTES}, "
        f"start RSS {start / MiB:.1f} MiB"
    )
    print(f"{'keys':>9} {'point':>6} {'RSS-start MiB':>13} {'entries':>8} {'bytes_used MiB':>14}")

    def report(n: int, label: str) -> None:
        print(
            f"{n:>9,} {label:>6} {(rss() - start) / MiB:>+13.1f} {len(tier):>8,} "
            f"{tier.bytes_used / MiB:>14.1f}",
            flush=True,
        )

    t0 = time.perf_counter()
    for i in range(1, args.keys + 1):
        now[0] += 1 / args.rate
        # As service/routes.py does: the JSON encoding copied to its exact size.
        raw = bytes(memoryview(orjson.dumps({"n": i, "pad": pad})))
        ttl = rng.uniform(30, 600) if rng.random() < args.ttl_fraction else None
        tier.set(f"rss-{i}", Entry(raw, None if ttl is None else now[0] + ttl, i))
        if now[0] >= next_sweep:
            tier.expire()
            next_sweep += args.sweep_seconds
        if not filled and metrics.registry.get_sample_value("tiercache_memory_evictions_total"):
            filled = True
            report(i, "fill")
        if i % args.every == 0:
            report(i, "")
    print(f"{args.keys / (time.perf_counter() - t0):,.0f} inserts/s")
    # What an entry really costs beyond its key and value, were all of RSS's growth the tier's.
    held = len(tier)
    key_and_value = tier.bytes_used / held - ENTRY_OVERHEAD_BYTES
    print(
        f"RSS growth per entry held: {(rss() - start) / held:.0f} B, of which key + value "
        f"{key_and_value:.0f} B: overhead {(rss() - start) / held - key_and_value:.0f} B "
        f"(ENTRY_OVERHEAD_BYTES is {ENTRY_OVERHEAD_BYTES})"
    )


if __name__ == "__main__":
    main()
