"""Throwaway server processes for tests: started on free loopback ports, killable and pausable.

Tests never touch a Redis they did not start; everything here binds 127.0.0.1 on a port the
kernel handed out a moment before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port that a Cluster node can use: its bus port (port + 10000) must exist and be
    free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            port = port % 45000 + 10000
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def require_binary(name: str) -> str:
    """The path of an executable the tests need, or a clear failure (never a skip)."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} is not installed; run ./scripts/test, which installs it "
            f"(Debian: apt-get install -y {name})"
        )
    return path


def wait_for_port(port: int, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def redis_ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server on the port answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            # A server that wants a password is up all the same.
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisProcess:
    """One redis-server on a fixed free port that a test can kill, pause and bring back."""

    def __init__(self, port: int | None = None, *extra_args: str) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="tiercache-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            require_binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not redis_ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server on {self.port} did not answer PING")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes with its data, connections reset."""
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, the worst case for clients."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill and start again on the same port, empty (no persistence)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelProcess(RedisProcess):
    """A Redis Sentinel (`redis-server --sentinel`, the same binary as redis-sentinel)
    watching one master, with failure detection tuned for tests (1 s)."""

    def __init__(self, master_port: int, master_name: str = "mymaster", quorum: int = 2) -> None:
        super().__init__()
        self.config = self.dir / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 4000\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )

    def command(self) -> list[str]:
        return [require_binary("redis-server"), str(self.config), "--sentinel"]


@contextlib.contextmanager
def redis_process(*extra_args: str) -> Iterator[RedisProcess]:
    """A started RedisProcess, stopped on exit whatever the test did to it."""
    server = RedisProcess(None, *extra_args).start()
    try:
        yield server
    finally:
        server.stop()


class ServiceProcess:
    """`python -m service` as a child process on a free port, configured by environment."""

    def __init__(self, workdir: Path, **settings: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / f"service-{self.port}.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.port),
            "CACHE_DB_PATH": str(workdir / "cache.db"),
            "HEALTH_INTERVAL_SECONDS": "0.2",
            "RECONNECT_BACKOFF_BASE_SECONDS": "0.05",
            "RECONNECT_BACKOFF_CAP_SECONDS": "0.5",
            "LOG_FORMAT": "json",
            **settings,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        with self.log.open("ab") as out:
            # cwd is the test's own directory: no developer .env is read.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service"],
                cwd=self.workdir, env=self.env, stdout=out, stderr=out,
            )  # fmt: skip
        try:
            wait_for_port(self.port, timeout=15)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"service did not start:\n{self.log.read_text()[-3000:]}") from None
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye; what is on disk is what survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
