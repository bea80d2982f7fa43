"""No secret ever reaches a log line: Redis password, API tokens."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.polling import wait_for_mode
from tests.procs import ServiceProcess, redis_process

PASSWORD = "pw-Zq8-never-logged"
TOKEN = "tok-Kx3-never-logged"


async def test_secrets_stay_out_of_the_logs(tmp_path: Path) -> None:
    with redis_process("--requirepass", PASSWORD) as redis:
        service = ServiceProcess(
            tmp_path,
            REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0",
            CACHE_API_TOKEN=TOKEN,
            LOG_LEVEL="DEBUG",
        ).start()
        try:
            async with aiohttp.ClientSession(service.base_url) as http:
                await wait_for_mode(http, "full")
                auth = {"Authorization": f"Bearer {TOKEN}"}
                post = await http.post("/api/performance/cache", json={"key": "k", "value": 1},
                                       headers=auth)  # fmt: skip
                assert post.status == 200
                wrong = await http.get("/api/performance/cache/k",
                                       headers={"Authorization": f"Bearer {TOKEN}x"})  # fmt: skip
                assert wrong.status == 401
                redis.kill()  # errors get logged, with connection details
                await wait_for_mode(http, "degraded")
                await http.get("/api/performance/cache/k", headers=auth)
        finally:
            service.stop()
    log = service.log.read_text()
    assert "Redis not available" in log, "the test must see real error logging"
    assert "starting" in log
    assert '"stopped"' in log, "a SIGTERM ends with a clean shutdown"
    assert PASSWORD not in log
    assert TOKEN not in log
