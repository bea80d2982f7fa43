#!/usr/bin/env python3
"""tiercache benchmark harness: the service against real baselines, side by side, in one run.

    .venv/bin/python bench/run.py                 # full run (~15 min on 2 cores)
    .venv/bin/python bench/run.py --quick         # 1 round, short runs, scaled-down phases
    .venv/bin/python bench/run.py --scenarios get_redis,get_memory --rounds 5 --duration 10

Everything runs on loopback. Each HTTP server and its own redis-server are pinned to core 0
(`taskset -c 0`), the load generator (wrk -t1 -c32) and this script to core 1. Throughput
configurations are interleaved over rounds (the order rotates every round) and medians are
reported with ratios to "plain" (aiohttp returning a constant) and "naive" (aiohttp +
redis-py). The Redis on 6379 is never used: every redis-server here is started by this
script on a free port and stopped at the end. Results: bench/RESULTS.md (markdown) and
bench/out/results-<stamp>.json (raw). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
LUA = BENCH / "lua"
VENV_PY = ROOT / ".venv" / "bin" / "python"
#: Where the service's code is imported from: the work tree, or a `git archive` of --rev.
SRC = ROOT
SERVER_CORE = "0"
LOAD_CORE = "1"
API = "/api/performance/cache"
KEYS = 10_000  # key space of the throughput scenarios: k1..k10000
CONNECTIONS = 32
MiB = 1024 * 1024

ALL_SCENARIOS = ["get_redis", "get_memory", "get_miss", "post", "delete", "sigstop", "rss"]


def value_json(i: int) -> bytes:
    """The value stored under k<i> everywhere (compact JSON, as orjson writes it)."""
    return b'{"id":%d,"name":"item-%d","tags":["bench","cache"],"score":0.5}' % (i, i)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# Tools


def _apt_install(packages: list[str]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return True
    subprocess.run(["apt-get", "update"], env=env, capture_output=True)
    return subprocess.run(cmd, env=env, capture_output=True).returncode == 0


def ensure_tools(notes: list[str]) -> dict[str, bool]:
    """Install what is missing (apt as root, pip into this venv); report what is there."""
    have: dict[str, bool] = {}
    root = os.geteuid() == 0
    for pkg, binary, required in [
        ("redis-server", "redis-server", True),
        ("redis-tools", "redis-cli", True),
        ("wrk", "wrk", True),
        ("webdis", "webdis", False),
    ]:
        if shutil.which(binary) is None and root:
            log(f"installing {pkg} (apt-get)")
            _apt_install([pkg])
        have[binary] = shutil.which(binary) is not None
        if not have[binary]:
            if required:
                raise SystemExit(
                    f"{binary} is missing and could not be installed "
                    f"(Debian: apt-get install -y {pkg})"
                )
            notes.append(f"{pkg} could not be installed here: its rows are left out.")
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists() and shutil.which("py-spy") is None:
        log("installing py-spy (pip)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "py-spy"], capture_output=True
        )
    have["py-spy"] = spy.exists() or shutil.which("py-spy") is not None
    if not have["py-spy"]:
        notes.append("py-spy could not be installed: missed targets are not profiled.")
    return have


def py_spy() -> str:
    spy = Path(sys.executable).parent / "py-spy"
    return str(spy) if spy.exists() else (shutil.which("py-spy") or "py-spy")


# ------------------------------------------------------------------------------------------
# Processes: everything started here is tracked and stopped here, by pid.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Procs:
    def __init__(self) -> None:
        self.running: dict[int, tuple[str, subprocess.Popen]] = {}

    def start(
        self,
        name: str,
        args: list[str],
        *,
        core: str = SERVER_CORE,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
    ) -> subprocess.Popen:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["taskset", "-c", core, *args],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if log_path:
            out.close()
        self.running[proc.pid] = (name, proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.pid not in self.running:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot exit
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.running.pop(proc.pid, None)

    def stop_all(self) -> None:
        for _, proc in list(self.running.values())[::-1]:
            with contextlib.suppress(Exception):
                self.stop(proc)


PROCS = Procs()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process, all its threads included."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def core_busy_seconds() -> dict[int, float]:
    """Busy (non-idle, non-iowait) CPU seconds per core since boot, from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            busy[int(name[3:])] = (sum(v[:8]) - v[3] - v[4]) / _TICK
    return busy


def _children_cpu() -> float:
    """CPU seconds of this script's finished children (wrk, once it has been waited for)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu_delta(since: float) -> float:
    return time.process_time() - since


def read_syscalls(pid: int | None) -> int:
    """read()-type system calls the process made (Redis reads each client batch with one)."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("syscr:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class RedisServer:
    port: int
    dir: Path
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, name: str) -> RedisServer:
        port = free_port()
        d = workdir / f"redis-{name}"
        d.mkdir(parents=True, exist_ok=True)
        server = cls(port, d)
        server.proc = PROCS.start(f"redis-{name}", [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(d), "--protected-mode", "no",
            "--logfile", str(d / "redis.log"),
        ])  # fmt: skip
        wait_port(port, proc=server.proc)
        deadline = time.monotonic() + 10
        while redis_cli(port, "PING").strip() != "PONG":
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis on {port} does not answer PING")
            time.sleep(0.05)
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            PROCS.stop(self.proc)


def redis_cli(port: int, *args: str) -> str:
    res = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30
    )
    return res.stdout


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def redis_layout(server: Http, redis: RedisServer) -> dict[str, Any]:
    """How the service stores a key in Redis: a string, or a hash (its value field and the
    other fields as it wrote them), found by storing one key through the API."""
    status, _ = http(
        "POST", server.url(API), {"key": "bench-layout-probe", "value": {"probe": True}}
    )
    if status != 200:
        raise RuntimeError(f"POST of the layout probe answered {status}")
    name = "cache:bench-layout-probe"
    kind = redis_cli(redis.port, "TYPE", name).strip()
    layout: dict[str, Any] = {"type": kind, "describe": kind}
    if kind == "hash":
        flat = redis_cli(redis.port, "--no-raw", "HGETALL", name).splitlines()
        values = [re.sub(r'^\s*\d+\) "?|"$', "", x) for x in flat]
        fields = dict(zip(values[::2], values[1::2], strict=False))
        value_field = next(f for f, v in fields.items() if "probe" in v)
        layout["value_field"] = value_field
        layout["other"] = {f: v for f, v in fields.items() if f != value_field}
        layout["describe"] = f"hash, value in field `{value_field}`, other fields {layout['other']}"
    elif kind != "string":
        raise RuntimeError(f"the service stored its probe key as a {kind!r}")
    redis_cli(redis.port, "UNLINK", name)
    return layout


def redis_load(
    port: int,
    pairs: Iterable[tuple[bytes, bytes]],
    chunk: int = 200_000,
    layout: dict[str, Any] | None = None,
) -> int:
    """SET (or HSET, per `layout`) every (name, value) through `redis-cli --pipe`."""
    total = 0
    batch: list[bytes] = []

    def flush() -> None:
        if not batch:
            return
        res = subprocess.run(
            ["taskset", "-c", LOAD_CORE, "redis-cli", "-p", str(port), "--pipe"],
            input=b"".join(batch),
            capture_output=True,
            timeout=300,
        )
        if res.returncode != 0 or b"errors: 0" not in res.stdout:
            raise RuntimeError(f"redis-cli --pipe failed: {res.stdout[-300:]!r}")
        batch.clear()

    extra: list[bytes] = []
    if layout and layout["type"] == "hash":
        for f, v in layout["other"].items():
            extra += [f.encode(), v.encode()]
    for name, value in pairs:
        if layout and layout["type"] == "hash":
            batch.append(resp(b"HSET", name, layout["value_field"].encode(), value, *extra))
        else:
            batch.append(resp(b"SET", name, value))
        total += 1
        if len(batch) >= chunk:
            flush()
    flush()
    return total


def settings_names() -> list[str]:
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from service.settings import Settings  # read-only use of the service's own settings

    return [name.upper() for name in Settings.model_fields]


def settings_default(name: str) -> Any:
    from service.settings import Settings

    return Settings.model_fields[name].default


def archive_source(rev: str, dest: Path) -> Path:
    """The service/ and monitor/ of commit `rev`, extracted into `dest` (a new folder)."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "service", "monitor"],
        capture_output=True,
        check=True,
    ).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=data, check=True)
    return dest


def versions_line(versions: dict[str, Path], rev: str | None) -> str:
    """How an A/B tool's report names the versions it compared."""
    named = ", ".join(f"{k} = {v}" for k, v in versions.items())
    return f"Versions: {named}" + (f" (main is commit {rev})" if rev else "")


def save_report(kind: str, report: str, rows: list[dict[str, Any]]) -> None:
    """Print an A/B tool's report and keep it, with its rows, in bench/out/<kind>-<stamp>."""
    print(report)
    OUT.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (OUT / f"{kind}-{stamp}.md").write_text(report)
    (OUT / f"{kind}-{stamp}.json").write_text(json.dumps(rows, indent=2))


@dataclass
class Http:
    """One HTTP server under test (service or baseline)."""

    name: str
    port: int
    proc: subprocess.Popen
    redis: RedisServer | None = None
    env: dict[str, str] = field(default_factory=dict)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        PROCS.stop(self.proc)
        if self.redis is not None:
            self.redis.stop()


def start_service(
    workdir: Path,
    name: str,
    redis_url: str,
    src: Path | None = None,
    *,
    wrapper: Sequence[str] = (),
    ready_timeout: float = 20.0,
    **env_extra: str,
) -> Http:
    """The service on a free port, ready; `wrapper` runs it under another command (valgrind)."""
    port = free_port()
    d = workdir / f"svc-{name}"
    d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in settings_names()}
    env.update({
        "PYTHONPATH": str(src or SRC),
        "REDIS_URL": redis_url,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "CACHE_DB_PATH": str(d / "cache.db"),
        "CACHE_KEY_PREFIX": "cache:",
        "LOG_LEVEL": "INFO",
        **env_extra,
    })  # fmt: skip
    # cwd is the instance's own folder, so no stray ./.env of the repo is read.
    proc = PROCS.start(
        f"service-{name}",
        [*wrapper, sys.executable, "-m", "service"],
        env=env,
        cwd=d,
        log_path=d / "service.log",
    )
    wait_port(port, ready_timeout, proc=proc)
    server = Http(name, port, proc, env={k: v for k, v in env.items() if k in settings_names()})
    deadline = time.monotonic() + ready_timeout
    while True:
        status, _ = http("GET", server.url("/ready"))
        if status == 200:
            return server
        if time.monotonic() > deadline:
            raise TimeoutError(f"service {name} not ready")
        time.sleep(0.1)


def start_baseline(
    workdir: Path,
    name: str,
    script: str,
    *args: str,
    wrapper: Sequence[str] = (),
    ready_timeout: float = 20.0,
) -> Http:
    port = free_port()
    proc = PROCS.start(
        name,
        [*wrapper, sys.executable, str(BENCH / "baselines" / script), "--port", str(port), *args],
        log_path=workdir / f"{name}.log",
    )
    wait_port(port, ready_timeout, proc=proc)
    return Http(name, port, proc)


def start_webdis(workdir: Path, redis: RedisServer) -> Http:
    port = free_port()
    d = workdir / "webdis"
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "redis_host": "127.0.0.1", "redis_port": redis.port, "redis_auth": None,
        "http_host": "127.0.0.1", "http_port": port, "threads": 2, "pool_size": 20,
        "daemonize": False, "database": 0, "verbosity": 1,
        "logfile": str(d / "webdis.log"), "acl": [{"disabled": ["DEBUG"]}],
    }  # fmt: skip
    (d / "webdis.json").write_text(json.dumps(config, indent=2))
    proc = PROCS.start("webdis", ["webdis", str(d / "webdis.json")], cwd=d)
    wait_port(port, proc=proc)
    return Http("webdis", port, proc, redis)


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


async def _post_many(url: str, bodies: list[dict], concurrency: int = 32) -> int:
    import aiohttp

    queue = list(reversed(bodies))
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while queue:
            body = queue.pop()
            async with session.post(url, json=body) as res:
                await res.read()
                failures += res.status != 200

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failures


def seed_service(server: Http, n: int = KEYS) -> None:
    bodies = [{"key": f"k{i}", "value": json.loads(value_json(i))} for i in range(1, n + 1)]
    failures = asyncio.run(_post_many(server.url(API), bodies))
    if failures:
        raise RuntimeError(f"seeding {server.name}: {failures} POSTs failed")


# ------------------------------------------------------------------------------------------
# wrk


def wrk_command(
    connections: int,
    seconds: float,
    script: str,
    url: str,
    args: Sequence[str],
    timeout_s: float | None = None,
) -> list[str]:
    """wrk pinned to the load core, with a Lua script and its arguments."""
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
           "--latency", "-s", str(LUA / script)]  # fmt: skip
    if timeout_s is not None:
        cmd += ["--timeout", f"{timeout_s}s"]
    return [*cmd, url, "--", *args]


def wrk(
    url: str,
    script: str,
    args: list[str],
    seconds: int,
    *,
    timeout_s: float | None = None,
    connections: int = CONNECTIONS,
    server: Http | None = None,
) -> dict[str, Any]:
    """One wrk run; with `server`, also the CPU time its process and its Redis spent."""
    pids = (
        server.proc.pid if server else None,
        server.redis.proc.pid if server and server.redis and server.redis.proc else None,
    )
    cpu_before = [cpu_seconds(p) for p in pids]
    reads_before = read_syscalls(pids[1])
    cores_before = core_busy_seconds()
    children_before = _children_cpu()
    started_self = time.process_time()
    started = time.monotonic()
    cmd = wrk_command(connections, seconds, script, url, args, timeout_s)
    env = dict(os.environ, BENCH_LUA_DIR=str(LUA))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in res.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data = json.loads(line[len("BENCHJSON ") :])
            data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
            cpu = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
            wall = time.monotonic() - started
            cores = core_busy_seconds()
            server_core = int(SERVER_CORE)
            # CPU time on the server's core that neither the server nor its Redis used:
            # other sessions' work on this shared machine (plus kernel time not charged to
            # either process), as a share of the wall time.
            data["foreign_core0_share"] = max(
                0.0, (cores[server_core] - cores_before[server_core] - sum(cpu)) / wall
            )
            # Same on the load generator's core: what neither wrk nor this script used.
            load_core = int(LOAD_CORE)
            mine = _children_cpu() - children_before + _self_cpu_delta(started_self)
            data["wrk_cpu_share"] = (_children_cpu() - children_before) / wall
            data["foreign_core1_share"] = max(
                0.0, (cores[load_core] - cores_before[load_core] - mine) / wall
            )
            if server is not None and data["requests"]:
                data["cpu_server_s"], data["cpu_redis_s"] = cpu
                data["cpu_us_per_req"] = (cpu[0] + cpu[1]) / data["requests"] * 1e6
                if pids[1] is not None:
                    reads = read_syscalls(pids[1]) - reads_before
                    data["redis_reads"] = reads
                    data["req_per_redis_read"] = data["requests"] / reads if reads else None
            return data
    raise RuntimeError(f"wrk printed no result: {res.stdout[-500:]} {res.stderr[-500:]}")


# ------------------------------------------------------------------------------------------
# Throughput measurements


@dataclass
class Measure:
    name: str
    server: str
    script: str
    args: list[str]
    what: str
    check_path: str = ""  # a GET whose answer proves the configuration serves what it claims
    check: Callable[[int, bytes], bool] | None = None
    base: str = ""  # "" or the server key of its prerequisite


def _tier_is(tier: str) -> Callable[[int, bytes], bool]:
    return lambda status, body: status == 200 and f'"tier":"{tier}"'.encode() in body


def _status_is(code: int) -> Callable[[int, bytes], bool]:
    return lambda status, body: status == code


MEASURES: dict[str, Measure] = {m.name: m for m in [
    Measure("plain", "plain", "get.lua", [f"{API}/k", str(KEYS)],
            "aiohttp handler returning a fixed JSON (stock asyncio loop)",
            f"{API}/k1", _status_is(200)),
    Measure("plain+uvloop", "plain_uv", "get.lua", [f"{API}/k", str(KEYS)],
            "same, on uvloop", f"{API}/k1", _status_is(200)),
    Measure("dict", "dict", "get.lua", [f"{API}/k", str(KEYS)],
            "aiohttp serving from an in-process dict (stock loop)", f"{API}/k1",
            _status_is(200)),
    Measure("naive", "naive", "get.lua", [f"{API}/k", str(KEYS)],
            "aiohttp + redis-py `await redis.get(key)` + json_response, defaults, no hiredis",
            f"{API}/k1", _status_is(200)),
    Measure("naive-fast", "naive_fast", "get.lua", [f"{API}/k", str(KEYS)],
            "naive + hiredis + orjson + uvloop", f"{API}/k1", _status_is(200)),
    Measure("webdis", "webdis", "get.lua", ["/GET/cache:k", str(KEYS)],
            "webdis, C HTTP->Redis gateway (GET /GET/cache:k<i>)", "/GET/cache:k1",
            lambda s, b: s == 200 and b"item-1" in b),
    Measure("service GET (redis hit)", "svc", "get.lua", [f"{API}/k", str(KEYS)],
            "tiercache, full mode: hit served by Redis through the cascade",
            f"{API}/k1", _tier_is("redis")),
    Measure("service GET (memory hit)", "svc_deg", "get.lua", [f"{API}/k", str(KEYS)],
            "tiercache, degraded mode (no Redis): hit served by the memory tier",
            f"{API}/k1", _tier_is("memory")),
    Measure("service GET (near-cache hit)", "svc_near", "get.lua", [f"{API}/k", str(KEYS)],
            "tiercache, full mode with CACHE_READ_MODE=near: hit served by the memory tier "
            "before Redis is asked", f"{API}/k1", _tier_is("memory")),
    Measure("service GET (miss)", "svc", "get.lua", [f"{API}/miss-", str(KEYS)],
            "tiercache, full mode: key in no tier (Redis, memory, SQLite all asked)",
            f"{API}/miss-1", _status_is(404)),
    Measure("naive GET (miss)", "naive", "get.lua", [f"{API}/miss-", str(KEYS)],
            "naive, key absent from Redis (404)", f"{API}/miss-1", _status_is(404)),
    Measure("naive-fast GET (miss)", "naive_fast", "get.lua", [f"{API}/miss-", str(KEYS)],
            "naive-fast, key absent (404)", f"{API}/miss-1", _status_is(404)),
    Measure("service POST", "svc", "post.lua", [API, str(KEYS)],
            "tiercache POST, write-through SQLite (group commit) + memory + Redis",
            f"{API}/k1", _tier_is("redis")),
    Measure("naive POST", "naive", "post.lua", [API, str(KEYS)],
            "naive POST: request.json() + redis.set()", f"{API}/k1", _status_is(200)),
]}  # fmt: skip


@dataclass
class Scenario:
    name: str
    title: str
    rows: list[str]
    plain: str
    naive: str
    note: str = ""


THROUGHPUT_SCENARIOS = {s.name: s for s in [
    Scenario("get_redis", "GET hit served by Redis",
             ["service GET (redis hit)", "plain", "plain+uvloop", "naive", "naive-fast",
              "webdis"], "plain", "naive"),
    Scenario("get_memory", "GET hit served by memory (degraded mode and near-cache mode)",
             ["service GET (memory hit)", "service GET (near-cache hit)", "plain",
              "plain+uvloop", "dict", "naive"],
             "plain", "naive",
             "Degraded mode: REDIS_URL points at a port nothing listens on. Near-cache mode: "
             "the service has its own Redis, in full mode, and reads memory first "
             "(CACHE_READ_MODE=near). Both seeded with the 10k keys by POST."),
    Scenario("get_miss", "GET miss through all tiers",
             ["service GET (miss)", "naive GET (miss)", "naive-fast GET (miss)", "plain"],
             "plain", "naive GET (miss)"),
    Scenario("post", "POST (write-through), against naive GET",
             ["service POST", "naive", "naive POST", "plain"], "plain", "naive",
             "POST bodies write k1..k10000 (random) with the same value GETs read; the "
             "naive reference of the target is naive *GET*."),
]}  # fmt: skip


VARIANT = " [variant]"


def add_variant_measures() -> None:
    """A "[variant]" twin of every service measure, placed right after it in each table.

    Idempotent: a run adds them when it starts and its report asks again."""
    if any(name.endswith(VARIANT) for name in MEASURES):
        return
    for name, m in list(MEASURES.items()):
        if m.server in ("svc", "svc_deg", "svc_near"):
            twin = Measure(**{**asdict(m), "check": m.check})
            twin.name, twin.server = name + VARIANT, m.server + "_b"
            twin.what = m.what + " (variant source)"
            MEASURES[twin.name] = twin
    for sc in THROUGHPUT_SCENARIOS.values():
        rows: list[str] = []
        for name in sc.rows:
            rows.append(name)
            if name + VARIANT in MEASURES:
                rows.append(name + VARIANT)
        sc.rows = rows


@dataclass
class Target:
    name: str
    measured: str
    met: bool | None
    detail: str = ""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rps = [r["rps"] for r in runs]
    lat = [r["latency_us"] for r in runs]
    return {
        "rounds": len(runs),
        "rps_median": median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "rps_rounds": rps,
        "p50_ms": median([x["p50"] for x in lat]) / 1000,
        "p99_ms": median([x["p99"] for x in lat]) / 1000,
        "max_ms": max(x["max"] for x in lat) / 1000,
        "non2xx": sum(r["errors"]["status"] for r in runs),
        "socket_errors": sum(
            r["errors"][k] for r in runs for k in ("connect", "read", "write", "timeout")
        ),
        "requests": sum(r["requests"] for r in runs),
        "cpu_us_per_req": median([r["cpu_us_per_req"] for r in runs if "cpu_us_per_req" in r]),
        "cpu_server_us_per_req": median(
            [
                r["cpu_server_s"] / r["requests"] * 1e6
                for r in runs
                if r.get("requests") and "cpu_server_s" in r
            ]
        ),
        "cpu_redis_us_per_req": median(
            [
                r["cpu_redis_s"] / r["requests"] * 1e6
                for r in runs
                if r.get("requests") and "cpu_redis_s" in r
            ]
        ),
        "req_per_redis_read": median(
            [r["req_per_redis_read"] for r in runs if r.get("req_per_redis_read")]
        ),
        "foreign_core0_share_max": max(
            (r.get("foreign_core0_share", 0.0) for r in runs), default=0.0
        ),
        "foreign_core1_share_max": max(
            (r.get("foreign_core1_share", 0.0) for r in runs), default=0.0
        ),
    }


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}"


def md_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def throughput_table(sc: Scenario, summary: dict[str, dict[str, Any]]) -> str:
    plain = summary.get(sc.plain, {}).get("rps_median")
    naive = summary.get(sc.naive, {}).get("rps_median")
    rows = []
    for name in sc.rows:
        s = summary.get(name)
        if s is None:
            continue

        def ratio(ref: float | None, s: dict[str, Any] = s) -> str:
            return f"{s['rps_median'] / ref:.2f}" if ref else "n/a"

        expected = "404 expected" if "miss" in name else ""
        rows.append([
            f"**{name}**" if name.startswith("service") else name,
            fmt_rps(s["rps_median"]),
            f"{fmt_rps(s['rps_min'])}–{fmt_rps(s['rps_max'])}",
            ratio(plain), ratio(naive),
            f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['max_ms']:.1f}",
            f"{s['non2xx']}" + (f" ({expected})" if expected and s["non2xx"] else ""),
            f"{s['cpu_server_us_per_req']:.0f} + {s['cpu_redis_us_per_req']:.0f}",
            cpu_ratio(s, summary.get(sc.naive)),
            "–" if s["req_per_redis_read"] != s["req_per_redis_read"]
            else f"{s['req_per_redis_read']:.1f}",
            "n/a" if "foreign_core0_share_max" not in s
            else f"{s['foreign_core0_share_max'] * 100:.0f} / "
                 f"{s.get('foreign_core1_share_max', 0) * 100:.0f}",
        ])  # fmt: skip
    return md_table(
        [
            "config",
            "req/s (median)",
            "min–max",
            "× plain",
            f"× {sc.naive}",
            "p50 ms",
            "p99 ms",
            "max ms",
            "non-2xx",
            "CPU µs/req server + redis",
            f"CPU-efficiency × {sc.naive}",
            "req per Redis read",
            f"foreign load % core {SERVER_CORE} / {LOAD_CORE} (max)",
        ],
        rows,
    )


def cpu_ratio(s: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """How many more requests per CPU-second (server + its Redis) than the reference."""
    if not ref or not s.get("cpu_us_per_req") or not ref.get("cpu_us_per_req"):
        return "n/a"
    return f"{ref['cpu_us_per_req'] / s['cpu_us_per_req']:.2f}"


# ------------------------------------------------------------------------------------------
# Profiles (py-spy)


def _short(path: str) -> str:
    """A frame's file relative to the repo (or the archived source), or to site-packages."""
    for base in (str(SRC), str(ROOT)):
        path = path.replace(base + "/", "")
    return path.split("site-packages/")[-1]


def categorize(path: str) -> str:
    """The package a frame's file belongs to (py-spy already shortens site-packages paths)."""
    rel = _short(path)
    if rel.startswith(("service/", "monitor/", "bench/")):
        return "tiercache (" + rel.split("/")[0] + "/)"
    m = re.search(r"/python3\.\d+/(.+)$", rel)
    if m:
        rel = m.group(1)
    top = rel.split("/")[0].removesuffix(".py")
    if top in sys.stdlib_module_names:
        return f"stdlib {top}"
    return top or "?"


#: Frames where a thread waits without using CPU although py-spy samples it as active.
_IDLE_LEAVES = (("_connection_worker_thread", "aiosqlite/core.py"),)  # blocked in tx.get()

#: Self time py-spy attributes to this frame is the event loop's own C code (uvloop: epoll,
#: socket reads and writes, callback dispatch), which has no Python frame of its own.
LOOP_FRAME = "run_app (aiohttp/web.py)"


def summarize_profile(raw_path: Path, seconds: float, rate: int, top: int = 15) -> dict[str, Any]:
    """Self time by function and by package, inclusive time of the service's own frames."""
    self_fn: dict[str, int] = defaultdict(int)
    self_pkg: dict[str, int] = defaultdict(int)
    incl_fn: dict[str, int] = defaultdict(int)
    total = main = idle = 0
    frame_re = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")

    def parse(frame: str) -> tuple[str, str]:
        m = frame_re.match(frame)
        return (m.group(1), m.group(2)) if m else (frame, "")

    for line in raw_path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        func, path = parse(frames[-1])
        if any(func == f and _short(path).endswith(p) for f, p in _IDLE_LEAVES):
            idle += count
            continue
        total += count
        if "run_app" in stack or "service/__main__.py" in stack:
            main += count
        seen = set()
        for frame in frames:
            f, p = parse(frame)
            key = f"{f} ({_short(p)})"
            if key not in seen:
                incl_fn[key] += count
                seen.add(key)
        self_fn[f"{func} ({_short(path)})"] += count
        self_pkg[categorize(path)] += count

    def ranked(d: dict[str, int], n: int) -> list[tuple[str, float]]:
        return [(k, v / total * 100) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    service_incl = {
        k: v
        for k, v in incl_fn.items()
        if k.split("(")[-1].startswith(("service/", "monitor/"))
        and not k.split("(")[-1].startswith("service/__main__")
    }
    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "main_thread_samples": main,
        "main_thread_busy_pct": main / (seconds * rate) * 100,
        "self_by_package": ranked(self_pkg, 12),
        "self_by_function": ranked(self_fn, top),
        "inclusive_service": ranked(service_incl, top),
        "inclusive_all": ranked(incl_fn, 40),
    }


def profile_measure(m: Measure, server: Http, seconds: int, stamp: str) -> dict[str, Any]:
    """py-spy the server while wrk drives the measurement; a raw profile and an SVG."""
    slug = re.sub(r"[^a-z0-9]+", "-", m.name.lower()).strip("-")
    raw = OUT / f"profile-{slug}-{stamp}.txt"
    svg = OUT / f"profile-{slug}-{stamp}.svg"
    result: dict[str, Any] = {
        "measure": m.name,
        "raw": str(raw.relative_to(ROOT)),
        "svg": str(svg.relative_to(ROOT)),
    }
    for fmt, path, secs in (("raw", raw, seconds), ("flamegraph", svg, max(3, seconds // 2))):
        load = subprocess.Popen(
            [
                "taskset",
                "-c",
                LOAD_CORE,
                "wrk",
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{secs + 3}s",
                "-s",
                str(LUA / m.script),
                server.url(),
                "--",
                *m.args,
            ],
            env=dict(os.environ, BENCH_LUA_DIR=str(LUA)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1)
            res = subprocess.run(
                [
                    "taskset",
                    "-c",
                    LOAD_CORE,
                    py_spy(),
                    "record",
                    "-d",
                    str(secs),
                    "-r",
                    "200",
                    "--format",
                    fmt,
                    "-o",
                    str(path),
                    "--pid",
                    str(server.proc.pid),
                ],
                capture_output=True,
                text=True,
                timeout=secs + 60,
            )
            if res.returncode != 0:
                result["error"] = res.stderr[-400:]
        finally:
            try:
                load.wait(secs + 30)
            except subprocess.TimeoutExpired:
                load.kill()
    if raw.exists():
        result.update(summarize_profile(raw, seconds, 200))
    return result


# ------------------------------------------------------------------------------------------
# Rendering: every table is drawn from the results dict, so a report can be redrawn from a
# raw JSON file (--report-from).


def render_throughput(results: dict[str, Any]) -> list[str]:
    summary = results.get("throughput", {}).get("summary", {})
    texts = []
    for sc_name in results.get("scenarios", []):
        sc = THROUGHPUT_SCENARIOS.get(sc_name)
        if sc is None or not summary:
            continue
        table = throughput_table(sc, summary)
        ab = []
        for name in sc.rows:
            a, b = summary.get(name), summary.get(name + VARIANT)
            if a and b:
                ab.append(
                    f"`{name}`: variant / main = {b['rps_median'] / a['rps_median']:.2f}× "
                    f"req/s, {b['cpu_us_per_req'] / a['cpu_us_per_req']:.2f}× CPU per "
                    f"request"
                )
        if ab:
            table += f"\n\nA/B (variant: `{results.get('variant')}`): " + "; ".join(ab) + "."
        texts.append(f"### {sc.title}\n\n" + (f"{sc.note}\n\n" if sc.note else "") + table)
    return texts


def render_profiles(results: dict[str, Any]) -> list[str]:
    texts = []
    for p in results.get("profiles", []):
        if "samples" not in p:
            texts.append(f"### Profile: {p['measure']}\n\npy-spy failed: {p.get('error', '?')}")
            continue
        pkg = md_table(
            ["package (self time)", "% of samples"],
            [[k, f"{v:.1f}"] for k, v in p["self_by_package"]],
        )
        fn = md_table(
            ["function (self time)", "%"],
            [
                [
                    f"`{k}`"
                    + (" = event loop C code (uvloop, syscalls)" if k == LOOP_FRAME else ""),
                    f"{v:.1f}",
                ]
                for k, v in p["self_by_function"]
            ],
        )
        inc = md_table(
            ["tiercache function (inclusive)", "%"],
            [[f"`{k}`", f"{v:.1f}"] for k, v in p["inclusive_service"]],
        )
        texts.append(
            f"### Profile: {p['measure']}\n\n"
            f"py-spy, 200 Hz, {p['samples']} samples of CPU (idle excluded; "
            f"{p['idle_samples_dropped']} samples of aiosqlite worker threads blocked in their "
            f"queue's get() also dropped) while wrk drove the same workload. The event-loop "
            f"thread was busy in {p['main_thread_busy_pct']:.0f}% of the sampling ticks. "
            f"Flame graph: `{p['svg']}`, raw stacks: `{p['raw']}`. Percentages are of the "
            f"samples kept.\n\n{pkg}\n\n{fn}\n\n{inc}"
        )
    return texts


def render_sigstop(results: dict[str, Any]) -> str:
    r = results["sigstop"]
    pause, before, after = r["pause_s"], r.get("before_s", 2), r.get("after_s", 3)
    rows = []
    for name, runs in r["runs"].items():
        rows.append([
            f"**{name}**" if name.startswith("service") else name,
            f"{r['max_ms'][name]:,.1f}",
            f"{median([x['latency_us']['p99'] for x in runs]) / 1000:,.1f}",
            f"{median([x['latency_us']['p50'] for x in runs]) / 1000:,.2f}",
            fmt_rps(median([x["rps"] for x in runs])),
            str(sum(x["errors"]["status"] for x in runs)),
            str(sum(x["errors"]["timeout"] for x in runs)),
        ])  # fmt: skip
    rounds = r.get("rounds") or max(len(v) for v in r["runs"].values())
    return (
        f"### GET while Redis is paused (SIGSTOP)\n\n"
        f"wrk -t1 -c{CONNECTIONS} GETs for {before + pause + after} s; the server's own "
        f"redis-server gets SIGSTOP at t={before} s and SIGCONT {pause} s later; {rounds} "
        f"round(s) each, wrk --timeout {pause + 20}s so no stalled request escapes the latency "
        f"record. Naive keeps redis-py's defaults (5 s socket timeout, then a retry on a fresh "
        f"connection), so its requests wait the pause out; every run is bounded by wrk's "
        f"duration.\n\n"
        + md_table(
            [
                "config",
                "max ms",
                "p99 ms",
                "p50 ms",
                "req/s over the run",
                "non-2xx",
                "wrk timeouts",
            ],
            rows,
        )
    )


def render_delete(results: dict[str, Any]) -> str:
    r = results["delete"]
    pattern = r.get("pattern", "grp3:*")
    rows = [
        [
            f"{x['round'] + 1}",
            f"{x['duration_s']:.2f}",
            ", ".join(f"{k} {v:,}" for k, v in x["response"].get("deleted", {}).items()),
            f"{x['probe_before']['p99_ms']:.2f}",
            f"{x['probe_during']['p50_ms']:.3f}",
            f"{x['probe_during']['p99_ms']:.2f}",
            f"{x['probe_during']['max_ms']:.2f}",
            f"{x['probe_during']['n']:,}",
        ]
        for x in r["runs"]
    ]
    sql_rows = [
        [
            k,
            f"`{v['pattern']}`",
            f"{v['duration_s'] * 1000:,.0f}",
            str(v["response"].get("deleted", {}).get("database", "?")),
        ]
        for k, v in r["sqlite_only"].items()
    ]
    return (
        f"### DELETE of a pattern matching 100k of 1M keys\n\n"
        f"{r['keys_total']:,} keys `grp0..9:item0..99999` written straight into the service's "
        f"Redis (`cache:` prefix, redis-cli --pipe, in the shape the service itself writes: "
        f"{r.get('redis_layout', 'string')}) and into its SQLite file (same schema, "
        f"before start-up; the deleted group is re-loaded between rounds). The memory tier "
        f"holds none of them (writing 1M keys through the API would take minutes here). "
        f"`DELETE {API}/{pattern}` ({r['matching']:,} keys); meanwhile a separate client on "
        f"core {LOAD_CORE} times plain Redis reads of other keys (GET, or HGET of the value "
        f"field for the hash layout) on the same Redis, one at a time, on a raw socket.\n\n"
        + md_table(
            [
                "round",
                "DELETE s",
                "deleted",
                "probe p99 before ms",
                "probe p50 during ms",
                "probe p99 during ms",
                "probe max during ms",
                "probe GETs during",
            ],
            rows,
        )
        + "\n\nSQLite's part alone (a second instance in degraded mode, no Redis, on a copy of "
        "the same 1M rows):\n\n"
        + md_table(["delete", "pattern", "ms", "rows deleted"], sql_rows, "llrr")
    )


def render_rss(results: dict[str, Any]) -> str:
    r = results["rss"]
    bound, idle, series = r["memory_max_bytes"], r["rss_idle"], r["series"]
    target_keys = r.get("target_keys", 1_000_000)
    written = r["keys_written"]
    scaled = (
        ""
        if written >= target_keys
        else (
            f" Scaled down: {written:,} of {target_keys:,} keys written in the "
            f"{r.get('budget_s', '?')} s budget."
        )
    )
    rows = [
        [
            f"{p['keys']:,}",
            f"{p['t']}",
            f"{p['rss'] / MiB:.1f}",
            f"{(p['rss'] - idle) / MiB:+.1f}",
            f"{p['tier_bytes'] / MiB:.1f}",
            f"{p['tier_entries']:,}",
            fmt_rps(p.get("rps", 0)),
            p.get("mode", "?"),
        ]
        for p in thin(series, 16)
    ]
    degraded = [p for p in series if p.get("mode") not in (None, "?", "full")]
    if degraded:
        scaled += (
            f" The service was in mode `{degraded[0]['mode']}` from about "
            f"{degraded[0]['keys']:,} keys written on ({len(degraded)} of "
            f"{len(series) - 1} samples): see the service log lines in the notes."
        )
    return (
        f"### Process RSS with distinct keys written (memory tier at its bound)\n\n"
        f"Service in full mode (own Redis), MEMORY_MAX_BYTES={bound // MiB} MiB, "
        f"MEMORY_MAX_ENTRIES=100,000,000 (so the byte bound is the one that binds), values of "
        f"{r['value_bytes']} bytes, every POST a new key (wrk -c{CONNECTIONS}, "
        f"{r.get('chunk_s', 10)} s chunks). The tier counts each entry as its key and value "
        f"plus a fixed overhead (ENTRY_OVERHEAD_BYTES in service/tiers/memory.py). "
        f"Idle RSS (after start-up and a 1 s warm-up): "
        f"{idle / MiB:.1f} MiB; peak (VmHWM) {r['rss_peak_hwm'] / MiB:.1f} MiB.{scaled}\n\n"
        + md_table(
            [
                "keys written",
                "t s",
                "RSS MiB",
                "RSS − idle MiB",
                "tier bytes MiB",
                "tier entries",
                "POST/s in the chunk",
                "mode",
            ],
            rows,
        )
    )


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [
        [
            t["name"],
            "**met**" if t["met"] else ("**not met**" if t["met"] is False else "?"),
            t["measured"],
            t["detail"],
        ]
        for t in targets
    ]
    return md_table(["target", "verdict", "measured", "rule"], rows, "llll")


def disturbed_warning(results: dict[str, Any]) -> list[str]:
    """A warning above the verdicts when other work shared the cores during the run."""
    shares = {
        core: results.get(key, {}).get("median", 0.0)
        for core, key in ((SERVER_CORE, "foreign_core0_share"), (LOAD_CORE, "foreign_core1_share"))
    }
    busy = {c: v for c, v in shares.items() if v > 0.10}
    if not busy:
        return []
    where = ", ".join(f"core {c}: median {v * 100:.0f}% of the time" for c, v in busy.items())
    return [
        f"**Warning: other processes used the cores during the throughput runs ({where}).** "
        f"The req/s ratios below are disturbed (a starved wrk flatters slow servers "
        f'against fast ones); the "per CPU-second" ratios, from each server\'s own CPU '
        f"time, are the ones to trust in this run.",
        "",
    ]


def render_report(results: dict[str, Any]) -> str:
    if results.get("variant"):
        add_variant_measures()
    sections = render_throughput(results) + render_profiles(results)
    for key, fn in (("sigstop", render_sigstop), ("delete", render_delete), ("rss", render_rss)):
        if key in results:
            sections.append(fn(results))
    machine = results["machine"]
    parts = [
        "# tiercache benchmark results",
        "",
        f"Produced by `.venv/bin/python {results.get('command', 'bench/run.py')}` on "
        f"{machine['date']} ({'quick' if results.get('quick') else 'full'} run: "
        f"{results['rounds']} round(s) of {results['duration_s']} s per throughput "
        f"configuration, interleaved; wrk -t1 -c{results.get('connections', CONNECTIONS)} "
        f"pinned to core {LOAD_CORE}; every server and its own redis-server pinned to core "
        f"{SERVER_CORE}). Raw data: `{results.get('raw_json', '?')}` (not committed). Service "
        f"code: {results.get('source', '?')}. How to run and what each scenario measures: "
        f"[README.md](README.md).",
    ]
    if (BENCH / "FINDINGS.md").exists():
        parts += [
            "",
            "Where the time goes and what to change, from these profiles and an A/B "
            "run: [FINDINGS.md](FINDINGS.md) (hand-written; dated there).",
        ]
    if not results.get("finished", True):
        parts += ["", "**This run did not finish: partial results.**"]
    parts += [
        "",
        "## Machine",
        "",
        md_table(["", ""], [[k, str(v)] for k, v in machine.items()], "ll"),
        "",
        "## Targets (issue 5)",
        "",
        *disturbed_warning(results),
        targets_table(results.get("targets", [])),
        "",
        "## Scenarios",
        "",
        "Ratios are of medians over the rounds; `min–max` is the spread of the rounds; "
        "latencies are wrk's (p50/p99 medians over rounds, max the worst). CPU µs/req is the "
        "CPU time of the server process (all threads) + its redis-server per request; "
        '"foreign load" is the share of each core used by anything else than the server '
        "and its Redis (core 0) or wrk and the harness (core 1) during the run (max over "
        "rounds).",
        "",
        "\n\n".join(sections),
    ]
    if results.get("notes"):
        parts += ["", "## Notes from this run", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------------------
# Phases


#: Service instances whose warnings the scenario provokes on purpose.
_EXPECTED_WARNINGS = {
    "svc-degraded": "expected: started with no Redis",
    "svc-degraded-variant": "expected: started with no Redis",
    "svc-del-sqlite": "expected: started with no Redis",
    "svc-full": "expected if they come from the SIGSTOP scenario, which pauses its Redis",
}


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds or (1 if self.quick else 3)
        self.duration = args.duration or (2 if self.quick else 5)
        self.scenarios = args.scenarios
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.workdir = Path(tempfile.mkdtemp(prefix="tiercache-bench-"))
        self.notes: list[str] = []
        self.results: dict[str, Any] = {
            "stamp": self.stamp,
            "quick": self.quick,
            "rounds": self.rounds,
            "duration_s": self.duration,
            "connections": CONNECTIONS,
            "scenarios": self.scenarios,
        }
        self.targets: list[Target] = []
        self.servers: dict[str, Http] = {}
        self.tools: dict[str, bool] = {}
        self.finished = False
        if args.variant:
            self.results["variant"] = str(Path(args.variant).resolve())
            add_variant_measures()

    # -- throughput ------------------------------------------------------------------------

    def needed_measures(self) -> list[Measure]:
        names: list[str] = []
        for sc in self.scenarios:
            if sc in THROUGHPUT_SCENARIOS:
                names += [n for n in THROUGHPUT_SCENARIOS[sc].rows if n not in names]
        if "sigstop" in self.scenarios:
            names += [n for n in ("service GET (redis hit)", "naive") if n not in names]
        if not self.tools.get("webdis"):
            names = [n for n in names if n != "webdis"]
        return [MEASURES[n] for n in names]

    def start_throughput_servers(self, measures: list[Measure]) -> None:
        wanted = {m.server for m in measures}
        w = self.workdir
        if "svc" in wanted:
            redis = RedisServer.start(w, "svc")
            svc = start_service(w, "full", redis.url)
            svc.redis = redis
            self.servers["svc"] = svc
            log("seeding the service (full mode) with 10k keys via POST")
            seed_service(svc)
        if "svc_deg" in wanted:
            dead = free_port()  # nothing listens there: the service starts degraded
            svc = start_service(w, "degraded", f"redis://127.0.0.1:{dead}/0")
            self.servers["svc_deg"] = svc
            log("seeding the service (degraded mode) with 10k keys via POST")
            seed_service(svc)
        if "svc_near" in wanted:
            redis = RedisServer.start(w, "svc_near")
            svc = start_service(w, "near", redis.url, CACHE_READ_MODE="near")
            svc.redis = redis
            self.servers["svc_near"] = svc
            log("seeding the service (near-cache mode) with 10k keys via POST")
            seed_service(svc)
        variant = Path(self.args.variant).resolve() if self.args.variant else None
        if variant and "svc_b" in wanted:
            redis = RedisServer.start(w, "svc_b")
            svc = start_service(w, "full-variant", redis.url, src=variant)
            svc.redis = redis
            self.servers["svc_b"] = svc
            log("seeding the variant service (full mode)")
            seed_service(svc)
        if variant and "svc_deg_b" in wanted:
            dead = free_port()
            svc = start_service(w, "degraded-variant", f"redis://127.0.0.1:{dead}/0", src=variant)
            self.servers["svc_deg_b"] = svc
            log("seeding the variant service (degraded mode)")
            seed_service(svc)
        if variant and "svc_near_b" in wanted:
            redis = RedisServer.start(w, "svc_near_b")
            svc = start_service(w, "near-variant", redis.url, src=variant, CACHE_READ_MODE="near")
            svc.redis = redis
            self.servers["svc_near_b"] = svc
            log("seeding the variant service (near-cache mode)")
            seed_service(svc)
        if "plain" in wanted:
            self.servers["plain"] = start_baseline(w, "plain", "plain.py")
        if "plain_uv" in wanted:
            self.servers["plain_uv"] = start_baseline(w, "plain_uv", "plain.py", "--uvloop")
        if "dict" in wanted:
            self.servers["dict"] = start_baseline(w, "dict", "plain.py", "--mode", "dict")
        for key, extra in (("naive", []), ("naive_fast", ["--fast"])):
            if key in wanted:
                redis = RedisServer.start(w, key)
                redis_load(redis.port, ((b"k%d" % i, value_json(i)) for i in range(1, KEYS + 1)))
                server = start_baseline(w, key, "naive.py", "--redis-port", str(redis.port), *extra)
                server.redis = redis
                self.servers[key] = server
        if "webdis" in wanted:
            redis = RedisServer.start(w, "webdis")
            redis_load(redis.port, ((b"cache:k%d" % i, value_json(i)) for i in range(1, KEYS + 1)))
            self.servers["webdis"] = start_webdis(w, redis)

    def verify(self, measures: list[Measure]) -> None:
        checks = {}
        for m in measures:
            server = self.servers[m.server]
            status, body = http("GET", server.url(m.check_path))
            ok = m.check(status, body) if m.check else status == 200
            checks[m.name] = {
                "path": m.check_path,
                "status": status,
                "body": body[:200].decode(errors="replace"),
                "ok": ok,
            }
            if not ok:
                raise RuntimeError(f"{m.name}: {m.check_path} answered {status} {body[:200]!r}")
        self.results["checks"] = checks

    def throughput(self) -> None:
        measures = [
            m
            for m in self.needed_measures()
            if any(
                m.name in THROUGHPUT_SCENARIOS[s].rows
                for s in self.scenarios
                if s in THROUGHPUT_SCENARIOS
            )
        ]
        if not measures:
            return
        log(
            f"throughput: {len(measures)} configurations x {self.rounds} rounds x "
            f"{self.duration}s (wrk -t1 -c{CONNECTIONS}, core {LOAD_CORE}; servers core "
            f"{SERVER_CORE})"
        )
        for m in measures:  # warm-up: JIT-free Python still has caches and pools to fill
            wrk(self.servers[m.server].url(), m.script, m.args, 1)
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in range(self.rounds):
            shift = (r * 5) % len(measures)
            order = measures[shift:] + measures[:shift]
            if r % 2:
                order.reverse()
            for m in order:
                server = self.servers[m.server]
                res = wrk(server.url(), m.script, m.args, self.duration, server=server)
                res["round"] = r
                runs[m.name].append(res)
                log(
                    f"  round {r + 1}/{self.rounds} {m.name:28s} {res['rps']:>9,.0f} req/s  "
                    f"p99 {res['latency_us']['p99'] / 1000:6.2f} ms  CPU "
                    f"{res.get('cpu_us_per_req', 0):6.1f} µs/req  foreign load core "
                    f"{SERVER_CORE}/{LOAD_CORE} {res.get('foreign_core0_share', 0) * 100:3.0f}%"
                    f"/{res.get('foreign_core1_share', 0) * 100:3.0f}%"
                )
                time.sleep(0.3)
        summary = {name: summarize(rs) for name, rs in runs.items()}
        for core, key, who in (
            (SERVER_CORE, "foreign_core0_share", "the server under test or its Redis"),
            (LOAD_CORE, "foreign_core1_share", "wrk or this script"),
        ):
            foreign = [r.get(key, 0.0) for rs in runs.values() for r in rs]
            self.results[key] = {"median": median(foreign), "max": max(foreign)}
            if median(foreign) > 0.10:
                self.notes.append(
                    f"Other work used core {core} during the throughput runs (median "
                    f"{median(foreign) * 100:.0f}%, max {max(foreign) * 100:.0f}% of the wall "
                    f"time not spent by {who}): absolute req/s are depressed and noisy; the "
                    f"CPU-per-request columns are the steadier figures."
                )
        self.results["throughput"] = {
            "runs": runs,
            "summary": summary,
            "measures": {
                m.name: {k: v for k, v in asdict(m).items() if k != "check"} for m in measures
            },
        }
        self.throughput_targets(summary)
        for text in render_throughput(self.results):
            print("\n" + text + "\n", flush=True)

    def throughput_targets(self, s: dict[str, dict[str, Any]]) -> None:
        def rps(name: str) -> float | None:
            return s[name]["rps_median"] if name in s else None

        def add(name: str, num: str, den: str, ratio_min: float, label: str) -> None:
            a, b = rps(num), rps(den)
            if a is None or b is None:
                return
            ratio = a / b
            ca, cb = s[num].get("cpu_us_per_req"), s[den].get("cpu_us_per_req")
            cpu = f"; per CPU-second of server + its Redis: {cb / ca:.2f}×" if ca and cb else ""
            # Each round's ratio of the two, run minutes apart at most: how far the verdict
            # can be trusted on a host whose speed drifts (the verdict itself is the medians').
            per_round = [
                x / y for x, y in zip(s[num]["rps_rounds"], s[den]["rps_rounds"], strict=False)
            ]
            spread = f"; per round {min(per_round):.2f}–{max(per_round):.2f}×"
            if min(per_round) < ratio_min <= max(per_round):
                spread += ", straddling the threshold"
            self.targets.append(
                Target(
                    name,
                    f"{ratio:.2f}× ({fmt_rps(a)} / {fmt_rps(b)} req/s){cpu}{spread}",
                    ratio >= ratio_min,
                    f"{label} ≥ {ratio_min}× (req/s medians)",
                )
            )

        if "get_redis" in self.scenarios:
            add(
                "GET served by Redis ≥ 2.5× naive",
                "service GET (redis hit)",
                "naive",
                2.5,
                "service / naive",
            )
            add(
                "GET served by Redis ≥ 0.6× plain",
                "service GET (redis hit)",
                "plain",
                0.6,
                "service / plain",
            )
        if "get_memory" in self.scenarios:
            add(
                "GET served by memory ≥ 0.9× plain (degraded mode)",
                "service GET (memory hit)",
                "plain",
                0.9,
                "service / plain",
            )
            add(
                "GET served by memory ≥ 0.9× plain (near-cache mode)",
                "service GET (near-cache hit)",
                "plain",
                0.9,
                "service / plain",
            )
        if "get_miss" in self.scenarios:
            add(
                "GET miss ≥ 2× naive",
                "service GET (miss)",
                "naive GET (miss)",
                2.0,
                "service miss / naive miss",
            )
        if "post" in self.scenarios:
            add("POST ≥ 1.0× naive GET", "service POST", "naive", 1.0, "service POST / naive GET")

    def profiles(self) -> None:
        """Profile the service in each throughput scenario whose target was missed."""
        if self.args.no_profile or not self.tools.get("py-spy"):
            return
        missed = {t.name for t in self.targets if t.met is False}
        todo = []
        for target, measure in [
            ("GET served by Redis", "service GET (redis hit)"),
            ("GET served by memory", "service GET (memory hit)"),
            ("GET miss", "service GET (miss)"),
            ("POST", "service POST"),
        ]:
            if any(t.startswith(target) for t in missed) and measure not in todo:
                todo.append(measure)
        if self.args.profile_all:
            todo = [
                m
                for m in (
                    "service GET (redis hit)",
                    "service GET (memory hit)",
                    "service GET (miss)",
                    "service POST",
                )
                if m in self.results.get("throughput", {}).get("summary", {})
            ]
        profiles = []
        for name in todo:
            m = MEASURES[name]
            log(f"profiling {name} with py-spy")
            profiles.append(
                profile_measure(m, self.servers[m.server], 5 if self.quick else 10, self.stamp)
            )
        self.results["profiles"] = profiles

    # -- GET while Redis is SIGSTOPped -----------------------------------------------------

    def sigstop(self) -> None:
        pause = 4 if self.quick else 7
        before, after = 2, 3
        rounds = 1 if self.quick else 2
        sock_t = float(
            self.servers["svc"].env.get("REDIS_SOCKET_TIMEOUT_SECONDS")
            or settings_default("redis_socket_timeout_seconds")
        )
        conn_t = float(
            self.servers["svc"].env.get("REDIS_CONNECT_TIMEOUT_SECONDS")
            or settings_default("redis_connect_timeout_seconds")
        )
        deadline = sock_t + conn_t
        log(f"sigstop: GET load, Redis SIGSTOPped for {pause}s, {rounds} round(s) each")
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in range(rounds):
            for name in ("service GET (redis hit)", "naive"):
                m = MEASURES[name]
                server = self.servers[m.server]
                assert server.redis is not None
                if m.server == "svc":
                    self.wait_full(server)
                seconds = before + pause + after
                env = dict(os.environ, BENCH_LUA_DIR=str(LUA))
                cmd = wrk_command(CONNECTIONS, seconds, m.script, server.url(), m.args, pause + 20)
                load = subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                try:
                    time.sleep(before)
                    server.redis.pause()
                    time.sleep(pause)
                finally:
                    server.redis.resume()
                try:
                    stdout, _ = load.communicate(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    load.kill()
                    stdout, _ = load.communicate()
                line = next((x for x in stdout.splitlines() if x.startswith("BENCHJSON ")), "")
                if not line:
                    raise RuntimeError(f"sigstop wrk printed nothing: {stdout[-400:]}")
                data = json.loads(line[len("BENCHJSON ") :])
                data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
                data["round"] = r
                out[name].append(data)
                log(
                    f"  {name:26s} max {data['latency_us']['max'] / 1000:8.1f} ms  p99 "
                    f"{data['latency_us']['p99'] / 1000:.1f} ms  non-2xx "
                    f"{data['errors']['status']}  timeouts {data['errors']['timeout']}"
                )
        self.wait_full(self.servers["svc"])
        maxes = {
            name: max(x["latency_us"]["max"] for x in runs) / 1000 for name, runs in out.items()
        }
        svc_max = maxes.get("service GET (redis hit)", float("nan"))
        self.results["sigstop"] = {
            "pause_s": pause,
            "before_s": before,
            "after_s": after,
            "rounds": rounds,
            "runs": out,
            "max_ms": maxes,
            "redis_socket_timeout_s": sock_t,
            "redis_connect_timeout_s": conn_t,
        }
        self.targets.append(
            Target(
                "GET while Redis is SIGSTOPped: max ≤ 2× the Redis timeout",
                f"max {svc_max:,.0f} ms vs 2 × {deadline:.2f} s = {2 * deadline * 1000:,.0f} ms "
                f"(naive: {maxes.get('naive', float('nan')):,.0f} ms)",
                svc_max <= 2 * deadline * 1000,
                f"Redis timeout = REDIS_SOCKET_TIMEOUT_SECONDS + REDIS_CONNECT_TIMEOUT_SECONDS = "
                f"{deadline:.2f} s, the request path's deadline (config/example.env: a hung Redis "
                f"costs a request at most about these two). Against the socket timeout alone "
                f"(2 × {sock_t:.2f} s = {2 * sock_t * 1000:.0f} ms) it is "
                f"{'met' if svc_max <= 2 * sock_t * 1000 else 'not met'}.",
            )
        )
        print("\n" + render_sigstop(self.results) + "\n", flush=True)

    def wait_full(self, server: Http, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = http("GET", server.url("/health"))
            if status == 200 and b'"mode":"full"' in body:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{server.name} did not return to full mode in {timeout}s")

    # -- pattern delete ---------------------------------------------------------------------

    def delete(self) -> None:
        total = 1_000_000
        groups = 10
        per_group = total // groups
        rounds = 1 if self.quick else 3
        g = 3
        w = self.workdir / "delete"
        w.mkdir(parents=True, exist_ok=True)
        if str(SRC) not in sys.path:
            sys.path.insert(0, str(SRC))
        from service.tiers.sqlite import SCHEMA

        def keys(group: int | None = None) -> Iterable[tuple[str, bytes]]:
            for gg in [group] if group is not None else range(groups):
                for i in range(per_group):
                    yield f"grp{gg}:item{i}", value_json(i)

        def sqlite_load(path: Path, group: int | None = None) -> None:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT OR REPLACE INTO entries (key, value, expires_at) VALUES (?, ?, NULL)",
                keys(group),
            )
            conn.execute("COMMIT")
            conn.close()

        log(f"delete: pre-loading {total:,} keys into a fresh SQLite file and Redis")
        db_main = w / "svc-del" / "cache.db"
        db_main.parent.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        sqlite_load(db_main)
        db_sqlite_only = w / "svc-del-sqlite" / "cache.db"
        db_sqlite_only.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(db_main, db_sqlite_only)
        redis = RedisServer.start(w, "del")
        svc = start_service(w, "del", redis.url, CACHE_DB_PATH=str(db_main))
        svc.redis = redis
        dead = free_port()
        svc_sql = start_service(
            w, "del-sqlite", f"redis://127.0.0.1:{dead}/0", CACHE_DB_PATH=str(db_sqlite_only)
        )
        self.wait_full(svc)
        # Write the keys into Redis the way this version of the service stores them: ask it
        # to store one key, look at what it wrote, and load 1M keys of the same shape.
        layout = redis_layout(svc, redis)
        log(f"  the service stores a key in Redis as: {layout['describe']}")

        def redis_pairs(group: int | None = None) -> Iterable[tuple[bytes, bytes]]:
            return ((b"cache:" + k.encode(), v) for k, v in keys(group))

        redis_load(redis.port, redis_pairs(), layout=layout)
        dbsize = int(redis_cli(redis.port, "DBSIZE").strip() or 0)
        log(f"  loaded in {time.monotonic() - t:.1f}s (redis DBSIZE {dbsize:,})")
        runs = []
        try:
            for r in range(rounds):
                if r:
                    sqlite_load(db_main, g)
                    redis_load(redis.port, redis_pairs(g), layout=layout)
                samples = w / f"probe-{r}.json"
                probe = subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        LOAD_CORE,
                        sys.executable,
                        str(BENCH / "redis_probe.py"),
                        "--port",
                        str(redis.port),
                        "--groups",
                        ",".join(str(x) for x in range(groups) if x != g),
                        "--per-group",
                        str(per_group),
                        "--max-seconds",
                        "120",
                        "--out",
                        str(samples),
                        *(
                            ["--hash-field", layout["value_field"]]
                            if layout["type"] == "hash"
                            else []
                        ),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                try:
                    time.sleep(2.0)
                    t0 = time.monotonic()
                    status, body = http("DELETE", svc.url(f"{API}/grp{g}:*"), timeout=120)
                    t1 = time.monotonic()
                    time.sleep(0.5)
                finally:
                    probe.terminate()
                    probe.wait(30)
                data = json.loads(samples.read_text())
                starts, lats = data["starts_ns"], data["latencies_ns"]
                t0n, t1n = int(t0 * 1e9), int(t1 * 1e9)
                pairs = list(zip(starts, lats, strict=True))
                during = sorted(lat for st, lat in pairs if t0n <= st <= t1n)
                base = sorted(lat for st, lat in pairs if st < t0n)
                run = {
                    "round": r,
                    "status": status,
                    "response": json.loads(body or b"{}"),
                    "duration_s": t1 - t0,
                    "probe_during": pct_summary(during),
                    "probe_before": pct_summary(base),
                }
                runs.append(run)
                log(
                    f"  round {r + 1}: DELETE grp{g}:* {status} in {t1 - t0:.2f}s "
                    f"{run['response'].get('deleted')}  probe p99 during "
                    f"{run['probe_during']['p99_ms']:.2f} ms (before "
                    f"{run['probe_before']['p99_ms']:.2f} ms), max "
                    f"{run['probe_during']['max_ms']:.2f} ms, n={len(during)}"
                )
            # SQLite's share, measured alone on a degraded instance (no Redis) holding a copy
            # of the same 1M rows: the cost follows the rows under the literal prefix.
            sql_runs = {}
            for label, pattern in [
                ("prefix grp5: (100k rows under it)", "grp5:*"),
                ("prefix nomatch: (0 rows under it)", "nomatch:*"),
                ("no literal prefix: *:item7 (scans 1M rows, 10 match)", "*:item7"),
            ]:
                t0 = time.monotonic()
                status, body = http("DELETE", svc_sql.url(f"{API}/{pattern}"), timeout=120)
                sql_runs[label] = {
                    "pattern": pattern,
                    "status": status,
                    "duration_s": time.monotonic() - t0,
                    "response": json.loads(body or b"{}"),
                }
                log(
                    f"  sqlite-only DELETE {pattern}: {sql_runs[label]['duration_s']:.3f}s "
                    f"{sql_runs[label]['response'].get('deleted')}"
                )
        finally:
            svc.stop()
            PROCS.stop(svc_sql.proc)
        p99s = [x["probe_during"]["p99_ms"] for x in runs]
        worst = max(p99s)
        self.results["delete"] = {
            "keys_total": total,
            "matching": per_group,
            "runs": runs,
            "sqlite_only": sql_runs,
            "pattern": f"grp{g}:*",
            "redis_layout": layout["describe"],
        }
        self.targets.append(
            Target(
                "Pattern delete: other clients' Redis p99 ≤ 10 ms while it runs",
                f"p99 {worst:.2f} ms (worst of {len(runs)}; median {median(p99s):.2f} ms), "
                f"delete took {median([x['duration_s'] for x in runs]):.2f} s",
                worst <= 10.0,
            )
        )
        nomatch = sql_runs["prefix nomatch: (0 rows under it)"]["duration_s"]
        noprefix = sql_runs["no literal prefix: *:item7 (scans 1M rows, 10 match)"]["duration_s"]
        self.targets.append(
            Target(
                "Pattern delete in SQLite uses the literal prefix",
                f"0 rows under prefix: {nomatch * 1000:.0f} ms, 100k under prefix: "
                f"{sql_runs['prefix grp5: (100k rows under it)']['duration_s'] * 1000:.0f} ms, "
                f"no prefix over 1M rows: {noprefix * 1000:.0f} ms",
                nomatch < 0.1 * noprefix,
                "met when a prefix with no rows under it costs < 10% of a prefix-less scan",
            )
        )
        print("\n" + render_delete(self.results) + "\n", flush=True)

    # -- RSS with many distinct keys ---------------------------------------------------------

    def rss(self) -> None:
        bound = self.args.rss_memory_mib * MiB
        target_keys = self.args.rss_keys or (150_000 if self.quick else 1_000_000)
        budget_s = 60 if self.quick else 420
        chunk_s = 5 if self.quick else 10
        value_bytes = 200
        overhead_allowance = 32 * MiB
        w = self.workdir / "rss"
        redis = RedisServer.start(w, "rss")
        svc = start_service(
            w, "rss", redis.url, MEMORY_MAX_BYTES=str(bound), MEMORY_MAX_ENTRIES="100000000"
        )
        svc.redis = redis
        try:
            self.wait_full(svc)
            pid = svc.proc.pid
            offset = 0
            res = wrk(svc.url(), "seq_post.lua", [API, "warm-", "0", str(value_bytes)], 1)
            rss_idle = rss_bytes(pid)
            series = [{"keys": 0, "rss": rss_idle, "tier_bytes": 0, "tier_entries": 0, "t": 0}]
            written = 0
            t_start = time.monotonic()
            log(
                f"rss: writing up to {target_keys:,} distinct keys ({value_bytes} B values), "
                f"MEMORY_MAX_BYTES={bound // MiB} MiB, idle RSS {rss_idle / MiB:.1f} MiB"
            )
            while written < target_keys and time.monotonic() - t_start < budget_s:
                res = wrk(
                    svc.url(), "seq_post.lua", [API, "rss-", str(offset), str(value_bytes)], chunk_s
                )
                offset += res["requests"] + 1000
                written += res["requests"] - res["errors"]["status"]
                status, body = http("GET", svc.url(f"{API}/stats"), timeout=30)
                stats = json.loads(body) if status == 200 else {}
                mem = stats.get("memory", {})
                point = {
                    "keys": written,
                    "rss": rss_bytes(pid),
                    "mode": stats.get("mode", "?"),
                    "tier_bytes": mem.get("bytes", 0),
                    "tier_entries": mem.get("entries", 0),
                    "t": round(time.monotonic() - t_start, 1),
                    "rps": res["rps"],
                    "non2xx": res["errors"]["status"],
                }
                series.append(point)
                log(
                    f"  {written:>9,} keys  {point['mode']:8s} RSS "
                    f"{point['rss'] / MiB:7.1f} MiB  tier "
                    f"{point['tier_bytes'] / MiB:5.1f} MiB / {point['tier_entries']:,} entries  "
                    f"{res['rps']:,.0f} POST/s"
                )
            peak = 0
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        finally:
            svc.stop()
        end = series[-1]
        # Where the tier first reached its bound (>= 97% of it), and RSS growth after that.
        at_bound = next((p for p in series if p["tier_bytes"] >= 0.97 * bound), None)
        growth_after = (end["rss"] - at_bound["rss"]) if at_bound else None
        over = end["rss"] - rss_idle
        bounded = over <= bound + overhead_allowance
        flat = at_bound is not None and growth_after is not None and growth_after <= 0.10 * bound
        if not self.quick and written < 1_000_000:
            self.notes.append(
                f"RSS scenario wrote {written:,} keys, not 1M, in its time "
                f"budget ({budget_s}s) on this machine."
            )
        self.results["rss"] = {
            "memory_max_bytes": bound,
            "value_bytes": value_bytes,
            "keys_written": written,
            "series": series,
            "rss_idle": rss_idle,
            "rss_peak_hwm": peak,
            "at_bound": at_bound,
            "overhead_allowance": overhead_allowance,
            "chunk_s": chunk_s,
            "target_keys": target_keys,
            "budget_s": budget_s,
        }
        verdict = bounded and flat
        self.targets.append(
            Target(
                "RSS within the memory-tier bound plus a fixed overhead",
                f"RSS {end['rss'] / MiB:.0f} MiB after {written:,} keys = idle "
                f"{rss_idle / MiB:.0f} MiB + {over / MiB:.0f} MiB "
                f"({over / bound:.2f}× the {bound // MiB} MiB bound); growth after the tier "
                f"reached its bound: "
                + (
                    f"{growth_after / MiB:+.0f} MiB"
                    if growth_after is not None
                    else "bound never reached"
                ),
                verdict,
                f"met when RSS − idle RSS ≤ bound + {overhead_allowance // MiB} MiB and RSS grows "
                f"≤ 10% of the bound once the tier is full",
            )
        )
        print("\n" + render_rss(self.results) + "\n", flush=True)

    # -- report ------------------------------------------------------------------------------

    def machine(self) -> dict[str, str]:
        def version(mod: str) -> str:
            try:
                from importlib.metadata import version as v

                return v(mod)
            except Exception:
                return "not installed"

        model = proc_field("/proc/cpuinfo", "model name")
        mhz = proc_field("/proc/cpuinfo", "cpu MHz")
        mem = proc_field("/proc/meminfo", "MemTotal")
        wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
        webdis_v = (
            subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", "webdis"], capture_output=True, text=True
            ).stdout
            or "not installed"
        )
        return {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": str(os.cpu_count()),
            "cpu": f"{model} ({mhz} MHz)",
            "memory": mem,
            "kernel": platform.release(),
            "os": _os_release(),
            "python": platform.python_version(),
            "redis-server": subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True
            )
            .stdout.split(" v=")[-1]
            .split()[0],
            "aiohttp": version("aiohttp"),
            "redis-py": version("redis"),
            "hiredis": version("hiredis"),
            "uvloop": version("uvloop"),
            "orjson": version("orjson"),
            "wrk": (wrk_v.split()[1] if wrk_v else "?"),
            "webdis": webdis_v,
            "loadavg at start": self.results.get("loadavg_start", "?"),
            "loadavg at end": Path("/proc/loadavg").read_text().split(" ")[0:3].__str__(),
        }

    def collect_service_warnings(self) -> None:
        """Warnings and errors the service instances logged (mode flips, timeouts...)."""
        found: dict[str, list[str]] = {}
        for log_path in sorted(self.workdir.rglob("service.log")):
            lines = []
            for line in log_path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("level") in (
                    "warning",
                    "error",
                ) and "CACHE_API_TOKEN" not in event.get("event", ""):
                    lines.append(
                        f"{event.get('timestamp', '')[11:19]} {event.get('level')}: "
                        f"{event.get('event')}"
                        + (
                            f" ({event.get('reason') or event.get('error')})"
                            if event.get("reason") or event.get("error")
                            else ""
                        )
                    )
            if lines:
                name = log_path.parent.name
                found[name] = lines
                why = _EXPECTED_WARNINGS.get(name, "not expected by the harness")
                self.notes.append(
                    f"`{name}` logged {len(lines)} warning/error line(s) "
                    f"({why}), first: " + "; ".join(f"`{x}`" for x in lines[:3])
                )
        self.results["service_warnings"] = found

    def write_report(self) -> None:
        self.results["machine"] = self.machine()
        self.results["targets"] = [asdict(t) for t in self.targets]
        self.results["notes"] = self.notes
        self.results["finished"] = self.finished
        self.results["command"] = ("bench/run.py " + " ".join(sys.argv[1:])).strip()
        OUT.mkdir(parents=True, exist_ok=True)
        raw = OUT / f"results-{self.stamp}.json"
        self.results["raw_json"] = str(raw.relative_to(ROOT))
        raw.write_text(json.dumps(self.results, indent=1, default=str))
        complete = (
            set(self.scenarios) == set(ALL_SCENARIOS)
            and not self.quick
            and not self.args.src
            and not self.args.variant
            and self.finished
        )
        md = (
            BENCH / "RESULTS.md"
            if complete or (self.args.write_results and self.finished)
            else OUT / f"RESULTS-{self.stamp}.md"
        )
        md.write_text(render_report(self.results))
        print("\n## Targets\n\n" + targets_table(self.results["targets"]), flush=True)
        log(f"wrote {md.relative_to(ROOT)} and {raw.relative_to(ROOT)}")

    def source(self) -> None:
        """Pick the service code: the work tree, or `git archive <rev>` (read-only on the repo)."""
        global SRC
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        if self.args.src:
            SRC = Path(self.args.src).resolve()
            self.results["source"] = f"source tree {SRC} (--src)"
        elif self.args.rev:
            rev = subprocess.run(
                [*git, "rev-parse", "--short", self.args.rev],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            SRC = archive_source(rev, self.workdir / "src")
            self.results["source"] = f"git archive of commit {rev}"
        else:
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--", "service", "monitor"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            self.results["source"] = f"work tree at {head}" + (
                " with uncommitted changes in service/ or monitor/" if dirty else ""
            )
        log(f"service code: {self.results['source']}")

    def main(self) -> None:
        os.sched_setaffinity(0, {int(LOAD_CORE)})
        self.source()
        self.results["loadavg_start"] = str(Path("/proc/loadavg").read_text().split(" ")[0:3])
        self.tools = ensure_tools(self.notes)
        if not self.tools.get("webdis"):
            log("webdis not available: its row is left out")
        measures = self.needed_measures()
        try:
            if measures:
                log(f"starting servers in {self.workdir}")
                self.start_throughput_servers(measures)
                self.verify(measures)
                self.throughput()
                self.profiles()
                if "sigstop" in self.scenarios:
                    self.sigstop()
                for server in self.servers.values():
                    server.stop()
            if "delete" in self.scenarios:
                self.delete()
            if "rss" in self.scenarios:
                self.rss()
            self.finished = True
        finally:
            PROCS.stop_all()
            self.collect_service_warnings()
            self.write_report()
            if not self.args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)


def proc_field(path: str, name: str) -> str:
    """The value of the first `name: value` line of a /proc file, or "?"."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return "?"


def pct_summary(sorted_ns: list[int]) -> dict[str, float]:
    if not sorted_ns:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}

    def pct(p: float) -> float:
        return sorted_ns[min(len(sorted_ns) - 1, int(p / 100 * len(sorted_ns)))] / 1e6

    return {
        "n": len(sorted_ns),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": sorted_ns[-1] / 1e6,
    }


def thin(series: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    if len(series) <= n:
        return series
    step = (len(series) - 1) / (n - 1)
    idx = sorted({round(i * step) for i in range(n)})
    return [series[i] for i in idx]


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 2 s per configuration, scaled-down phases (~4 min)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}",
    )
    p.add_argument("--rounds", type=int, help="rounds per configuration (default 3; quick 1)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick 2)")
    p.add_argument(
        "--rss-keys",
        type=int,
        help="distinct keys in the RSS scenario "
        "(default 1,000,000, quick 150,000; capped by a time budget)",
    )
    p.add_argument("--rss-memory-mib", type=int, default=64, help="MEMORY_MAX_BYTES in MiB")
    p.add_argument("--no-profile", action="store_true", help="skip py-spy on missed targets")
    p.add_argument(
        "--profile-all",
        action="store_true",
        help="profile every service throughput scenario, met or not",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument(
        "--variant",
        help="also run the service scenarios, side by side and "
        "interleaved, with the service/ and monitor/ found in this folder (A/B of a "
        "patch); its rows are marked [variant]",
    )
    p.add_argument(
        "--report-from",
        metavar="JSON",
        help="only redraw a report from a raw results JSON of an earlier run "
        "(written to bench/RESULTS.md with --write-results, else bench/out/)",
    )
    p.add_argument(
        "--write-results",
        action="store_true",
        help="write bench/RESULTS.md even for a partial, quick, --src or --variant "
        "run (by default those go to bench/out/RESULTS-<stamp>.md)",
    )
    p.add_argument(
        "--src",
        help="benchmark the service/ and monitor/ found in this folder "
        "(e.g. a patched copy) instead of the work tree",
    )
    p.add_argument(
        "--rev",
        help="benchmark this commit's service/ and monitor/ (git archive "
        "into the work folder) instead of the work tree",
    )
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(ALL_SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    in_venv = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()
    if VENV_PY.exists() and not in_venv and not os.environ.get("TIERCACHE_BENCH_REEXEC"):
        os.environ["TIERCACHE_BENCH_REEXEC"] = "1"
        os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])
    args = parse_args()
    if args.report_from:
        results = json.loads(Path(args.report_from).read_text())
        md = (
            BENCH / "RESULTS.md"
            if args.write_results
            else OUT / f"RESULTS-{results.get('stamp', 'redrawn')}.md"
        )
        md.write_text(render_report(results))
        log(f"wrote {md.relative_to(ROOT)} from {args.report_from}")
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    atexit.register(PROCS.stop_all)
    Run(args).main()


if __name__ == "__main__":
    main()
