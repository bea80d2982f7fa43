"""Several worker processes on one port (SO_REUSEPORT), each a full instance of its own.

Each worker has its own SQLite file (`cache.db` becomes `cache-w0.db`, `cache-w1.db`, ...)
and so its own identity on the invalidation feed: workers keep each other coherent exactly as
separate hosts do. Metrics go through prometheus-client's multiprocess mode, so a scrape of
any worker reports the counters of all of them (gauges per worker, labelled with its pid).
The parent only starts workers, restarts one that dies, and stops them all on SIGTERM/SIGINT.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import structlog

from service.settings import Settings

log = structlog.get_logger("tiercache.workers")

#: A worker that dies sooner than this after starting is not restarted (it would loop).
MIN_WORKER_LIFETIME_SECONDS = 5.0


def worker_db_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}-w{index}{path.suffix}")


def run_workers(settings: Settings, serve: Callable[[Settings], None]) -> None:
    """Run `serve` in `settings.workers` forked processes until told to stop."""
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="tiercache-metrics-"))  # fmt: skip
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters start afresh with the service
    metrics_dir.mkdir(parents=True)
    # Before any worker imports prometheus_client: it picks its value store at import time.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    context = multiprocessing.get_context("fork")
    stopping = False

    def start(index: int) -> BaseProcess:
        worker_settings = settings.model_copy(
            update={"cache_db_path": worker_db_path(settings.cache_db_path, index)}
        )
        process = context.Process(target=serve, args=(worker_settings,), name=f"worker-{index}")
        process.start()
        log.info("worker started", worker=index, pid=process.pid)
        return process

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = {index: (start(index), time.monotonic()) for index in range(settings.workers)}
    try:
        while not stopping and workers:
            time.sleep(0.2)
            for index, (process, started) in list(workers.items()):
                if process.is_alive():
                    continue
                _forget(process)
                del workers[index]
                if stopping:
                    continue
                if time.monotonic() - started < MIN_WORKER_LIFETIME_SECONDS:
                    log.error("worker died at start, not restarting", worker=index,
                              exitcode=process.exitcode)  # fmt: skip
                    stopping = True
                else:
                    log.warning("worker died, restarting", worker=index, exitcode=process.exitcode)
                    workers[index] = (start(index), time.monotonic())
    finally:
        for process, _ in workers.values():
            if process.is_alive():
                process.terminate()
        for process, _ in workers.values():
            process.join(timeout=10)
            _forget(process)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(p.exitcode not in (0, -signal.SIGTERM) for p, _ in workers.values()):
        raise SystemExit(1)


def _forget(process: BaseProcess) -> None:
    """Drop a finished worker's live gauges from the shared metrics."""
    if process.pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]  # unannotated upstream
