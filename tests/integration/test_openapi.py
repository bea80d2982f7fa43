"""The OpenAPI document (service/openapi.json) is valid, is what the service serves, and is true.

"True" is checked by schemathesis against a live service (`python -m service` over a throwaway
redis-server): every documented operation is fuzzed with schema-valid and schema-invalid input,
and every answer must be a documented status with a documented content type, body and headers.
No 5xx is acceptable.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from openapi_spec_validator import validate
from redis import Redis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from service.app import create_app
from tests.integration.conftest import make_settings
from tests.procs import RedisProcess, ServiceProcess, redis_process

DOCUMENT = Path(__file__).resolve().parents[2] / "service" / "openapi.json"
API = "/api/performance/cache"

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    # Methods a path does not list must answer 405 with `Allow`.
    unsupported_method,
]

schema = schemathesis.openapi.from_path(DOCUMENT)


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return document


def fetch(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service over its own redis-server, shared by every operation's fuzzing run.

    Module-scoped (hence `redis_process()` rather than the per-test `redis_server` fixture): one
    start-up for the whole file instead of one per operation.
    """
    with redis_process() as redis:
        service = ServiceProcess(tmp_path_factory.mktemp("openapi"), REDIS_URL=redis.url).start()
        try:
            yield service
        finally:
            service.stop()


def test_document_is_valid_openapi() -> None:
    document = load_document()
    validate(document)
    assert document["openapi"].startswith("3.")


def test_document_covers_every_route(tmp_path: Path) -> None:
    documented = {
        (path, method.upper())
        for path, item in load_document()["paths"].items()
        for method in item
        if method in {"get", "head", "post", "put", "patch", "delete", "options"}
    }
    app = create_app(make_settings(None, tmp_path / "cache.db"))
    served = {
        (route.resource.canonical, route.method)
        for route in app.router.routes()
        # The catch-all only answers 404 and 405, which the document states in general.
        if route.resource is not None and route.method != "*"
    }
    served_gets = {path for path, method in served if method == "GET"}
    # aiohttp answers HEAD on every GET route; only the cache key's own HEAD is an operation.
    implicit_heads = {(path, "HEAD") for path in served_gets} - {(f"{API}/{{key}}", "HEAD")}
    assert documented == served - implicit_heads
    assert (f"{API}/{{key}}", "HEAD") in documented


def test_cache_routes_and_only_they_take_the_bearer_token() -> None:
    document = load_document()
    bearer = document["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert "security" not in document  # no global requirement: the probes stay open
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path.startswith(API):
                # Optional: required only when the service has tokens configured.
                assert operation["security"] == [{"bearerAuth": []}, {}], (path, method)
                assert "401" in operation["responses"], (path, method)
                assert "429" in operation["responses"], (path, method)
                if method in {"post", "delete"}:
                    assert {"403", "503"} <= operation["responses"].keys(), (path, method)
            else:
                assert "security" not in operation, (path, method)


def test_service_serves_the_document(live_service: ServiceProcess) -> None:
    status, headers, body = fetch(live_service.base_url + "/openapi.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == load_document()


# schemathesis: one parametrized test per documented operation. Its coverage phase adds
# deterministic boundary and negative cases (and undeclared methods) to the Hypothesis examples.
#
# A key of 1024 four-byte characters is 12 KiB percent-encoded: the request line must fit
# (service/__main__.py raises aiohttp's 8190-byte limit) so it gets the API's JSON errors.
@pytest.mark.timeout(60)
@settings(
    max_examples=30,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
)
@schema.parametrize()
def test_live_service_conforms(case: schemathesis.Case, live_service: ServiceProcess) -> None:
    if case.method == "GET" and (case.path_parameters or {}).get("key") == "stats":
        # A negative case (the document excludes the key `stats`): that path is the stats
        # operation, fuzzed and validated as such.
        return
    case.call_and_validate(base_url=live_service.base_url, checks=CHECKS, timeout=10)


# The access-control answers, which the fuzzing run above never sees (it runs without tokens
# or limits), checked against the same document.


def test_auth_and_rate_limit_answers_conform(tmp_path: Path, redis_server: RedisProcess) -> None:
    service = ServiceProcess(
        tmp_path,
        REDIS_URL=redis_server.url,
        CACHE_WRITE_TOKEN="writer-token",
        CACHE_READ_TOKEN="reader-token",
        RATE_LIMIT_PER_SECOND="0.01",
        RATE_LIMIT_BURST="12",
    ).start()
    try:
        writer = {"Authorization": "Bearer writer-token"}
        reader = {"Authorization": "Bearer reader-token"}
        post = schema[API]["POST"]
        get = schema[f"{API}/{{key}}"]["GET"]
        head = schema[f"{API}/{{key}}"]["HEAD"]
        delete = schema[f"{API}/{{key}}"]["DELETE"]
        stats = schema[f"{API}/stats"]["GET"]

        def call(operation: Any, headers: dict[str, str] | None = None, **parts: Any) -> Any:
            case = operation.Case(headers=headers, **parts)
            return case.call_and_validate(base_url=service.base_url, checks=CHECKS, timeout=10)

        # No token, a wrong one, another scheme: 401 with a Bearer challenge.
        for response in (
            call(get, path_parameters={"key": "k"}),
            call(stats, headers={"Authorization": "Bearer nope"}),
            call(
                head,
                headers={"Authorization": "Basic d3JpdGVyLXRva2Vu"},
                path_parameters={"key": "k"},
            ),
            call(post, body={"key": "k", "value": 1}),
        ):
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"][0].startswith("Bearer")
        # A read-only token may read, not write or delete.
        assert call(post, reader, body={"key": "k", "value": 1}).status_code == 403
        assert call(delete, reader, path_parameters={"key": "k"}).status_code == 403
        assert call(post, writer, body={"key": "k", "value": 1}).status_code == 200
        assert call(get, reader, path_parameters={"key": "k"}).status_code == 200
        assert call(delete, writer, path_parameters={"key": "k*"}).status_code == 200
        # The bucket (burst 12, refilling once in 100 s) runs dry: 429 with Retry-After.
        statuses = []
        while len(statuses) < 20 and 429 not in statuses:
            statuses.append(call(get, writer, path_parameters={"key": "k"}).status_code)
        assert statuses[-1] == 429, statuses
        assert set(statuses[:-1]) <= {404}, statuses  # "k*" deleted it
        response = call(head, writer, path_parameters={"key": "k"})
        assert response.status_code == 429
        assert int(response.headers["retry-after"][0]) >= 1
        # The probes stay open whatever the tokens and limits.
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert fetch(service.base_url + path)[0] == 200, path
    finally:
        service.stop()


def test_pattern_matching_every_key_needs_confirmation(live_service: ServiceProcess) -> None:
    delete = schema[f"{API}/{{key}}"]["DELETE"]
    for pattern in ("*", "**"):
        case = delete.Case(path_parameters={"key": pattern})
        response = case.call_and_validate(base_url=live_service.base_url, checks=CHECKS)
        assert response.status_code == 400, response.text
        case = delete.Case(path_parameters={"key": pattern}, query={"confirm": "all"})
        response = case.call_and_validate(base_url=live_service.base_url, checks=CHECKS)
        assert response.status_code == 200, response.text
        assert response.json()["complete"] is True


# A ttl beyond Redis's range (ttl * 1000 + now in ms over 2**63 - 1) once made Redis fail the
# write after half applying it, degrading the whole service: it must be refused or kept whole.
@pytest.mark.parametrize("ttl", [10**15, 2**63 - 1])
def test_a_huge_ttl_is_refused_or_kept_without_degrading(
    tmp_path: Path, redis_server: RedisProcess, ttl: int
) -> None:
    service = ServiceProcess(tmp_path, REDIS_URL=redis_server.url).start()
    try:
        post = schema[API]["POST"].Case(body={"key": "far", "value": "future", "ttl": ttl})
        response = post.call_and_validate(base_url=service.base_url, checks=CHECKS, timeout=10)
        assert response.status_code in {200, 400}, response.text
        _, _, body = fetch(service.base_url + "/health")
        assert json.loads(body)["mode"] == "full", "one request degraded the service"
        if response.status_code == 400:
            return  # refused, nothing changed: fine
        get = schema[f"{API}/{{key}}"]["GET"].Case(path_parameters={"key": "far"})
        response = get.call_and_validate(base_url=service.base_url, checks=CHECKS, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["value"] == "future"
        assert response.json()["ttl"] is not None
        stored_ttl = redis_ttl(redis_server, "cache:far")
        assert stored_ttl > 0, f"Redis holds the key with TTL {stored_ttl} (-1: never expires)"
    finally:
        service.stop()


def redis_ttl(server: RedisProcess, key: str) -> int:
    client = Redis.from_url(server.url)
    try:
        return int(client.ttl(key))
    finally:
        client.close()
