"""Redis over TLS (with a client certificate) as an ACL user, against a real redis-server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.integration.conftest import ServiceFactory
from tests.polling import wait_for_mode
from tests.procs import RedisProcess, free_port, require_binary

USER, PASSWORD = "cache-svc", "acl-pw-3k9"


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    openssl = require_binary("openssl")
    files = {name: directory / name for name in (
        "ca.key", "ca.crt", "server.key", "server.csr", "server.crt",
        "client.key", "client.csr", "client.crt", "san.ext",
    )}  # fmt: skip

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(files["ca.key"]), "-out", str(files["ca.crt"]))  # fmt: skip
    files["san.ext"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", str(files[f"{who}.key"]), "-out", str(files[f"{who}.csr"]))  # fmt: skip
        run("x509", "-req", "-in", str(files[f"{who}.csr"]), "-CA", str(files["ca.crt"]),
            "-CAkey", str(files["ca.key"]), "-CAcreateserial", "-days", "1",
            "-extfile", str(files["san.ext"]), "-out", str(files[f"{who}.crt"]))  # fmt: skip
    return files


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisProcess, int, dict[str, Path]]]:
    certs = make_certificates(tmp_path)
    tls_port = free_port()
    server = RedisProcess(
        None,
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certs["server.crt"]),
        "--tls-key-file", str(certs["server.key"]),
        "--tls-ca-cert-file", str(certs["ca.crt"]),
        "--tls-auth-clients", "yes",
        # Only our user, and only our keys: the service must live within that.
        "--user", "default", "off",
        "--user", USER, "on", f">{PASSWORD}", "~cache:*", "~tiercache-internal:*", "+@all",
    ).start()  # fmt: skip
    try:
        yield server, tls_port, certs
    finally:
        server.stop()


async def tls_service(
    make_service: ServiceFactory, tls_port: int, certs: dict[str, Path], password: str
) -> Any:
    """The app on the TLS port as the ACL user, presenting the client certificate."""
    return await make_service(
        None,
        redis_url=f"rediss://{USER}:{password}@127.0.0.1:{tls_port}/0",
        redis_tls_ca_file=certs["ca.crt"],
        redis_tls_cert_file=certs["client.crt"],
        redis_tls_key_file=certs["client.key"],
    )


async def test_tls_with_client_certificate_and_acl_user(
    make_service: ServiceFactory, tls_redis: tuple[RedisProcess, int, dict[str, Path]]
) -> None:
    _, tls_port, certs = tls_redis
    client = await tls_service(make_service, tls_port, certs, PASSWORD)
    await wait_for_mode(client, "full", within=5)
    assert (
        await client.post("/api/performance/cache", json={"key": "t", "value": [1]})
    ).status == 200
    body = await (await client.get("/api/performance/cache/t")).json()
    assert (body["tier"], body["value"]) == ("redis", [1])
    assert (await client.delete("/api/performance/cache/t*")).status == 200

    direct = aioredis.Redis(
        host="127.0.0.1", port=tls_port, username=USER, password=PASSWORD, ssl=True,
        ssl_ca_certs=str(certs["ca.crt"]), ssl_certfile=str(certs["client.crt"]),
        ssl_keyfile=str(certs["client.key"]),
    )  # fmt: skip
    try:
        await client.post("/api/performance/cache", json={"key": "u", "value": {"a": 1}})
        assert json.loads(await direct.hget("cache:u", "val")) == {"a": 1}
        assert not await direct.hexists("cache:t", "val")  # deleted: a tombstone at most
    finally:
        await direct.aclose()


async def test_a_wrong_password_keeps_the_service_degraded_but_serving(
    make_service: ServiceFactory, tls_redis: tuple[RedisProcess, int, dict[str, Path]]
) -> None:
    _, tls_port, certs = tls_redis
    client = await tls_service(make_service, tls_port, certs, "wrong")
    assert (await (await client.get("/health")).json())["mode"] == "degraded"
    assert (
        await client.post("/api/performance/cache", json={"key": "d", "value": 1})
    ).status == 200
    assert (await (await client.get("/api/performance/cache/d")).json())["tier"] == "memory"
