"""A real Prometheus scrapes a real service and fires the real TiercacheRedisDown expression.

redis-server, `python -m service` and `prometheus` run as subprocesses on free loopback ports.
Only the rule's `for:` is shortened (and scrape/evaluation run every second), so the alert
fires in seconds; its expression and labels are the ones in config/alerts.yml.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.ops.promql import ALERTS
from tests.procs import RedisProcess, ServiceProcess, free_port, wait_for_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALERT = "TiercacheRedisDown"
FOR = "2s"
DEADLINE_SECONDS = 30.0
POLL_SECONDS = 0.5

T = TypeVar("T")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.load(resp)


def _poll(what: str, check: Callable[[], T | None], logs: list[Path]) -> tuple[T, float]:
    """Call `check` every POLL_SECONDS until it returns non-None; (result, seconds taken)."""
    started = time.monotonic()
    last_error = ""
    while time.monotonic() - started < DEADLINE_SECONDS:
        try:
            result = check()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as error:
            last_error = f"{type(error).__name__}: {error}"
            result = None
        if result is not None:
            return result, time.monotonic() - started
        time.sleep(POLL_SECONDS)
    tails = "\n".join(
        f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}"
        for log in logs
        if log.exists()
    )
    pytest.fail(f"timed out after {DEADLINE_SECONDS}s waiting for {what} ({last_error})\n{tails}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def service(redis_server: RedisProcess, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """`python -m service` against the test's Redis: (HTTP port, log file)."""
    process = ServiceProcess(
        tmp_path, REDIS_URL=redis_server.url, RECONNECT_BACKOFF_CAP_SECONDS="1"
    ).start()
    try:
        yield process.port, process.log
    finally:
        process.stop()


def _rules_file(path: Path) -> dict[str, Any]:
    """The real TiercacheRedisDown rule from config/alerts.yml, with a short `for:`."""
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    fast = copy.deepcopy(rule)
    fast["for"] = FOR
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "e2e", "interval": "1s", "rules": [fast]}]})
    )
    return fast


@pytest.fixture
def prometheus(
    prometheus_bin: str, service: tuple[int, Path], tmp_path: Path
) -> Iterator[tuple[str, dict[str, Any], list[Path]]]:
    """A Prometheus scraping the service every second: (base URL, rule, log files)."""
    service_port, service_log = service
    port = free_port()
    rule = _rules_file(tmp_path / "rules.yml")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": "tiercache",
                "static_configs": [{"targets": [f"127.0.0.1:{service_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=out,
        )
    try:
        wait_for_port(port, timeout=15)
        yield f"http://127.0.0.1:{port}", rule, [log, service_log]
    finally:
        _stop(proc)


def _alert_states(base: str) -> list[dict[str, Any]]:
    data = _get_json(f"{base}/api/v1/alerts")
    assert data["status"] == "success", data
    return [a for a in data["data"]["alerts"] if a["labels"].get("alertname") == ALERT]


def test_redis_down_alert_fires_and_resolves(
    prometheus: tuple[str, dict[str, Any], list[Path]],
    service: tuple[int, Path],
    redis_server: RedisProcess,
) -> None:
    base, rule, logs = prometheus
    service_port, _ = service
    instance = f"127.0.0.1:{service_port}"

    # Prometheus scrapes the service, sees Redis up, and has loaded the rule.
    def scraped_up() -> bool | None:
        data = _get_json(f"{base}/api/v1/query?query=tiercache_redis_up")
        values = [r["value"][1] for r in data["data"]["result"]]
        return True if values == ["1"] else None

    _, t_ready = _poll("Prometheus to scrape tiercache_redis_up == 1", scraped_up, logs)
    rules = _get_json(f"{base}/api/v1/rules")["data"]["groups"][0]["rules"]
    assert [(r["name"], r["query"], r["duration"]) for r in rules] == [
        (ALERT, rule["expr"].strip(), 2)
    ], rules
    assert _alert_states(base) == [], "the alert is active while Redis is up"

    # Redis dies: pending, then firing once `for` has passed.
    redis_server.kill()
    killed = time.monotonic()
    seen_states: list[str] = []

    def firing() -> dict[str, Any] | None:
        alerts = _alert_states(base)
        seen_states.extend(a["state"] for a in alerts)
        return next((a for a in alerts if a["state"] == "firing"), None)

    alert, t_fire = _poll(f"{ALERT} to fire", firing, logs)
    assert t_fire >= 2.0, f"fired {t_fire:.1f}s after the kill, before its for: {FOR} ran out"
    assert alert["labels"] == {
        "alertname": ALERT,
        "instance": instance,
        "job": "tiercache",
        "severity": "critical",
    }
    assert instance in alert["annotations"]["summary"]
    assert float(alert["value"]) == 0.0

    # Redis is back: the monitor reconnects and the alert goes away.
    redis_server.start()
    restarted = time.monotonic()

    def resolved() -> bool | None:
        return True if not _alert_states(base) else None

    _, t_resolve = _poll(f"{ALERT} to resolve", resolved, logs)
    assert time.monotonic() - restarted < DEADLINE_SECONDS
    print(
        f"\nfirst scrape seen after {t_ready:.1f}s; {ALERT} fired {t_fire:.1f}s after the kill "
        f"(for: {FOR}), states seen {sorted(set(seen_states))}; resolved {t_resolve:.1f}s after "
        f"Redis came back ({time.monotonic() - killed:.1f}s outage in all)"
    )
