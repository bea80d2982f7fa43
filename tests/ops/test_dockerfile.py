"""The image and the compose stack, checked without a Docker engine.

hadolint lints the Dockerfile; the rest parses the Dockerfile and docker-compose.yml and checks
that what they refer to exists and fits together (ports, paths, mounts, service names).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.ops.promql import CONFIG, GRAFANA, GRAFANA_DATASOURCES, REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"

SERVICES = {"redis", "tiercache-1", "tiercache-2", "prometheus", "grafana"}
INSTANCES = ("tiercache-1", "tiercache-2")


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _single(instruction: str) -> str:
    found = [args for ins, args in dockerfile_instructions() if ins == instruction]
    assert found, f"no {instruction} in the Dockerfile"
    return found[-1]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON array) form: {args}"
    assert all(isinstance(part, str) for part in value), args
    return value


def _healthcheck_command() -> list[str]:
    args = _single("HEALTHCHECK")
    words = shlex.split(args.split("CMD", 1)[0])
    assert all(w.startswith("--") for w in words), f"unexpected HEALTHCHECK options: {args}"
    options = dict(w[2:].split("=", 1) for w in words)
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys(), options
    return _exec_form(args.split("CMD", 1)[1].strip())


def test_hadolint_is_clean(hadolint: str) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", "Dockerfile"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout or "[]") == [], result.stdout


def test_dockerfile_base_user_ports_and_command() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) == 1
    assert froms[0].split()[0].startswith("python:3.11"), froms
    assert "slim" in froms[0], froms

    user = _single("USER").split(":")[0]
    assert user not in {"root", "0", ""}, f"runs as {user!r}"
    # USER comes after the last RUN, so nothing runs as root in the final image's entrypoint.
    names = [ins for ins, _ in instructions]
    assert len(names) - names[::-1].index("USER") > len(names) - names[::-1].index("RUN")

    assert _exec_form(_single("CMD")) == ["python", "-m", "service"]
    assert "8080" in _single("EXPOSE").split()
    envs = " ".join(args for ins, args in instructions if ins == "ENV")
    assert "HTTP_HOST=0.0.0.0" in envs
    assert "HTTP_PORT=8080" in envs
    assert "/app/data" in _single("VOLUME")
    assert _single("WORKDIR") == "/app"


def test_dockerfile_installs_the_package_without_pip_cache() -> None:
    runs = " ".join(args for ins, args in dockerfile_instructions() if ins == "RUN")
    assert "pip install --no-cache-dir ." in runs, runs
    assert "apt-get" not in runs, "the slim base needs no system packages"


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        parts = PurePosixPath(relative).parts
        if fnmatch.fnmatch(relative, pattern) or any(fnmatch.fnmatch(p, bare) for p in parts):
            return True
    return False


def test_copy_sources_exist_and_are_not_dockerignored() -> None:
    patterns = _dockerignore_patterns()
    for excluded in (".git", ".venv", "tests", "data", ".env"):
        assert _ignored(excluded, patterns), f"{excluded} would be sent to the build context"
    copies = [args for ins, args in dockerfile_instructions() if ins == "COPY"]
    assert copies
    sources: list[str] = []
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        sources.extend(words[:-1])
    for source in sources:
        matches = list(REPO.glob(source))
        if "*" in source:
            continue  # optional by design (README.md*); the package sources are checked below
        assert matches, f"COPY source {source} does not exist"
        assert not _ignored(source, patterns), f"COPY source {source} is in .dockerignore"
    for needed in ("pyproject.toml", "service", "monitor"):
        assert needed in sources, f"{needed} is not copied into the image"


class _HealthHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def _run_healthcheck(port: int) -> int:
    command = _healthcheck_command()
    assert command[0] == "python", command
    env = {**os.environ, "HTTP_PORT": str(port)}
    result = subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, timeout=20, check=False
    )
    return result.returncode


def test_healthcheck_command_passes_on_200_and_fails_otherwise(
    health_server: HTTPServer,
) -> None:
    """The HEALTHCHECK runs with the stdlib only (slim has no curl) and means what it says."""
    command = _healthcheck_command()
    assert "/health" in " ".join(command)
    port = health_server.server_address[1]
    _HealthHandler.status = 200
    assert _run_healthcheck(port) == 0
    _HealthHandler.status = 503
    try:
        assert _run_healthcheck(port) != 0
    finally:
        _HealthHandler.status = 200


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    with HTTPServer(("127.0.0.1", 0), _HealthHandler) as server:
        port = server.server_address[1]  # closed on exit: nothing listens there afterwards
    assert _run_healthcheck(port) != 0


# --- docker-compose.yml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for short-syntax volume entries."""
    out: dict[str, str] = {}
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"long-syntax volume not expected here: {entry}"
        source, target, *_mode = entry.split(":")
        out[target] = source
    return out


def _is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def test_compose_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    assert services["redis"]["image"] == "redis:7"
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image, f"{name} image not pinned: {image}"
        assert not image.endswith(":latest"), f"{name} image not pinned: {image}"


def test_compose_every_relative_path_exists(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            context = build.get("context", ".")
            dockerfile = build.get("dockerfile", "Dockerfile")
            assert (REPO / context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
            checked += 1
        for source in _mounts(service).values():
            if _is_bind(source):
                assert not source.startswith(("/", "~")), f"{name}: absolute bind mount {source}"
                assert (REPO / source).exists(), f"{name}: mounts {source}, which does not exist"
                checked += 1
            else:
                declared = compose.get("volumes") or {}
                assert source in declared, f"{name}: undeclared volume {source}"
    assert checked >= 6


def test_compose_tiercache_instances(compose: dict[str, Any]) -> None:
    services = compose["services"]
    data_volumes = set()
    for name in INSTANCES:
        service = services[name]
        assert service["build"] == "."
        env = service["environment"]
        assert env["REDIS_HOST"] == "redis"
        assert str(env.get("HTTP_PORT", "8080")) == "8080"  # what prometheus.yml scrapes
        assert env.get("HTTP_HOST", "0.0.0.0") == "0.0.0.0"
        mounts = _mounts(service)
        assert "/app/data" in mounts, f"{name} keeps no data volume"
        assert not _is_bind(mounts["/app/data"])
        data_volumes.add(mounts["/app/data"])
        test = service["healthcheck"]["test"]
        assert test[0] in {"CMD", "CMD-SHELL"}, test
        assert "/health" in " ".join(test), test
        assert "redis" in service["depends_on"]
    assert len(data_volumes) == len(INSTANCES), "the instances share one SQLite volume"


def test_compose_prometheus_gets_its_config_and_alerts(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    mounts = _mounts(service)
    flags: dict[str, str] = {}
    for arg in service["command"]:
        name, _, value = arg.removeprefix("--").partition("=")
        flags[name] = value
    config_path = flags.get("config.file", "/etc/prometheus/prometheus.yml")
    assert mounts[config_path] == "./config/prometheus.yml"

    prometheus_yml = yaml.safe_load((CONFIG / "prometheus.yml").read_text(encoding="utf-8"))
    for rule_file in prometheus_yml["rule_files"]:
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert in_container in mounts, f"{rule_file} is not mounted at {in_container}"
        source = REPO / mounts[in_container]
        assert source.is_file(), source
        assert source.name == "alerts.yml", source

    # The scrape targets are the compose services, on the port they serve.
    targets = {
        target
        for job in prometheus_yml["scrape_configs"]
        if job["job_name"] == "tiercache"
        for sc in job["static_configs"]
        for target in sc["targets"]
    }
    assert targets == {f"{name}:8080" for name in INSTANCES}


def test_compose_grafana_gets_provisioning_and_dashboards(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    mounts = _mounts(service)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (REPO / provisioning).resolve() == (GRAFANA / "provisioning").resolve()
    for sub in ("datasources", "dashboards", "alerting"):
        assert any((REPO / provisioning / sub).glob("*.yml")), f"no {sub} provisioning file"

    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text(encoding="utf-8")
    )["providers"]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounts, f"dashboard provider path {path} is not mounted"
        assert any(Path(REPO / mounts[path]).glob("*.json")), f"no dashboards in {mounts[path]}"

    datasources = yaml.safe_load(GRAFANA_DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    (prometheus,) = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
