"""Redis Cluster: keys spread over slots, pattern deletes reach every primary, failover."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from tests.integration.conftest import ServiceFactory
from tests.load import SteadyLoad
from tests.polling import mode_of, wait_for_mode
from tests.procs import RedisProcess, free_cluster_port, require_binary

pytestmark = pytest.mark.slow

API = "/api/performance/cache"
PRIMARIES = 3


def redis_cli(port: int, *args: str) -> str:
    result = subprocess.run(
        [require_binary("redis-cli"), "-p", str(port), *args],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    return result.stdout


def cluster_ok(port: int) -> bool:
    return "cluster_state:ok" in redis_cli(port, "cluster", "info")


def converged(nodes: list[RedisProcess]) -> bool:
    """Every node sees three primaries and three replicas, and every replica is in sync:
    until then a killed primary may have no replica able to take over."""
    for node in nodes:
        if not cluster_ok(node.port):
            return False
        roles = [line.split()[2] for line in redis_cli(node.port, "cluster", "nodes").splitlines()]
        if sorted(r.removeprefix("myself,") for r in roles) != ["master"] * 3 + ["slave"] * 3:
            return False
        info = redis_cli(node.port, "info", "replication")
        if "role:slave" in info and "master_link_status:up" not in info:
            return False
    return True


def failed_over(survivors: list[RedisProcess], victim: RedisProcess) -> bool:
    """Every survivor marks the victim failed and serves all slots again: a replica took over
    (right after the kill the cluster still reports ok, before it has noticed)."""
    for node in survivors:
        lines = redis_cli(node.port, "cluster", "nodes").splitlines()
        victim_line = next(line for line in lines if f":{victim.port}@" in line)
        if "fail" not in victim_line.split()[2].split(",") or not cluster_ok(node.port):
            return False
    return True


@pytest.fixture
def cluster() -> Iterator[list[RedisProcess]]:
    """Three primaries, each with a replica, failure detection tuned to 1 s."""
    nodes = [
        RedisProcess(
            free_cluster_port(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            # Replicas sync at once instead of after Redis's default 5 s wait for others.
            "--repl-diskless-sync-delay", "0",
        ).start()
        for _ in range(2 * PRIMARIES)
    ]  # fmt: skip
    try:
        subprocess.run(
            [require_binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not converged(nodes):
            assert time.monotonic() < deadline, "cluster did not converge"
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def primary_of(nodes: list[RedisProcess], key: str) -> int:
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", nodes[0].port)])
    try:
        await client.initialize()
        node = client.get_node_from_key(key)
        assert node is not None
        return int(node.port)
    finally:
        await client.aclose()


def cluster_settings(nodes: list[RedisProcess]) -> dict[str, Any]:
    return {"redis_url": None,
            "redis_cluster_nodes": ",".join(f"127.0.0.1:{n.port}" for n in nodes[:2])}  # fmt: skip


async def test_keys_across_slots_and_pattern_deletes_on_every_primary(
    make_service: ServiceFactory, cluster: list[RedisProcess]
) -> None:
    client = await make_service(None, **cluster_settings(cluster))
    await wait_for_mode(client, "full")
    keys = [f"user:{i}" for i in range(60)] + [f"other:{i}" for i in range(10)]
    for key in keys:
        assert (await client.post(API, json={"key": key, "value": key})).status == 200
    homes = {await primary_of(cluster, f"cache:{key}") for key in keys}
    assert len(homes) == PRIMARIES, "the keys must spread over every primary"
    for key in keys[::7]:
        body = await (await client.get(f"{API}/{quote(key)}")).json()
        assert (body["tier"], body["value"]) == ("redis", key)

    body = await (await client.delete(f"{API}/user:*")).json()
    assert body["deleted"] == {"redis": 60, "memory": 60, "database": 60}
    assert body["complete"] is True
    assert (await client.get(f"{API}/user:5")).status == 404
    assert (await (await client.get(f"{API}/other:5")).json())["tier"] == "redis"
    stats = await (await client.get(f"{API}/stats")).json()
    assert stats["redis"]["server"]["totalCommands"] > 0
    assert await mode_of(client) == "full"


async def test_a_primary_failing_over_loses_no_request(
    make_service: ServiceFactory, cluster: list[RedisProcess]
) -> None:
    client = await make_service(None, **cluster_settings(cluster))
    await wait_for_mode(client, "full")
    for i in range(30):
        await client.post(API, json={"key": f"k{i}", "value": i})
    victim_port = await primary_of(cluster, "cache:k0")
    victim = next(n for n in cluster if n.port == victim_port)

    async with SteadyLoad(client, workers=3) as load:
        await asyncio.sleep(0.3)
        victim.kill()
        survivors = [n for n in cluster if n is not victim]
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(failed_over, survivors, victim):
            assert time.monotonic() < deadline, "the replica was not promoted"
            await asyncio.sleep(0.2)
        await wait_for_mode(client, "full", within=15)
        await asyncio.sleep(0.3)
    assert not load.failures, load.failures[:5]
    assert load.served > 50
    for i in range(30):
        body = await (await client.get(f"{API}/k{i}")).json()
        assert body["value"] == i
