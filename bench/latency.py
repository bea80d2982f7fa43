#!/usr/bin/env python3
"""Latency at a fixed request rate, with Redis on this host and with Redis far away: what the
auto-pipeline's pacing costs or saves where wrk cannot tell.

    .venv/bin/python bench/latency.py                                   # the work tree
    .venv/bin/python bench/latency.py --rev HEAD~1 --variant /path/to/patched/tree

wrk keeps 32 requests outstanding whatever the latency (a closed loop), which is how the
throughput targets are measured, but it hides a change that makes each request wait longer
at a rate the server easily sustains. Here GETs of Redis hits are sent at fixed rates (an
open loop: a request leaves at its time whether earlier ones have returned or not), once
with the service talking to its redis-server directly and once through a proxy that delays
every packet by `--delay-ms` each way (a Redis on another host or zone), and the p50, p90
and p99 of the latencies are reported per version. Service and Redis run on core 0, the
client and the proxy on core 1. Results are printed and written to
bench/out/latency-<stamp>.md (and .json).

The client is Python (aiohttp): above a few thousand requests a second its own latency
shows in the p99. The proxy uses asyncio timers, so a delay comes out a little longer than
asked; the report gives the round trip measured through it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import run  # the harness's process, Redis and service helpers

KEY_PATH = f"{run.API}/k1"
WARM_UP_REQUESTS = 200


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    while data := await source.read(65536):
        loop.call_later(delay, sink.write, data)
    loop.call_later(delay, sink.close)


async def serve_delay_proxy(listen: int, target: int, delay: float) -> None:
    """Forward 127.0.0.1:listen to 127.0.0.1:target, each chunk `delay` seconds late."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(
            _pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay),
            return_exceptions=True,
        )  # fmt: skip

    server = await asyncio.start_server(accept, "127.0.0.1", listen)
    await server.serve_forever()


def redis_round_trip_ms(port: int, n: int = 50) -> float:
    """The median PING round trip to a Redis on this port, from a fresh connection."""
    times = []
    with subprocess.Popen(
        ["redis-cli", "-p", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as cli:
        assert cli.stdin is not None
        assert cli.stdout is not None
        for _ in range(n):
            started = time.perf_counter()
            cli.stdin.write(b"PING\n")
            cli.stdin.flush()
            cli.stdout.readline()
            times.append(time.perf_counter() - started)
        cli.stdin.close()
    times.sort()
    return times[len(times) // 2] * 1000


async def open_loop(url: str, rate: float, seconds: float) -> dict[str, float]:
    """GET `url` at `rate` a second for `seconds`; latency quantiles in ms."""
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(record: bool) -> None:
            nonlocal errors
            started = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            if record:
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(False) for _ in range(WARM_UP_REQUESTS)))
        tasks = []
        start, n = time.perf_counter(), int(rate * seconds)
        for i in range(n):
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(True)))
        await asyncio.gather(*tasks)
    latencies.sort()

    def q(p: float) -> float:
        return latencies[int(p * (len(latencies) - 1))] * 1000

    return {
        "requests": len(latencies),
        "errors": errors,
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", help="measure this commit's service/ and monitor/ (git archive)")
    p.add_argument("--variant", help="also measure the service/ and monitor/ in this folder")
    p.add_argument("--rates", default="1000,4000", help="requests a second, comma-separated")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per rate")
    p.add_argument("--delay-ms", type=float, default=0.5, help="the far Redis's delay, each way")
    p.add_argument(
        "--proxy", nargs=3, metavar=("LISTEN", "TARGET", "DELAY_S"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.proxy:
        listen, target, delay = args.proxy
        asyncio.run(serve_delay_proxy(int(listen), int(target), float(delay)))
        return
    run.ensure_tools([])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    atexit.register(run.PROCS.stop_all)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-latency-"))
    versions = {"main": run.ROOT}
    if args.rev:
        versions["main"] = run.archive_source(args.rev, workdir / "src-main")
    if args.variant:
        versions["variant"] = Path(args.variant).resolve()
    rates = [float(r) for r in args.rates.split(",")]
    rows: list[dict] = []
    try:
        redis = run.RedisServer.start(workdir, "near")
        far_port = run.free_port()
        run.PROCS.start(
            "delay-proxy",
            [sys.executable, __file__, "--proxy", str(far_port), str(redis.port),
             str(args.delay_ms / 1000)],
            core=run.LOAD_CORE,
            log_path=workdir / "proxy.log",
        )  # fmt: skip
        run.wait_port(far_port)
        distances = {
            "same host": (redis.port, redis_round_trip_ms(redis.port)),
            f"{args.delay_ms:g} ms away": (far_port, redis_round_trip_ms(far_port)),
        }
        for distance, (_, rtt) in distances.items():
            run.log(f"Redis {distance}: PING round trip {rtt:.2f} ms")
        for label, src in versions.items():
            for distance, (port, rtt) in distances.items():
                name = f"{label}-{'near' if port == redis.port else 'far'}"
                # Each service its own key prefix: they share the one redis-server.
                server = run.start_service(
                    workdir, name, f"redis://127.0.0.1:{port}/0", src=src,
                    CACHE_KEY_PREFIX=f"{name}:",
                )  # fmt: skip
                run.seed_service(server, n=1)
                for rate in rates:
                    result = asyncio.run(open_loop(server.url(KEY_PATH), rate, args.seconds))
                    rows.append(
                        {"version": label, "redis": distance, "rtt_ms": rtt, "rate": rate, **result}
                    )
                    run.log(
                        f"{label:8} Redis {distance:12} {rate:6,.0f}/s  p50 {result['p50']:.2f}  "
                        f"p90 {result['p90']:.2f}  p99 {result['p99']:.2f} ms"
                    )
                run.PROCS.stop(server.proc)
    finally:
        run.PROCS.stop_all()
    run.save_report("latency", render(rows, versions, args), rows)


def render(rows: list[dict], versions: dict[str, Path], args: argparse.Namespace) -> str:
    ordered = sorted(rows, key=lambda r: (r["redis"] != "same host", r["rate"], r["version"]))
    table = run.md_table(
        ["Redis (PING round trip)", "rate", "version", "p50 ms", "p90 ms", "p99 ms",
         "requests", "non-200"],
        [[f"{r['redis']} ({r['rtt_ms']:.2f} ms)", f"{r['rate']:,.0f}/s", r["version"],
          f"{r['p50']:.2f}", f"{r['p90']:.2f}", f"{r['p99']:.2f}", f"{r['requests']:,}",
          str(r["errors"])] for r in ordered],
        "lrlrrrrr",
    )  # fmt: skip
    title = f"# Latency at fixed rates ({dt.date.today()})"
    return f"{title}\n\n{run.versions_line(versions, args.rev)}\n\n{table}\n"


if __name__ == "__main__":
    main()
