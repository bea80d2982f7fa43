#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: an A/B of the service's code
that the machine's noise does not blur.

    .venv/bin/python bench/instructions.py                      # the work tree
    .venv/bin/python bench/instructions.py --rev HEAD~1 --variant /path/to/patched/tree

On this shared host the req/s of one configuration spreads by up to ±20% between rounds,
more than most single changes save, so run.py's A/B cannot see them. Callgrind counts the
instructions the server process executes, the same whatever else the machine does. It is a
proxy, not a speed: it leaves out system calls, cache misses and Redis's own work, so its
ratios are not req/s ratios (plain against naive, counted the same way by hand: 2.2x in
instructions, where run.py measures 3x in req/s). Use it to compare versions of the service;
the targets are judged by run.py.

Each server runs under callgrind with counting off; counting is switched on only while wrk
(core 1) drives one scenario over one connection, then the counts are dumped and divided by
the requests wrk completed. One connection, so that every Redis batch holds one request:
with 32, how many requests a batch caught depended on how they happened to arrive under
valgrind (the same code measured 4.4 and 14 requests per Redis read in two runs, which moved
its count by 4%). A batch's own cost is thus counted in full on every request: the figures
are an upper bound of the Redis paths' work, for comparing versions. Results are printed and
written to bench/out/instructions-<stamp>.md (and .json).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness's process, Redis and wrk helpers

CONNECTIONS = 1
WARM_UP_SECONDS = 3
#: Starting Python under valgrind takes tens of seconds.
READY_TIMEOUT_SECONDS = 180.0


@dataclass
class Scenario:
    name: str
    server: str  # "full", "degraded" or a baseline's name
    script: str
    path: str


SCENARIOS = [
    Scenario("GET served by Redis", "full", "get.lua", f"{run.API}/k"),
    Scenario("GET served by memory (degraded)", "degraded", "get.lua", f"{run.API}/k"),
    Scenario("GET served by memory (near-cache)", "near", "get.lua", f"{run.API}/k"),
    Scenario("GET miss", "full", "get.lua", f"{run.API}/miss-"),
    Scenario("POST", "full", "post.lua", run.API),
]


def callgrind(out_dir: Path, name: str) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/{name}.%p",
    ]


def control(pid: int, *args: str) -> None:
    # callgrind_control exits 0 even when it found no such run: its output says so.
    res = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True)
    if res.returncode != 0 or "not detected" in res.stdout or "No active" in res.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid}: {res.stdout.strip()}")


def total_instructions(out_dir: Path, name: str, pid: int, dumps_before: int) -> int:
    """The count of the dump callgrind writes after `dumps_before` earlier ones."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dumps = sorted(out_dir.glob(f"{name}.{pid}.*"), key=lambda p: int(p.suffix[1:]))
        if len(dumps) > dumps_before:
            match = re.search(r"^totals: (\d+)", dumps[-1].read_text(), re.M)
            if match:
                return int(match.group(1))
        time.sleep(0.5)
    raise TimeoutError(f"callgrind wrote no dump for {name}")


def measure(server: run.Http, scenario: Scenario, seconds: int, out_dir: Path) -> dict:
    pid = server.proc.pid
    redis_pid = server.redis.proc.pid if server.redis and server.redis.proc else None
    dumps = len(list(out_dir.glob(f"{server.name}.{pid}.*")))
    wrk_args = [scenario.path, str(run.KEYS)]
    base = server.url("/")
    run.wrk(base, scenario.script, wrk_args, WARM_UP_SECONDS, connections=CONNECTIONS)
    reads_before = run.read_syscalls(redis_pid)
    control(pid, "-i", "on")
    result = run.wrk(base, scenario.script, wrk_args, seconds, connections=CONNECTIONS)
    control(pid, "-i", "off")
    control(pid, "-d")
    reads = run.read_syscalls(redis_pid) - reads_before
    instructions = total_instructions(out_dir, server.name, pid, dumps)
    requests = result["requests"]
    if not requests or not instructions:
        raise RuntimeError(f"{server.name}: {requests} requests, {instructions} instructions")
    return {
        "requests": requests,
        "instructions_per_request": instructions / requests,
        "requests_per_redis_read": requests / reads if redis_pid and reads else None,
    }


def start_version(workdir: Path, label: str, src: Path, out_dir: Path) -> dict[str, run.Http]:
    """The service in full mode and in near-cache mode (each with its own Redis) and in
    degraded mode, seeded with the keys."""
    servers: dict[str, run.Http] = {}
    for mode, env in (("full", {}), ("near", {"CACHE_READ_MODE": "near"})):
        redis = run.RedisServer.start(workdir, f"{label}-{mode}")
        servers[mode] = run.start_service(
            workdir,
            f"{label}-{mode}",
            redis.url,
            src=src,
            wrapper=callgrind(out_dir, f"{label}-{mode}"),
            ready_timeout=READY_TIMEOUT_SECONDS,
            **env,
        )
        servers[mode].redis = redis
    degraded = run.start_service(
        workdir,
        f"{label}-degraded",
        f"redis://127.0.0.1:{run.free_port()}/0",
        src=src,
        wrapper=callgrind(out_dir, f"{label}-degraded"),
        ready_timeout=READY_TIMEOUT_SECONDS,
    )
    servers["degraded"] = degraded
    for server in servers.values():
        run.seed_service(server)
    return servers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", help="measure this commit's service/ and monitor/ (git archive)")
    p.add_argument("--variant", help="also measure the service/ and monitor/ in this folder")
    p.add_argument("--seconds", type=int, default=15, help="counted seconds per scenario")
    args = p.parse_args()
    if shutil.which("valgrind") is None and os.geteuid() == 0:
        run.log("installing valgrind (apt-get)")
        run._apt_install(["valgrind"])
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing (Debian: apt-get install -y valgrind)")
    run.ensure_tools([])
    variant = Path(args.variant).resolve() if args.variant else None
    if variant and not (variant / "service" / "__main__.py").exists():
        raise SystemExit(f"--variant {args.variant}: no service/ package there")
    os.environ["BENCH_LUA_DIR"] = str(run.LUA)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    atexit.register(run.PROCS.stop_all)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-instructions-"))
    out_dir = workdir / "callgrind"
    out_dir.mkdir()
    rows: list[dict] = []
    try:
        versions = {
            "main": run.archive_source(args.rev, workdir / "src-main") if args.rev else run.ROOT
        }
        if variant:
            versions["variant"] = variant
        run.log("plain aiohttp under callgrind")
        plain = run.start_baseline(
            workdir,
            "plain",
            "plain.py",
            wrapper=callgrind(out_dir, "plain"),
            ready_timeout=READY_TIMEOUT_SECONDS,
        )
        rows.append(
            {
                "scenario": "plain aiohttp (a fixed JSON)",
                "version": "baseline",
                **measure(
                    plain,
                    Scenario("plain", "plain", "get.lua", f"{run.API}/k"),
                    args.seconds,
                    out_dir,
                ),
            }
        )
        run.PROCS.stop(plain.proc)
        for label, src in versions.items():
            run.log(f"{label}: {src}")
            servers = start_version(workdir, label, src, out_dir)
            for scenario in SCENARIOS:
                row = measure(servers[scenario.server], scenario, args.seconds, out_dir)
                rows.append({"scenario": scenario.name, "version": label, **row})
                run.log(f"  {scenario.name}: {row['instructions_per_request']:,.0f} instr/req")
            for server in servers.values():
                server.stop()
    finally:
        run.PROCS.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)  # callgrind dumps are not kept
    run.save_report("instructions", render(rows, versions, args), rows)


def render(rows: list[dict], versions: dict[str, Path], args: argparse.Namespace) -> str:
    plain = rows[0]["instructions_per_request"]
    main_of = {r["scenario"]: r["instructions_per_request"] for r in rows if r["version"] == "main"}

    def cells(r: dict) -> list[str]:
        ipr = r["instructions_per_request"]
        base = main_of.get(r["scenario"])
        per_read = r["requests_per_redis_read"]
        return [
            r["scenario"], r["version"], f"{r['requests']:,}", f"{ipr:,.0f}",
            f"{ipr / plain:.2f}", f"{ipr / base:.3f}" if base else "–",
            f"{per_read:.1f}" if per_read else "–",
        ]  # fmt: skip

    table = run.md_table(
        ["scenario", "version", "requests counted", "instructions / request", "× plain",
         "× main", "req per Redis read"],
        [cells(r) for r in rows],
        "llrrrrr",
    )  # fmt: skip
    cpu = run.proc_field("/proc/cpuinfo", "model name")
    title = f"# Instructions per request ({dt.date.today()}, {cpu})"
    return f"{title}\n\n{run.versions_line(versions, args.rev)}\n\n{table}\n"


if __name__ == "__main__":
    main()
