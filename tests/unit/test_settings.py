"""Settings: defaults, REDIS_URL precedence, secrets kept out of output, clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, describe_error

ROOT = Path(__file__).resolve().parents[2]


def settings(**env: str) -> Settings:
    old = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings(_env_file=None)
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_defaults_match_the_documented_ones() -> None:
    s = settings()
    assert s.redis_connection_url() == "redis://localhost:6379/0"
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.cache_key_prefix == "cache:"
    assert s.redis_socket_timeout_seconds <= 0.25
    assert s.redis_connect_timeout_seconds <= 0.25
    assert s.cache_max_value_bytes == 1024 * 1024


def test_parts_build_the_url_with_an_escaped_password() -> None:
    s = settings(REDIS_HOST="cache.internal", REDIS_PORT="6380", REDIS_DB="3",
                 REDIS_PASSWORD="p@ss/word")  # fmt: skip
    assert s.redis_connection_url() == "redis://:p%40ss%2Fword@cache.internal:6380/3"
    assert "p@ss" not in s.redis_display()
    assert "p%40ss" not in s.redis_display()
    assert "p@ss" not in repr(s)


def test_redis_url_wins_and_is_displayed_without_password() -> None:
    s = settings(REDIS_HOST="ignored", REDIS_URL="rediss://user:secret@tls.example:6390/2")
    assert s.redis_connection_url() == "rediss://user:secret@tls.example:6390/2"
    assert s.redis_display() == "rediss://tls.example:6390/2"
    unix = settings(REDIS_URL="unix:///run/redis.sock")
    assert unix.redis_display() == "unix:///run/redis.sock"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"REDIS_PORT": "not-a-port"}, "REDIS_PORT"),
        ({"REDIS_PORT": "70000"}, "REDIS_PORT"),
        ({"REDIS_URL": "http://nope"}, "REDIS_URL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"CACHE_MAX_VALUE_BYTES": "0"}, "CACHE_MAX_VALUE_BYTES"),
        ({"RECONNECT_BACKOFF_BASE_SECONDS": "5", "RECONNECT_BACKOFF_CAP_SECONDS": "1"},
         "RECONNECT_BACKOFF_CAP_SECONDS"),
    ],
)  # fmt: skip
def test_invalid_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(**env)
    line = describe_error(caught.value)
    assert "\n" not in line
    assert names in line


def test_a_bad_redis_url_never_echoes_its_secret() -> None:
    with pytest.raises(ValidationError) as caught:
        settings(REDIS_URL="http://user:hunter2@host")
    assert "hunter2" not in describe_error(caught.value)


def start_service(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m service` with these settings until it exits (these tests expect it to)."""
    return subprocess.run(
        [sys.executable, "-m", "service"], cwd=cwd, env={**os.environ, **env},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def cannot_start_event(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The one log event of a start-up that failed cleanly: exit 1, no traceback."""
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    event: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    assert event["event"] == "cannot start"
    return event


def test_the_service_refuses_to_start_with_one_clear_line(tmp_path: Path) -> None:
    result = start_service(tmp_path, REDIS_PORT="banana", CACHE_DB_PATH=str(tmp_path / "x.db"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("invalid setting REDIS_PORT")
    assert "integer" in lines[0]
    assert not (tmp_path / "x.db").exists()


def test_the_example_env_file_is_valid_and_documents_every_setting() -> None:
    example = ROOT / "config" / "example.env"
    parsed = Settings(_env_file=example)
    assert parsed.redis_connection_url() == "redis://localhost:6379/0"
    documented = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in example.read_text().splitlines()
        if "=" in line and line.lstrip("# ")[:1].isupper()
    }
    assert {name.upper() for name in Settings.model_fields} <= documented


def test_a_sqlite_file_that_cannot_be_opened_stops_start_up_with_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")
    result = start_service(
        tmp_path, REDIS_PORT="1", HTTP_PORT="0", LOG_FORMAT="json",
        CACHE_DB_PATH=str(tmp_path / "file" / "x.db"),
    )  # fmt: skip
    assert "cannot open the SQLite file" in cannot_start_event(result)["error"]


def test_an_http_port_in_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = start_service(
            tmp_path, REDIS_PORT="1", LOG_FORMAT="json",
            HTTP_PORT=str(taken.getsockname()[1]), CACHE_DB_PATH=str(tmp_path / "x.db"),
        )  # fmt: skip
    assert "address already in use" in cannot_start_event(result)["error"]
