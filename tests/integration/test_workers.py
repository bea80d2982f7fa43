"""Several worker processes on one port: all serve, metrics add up across them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.polling import poll
from tests.procs import RedisProcess, ServiceProcess

pytestmark = pytest.mark.slow

REQUESTS = 40


def requests_total(text: str, operation: str, outcome: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tiercache_requests_total" and sample.labels == {
                "operation": operation, "outcome": outcome,
            }:  # fmt: skip
                return sample.value
    return 0.0


async def test_two_workers_share_the_port_and_the_metrics(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    service = ServiceProcess(tmp_path, REDIS_URL=redis_server.url, WORKERS="2").start()
    try:
        # A new connection per request, so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(service.base_url, connector=connector) as http:

            async def pids() -> set[int]:
                seen = set()
                for _ in range(20):
                    body = await (await http.get("/health")).json()
                    if body["mode"] == "full":
                        seen.add(body["pid"])
                return seen

            assert len(await poll(pids, lambda p: len(p) == 2, within=15)) == 2
            for i in range(REQUESTS):
                response = await http.post(
                    "/api/performance/cache", json={"key": f"k{i}", "value": i}
                )
                assert response.status == 200
            for i in range(REQUESTS):
                body = await (await http.get(f"/api/performance/cache/k{i}")).json()
                assert body["value"] == i  # written by either worker, read by either
            for _ in range(4):  # whichever worker answers the scrape, the sums are whole
                text = await (await http.get("/metrics")).text()
                assert requests_total(text, "set", "ok") == REQUESTS
                assert requests_total(text, "get", "hit") == REQUESTS
                assert 'tiercache_redis_up{pid="' in text
        files = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.glob("cache-w*")))
        assert {"cache-w0.db", "cache-w1.db"} <= set(files)
    finally:
        service.stop()
    assert service.log.read_text().count("worker started") == 2
