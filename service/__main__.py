"""`python -m service`: load settings, configure logging, serve until interrupted."""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import sys

import structlog
from aiohttp import web
from pydantic import ValidationError

from service.logging import configure_logging
from service.settings import Settings, describe_error
from service.tiers.base import TierError
from service.workers import run_workers

MAX_REQUEST_LINE_BYTES = 32 * 1024

#: glibc's mallopt() parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
#: Allocations from this size on get pages of their own, handed back to the OS when freed.
MALLOC_MMAP_THRESHOLD_BYTES = 128 * 1024


def _return_large_blocks_to_the_os() -> None:
    """Keep glibc's mmap threshold at its initial 128 KiB instead of letting it rise.

    By default glibc raises the threshold each time a large block is freed, so the memory
    tier's hash table, reallocated at each resize, soon lands in the heap, and every table it
    outgrows leaves a hole malloc keeps: RSS crept up by about 12 MiB after the tier was full
    (bench/memory_tier_rss.py). Fixed, freed tables go back to the OS and RSS stays flat.
    What MALLOC_MMAP_THRESHOLD_=131072 in the environment does, without needing it set.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:  # glibc and musl have it; elsewhere nothing to tune
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main() -> None:
    _return_large_blocks_to_the_os()
    try:
        settings = Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    log = structlog.get_logger("tiercache")
    log.info(
        "starting",
        http=f"{settings.http_host}:{settings.http_port}",
        redis=settings.redis_display(),
        sqlite=str(settings.cache_db_path),
        key_prefix=settings.cache_key_prefix,
    )
    if not (settings.cache_api_token or settings.cache_write_token or settings.cache_read_token):
        log.warning(
            "no CACHE_API_TOKEN set: the API is open to every client that can reach it",
            http_host=settings.http_host,
            loopback_only=_is_loopback(settings.http_host),
        )
    if settings.workers > 1:
        run_workers(settings, serve)
    else:
        serve(settings)
    log.info("stopped")


def serve(settings: Settings) -> None:
    """Run one instance of the app until interrupted (SIGTERM or SIGINT)."""
    # Imported here, not at the top: with several workers, prometheus_client must first be
    # imported in each worker, after the launcher pointed it at the shared metrics directory.
    from service.app import create_app

    try:
        import uvloop
    except ImportError:  # optional: the stock loop works, only slower
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    try:
        web.run_app(
            create_app(settings),
            host=settings.http_host,
            port=settings.http_port,
            reuse_port=settings.workers > 1,
            # Room for a 1024-byte key percent-encoded (up to 12 KiB) in the request line, so
            # an over-long key gets the API's JSON 400 rather than the HTTP parser's plain text.
            max_line_size=MAX_REQUEST_LINE_BYTES,
            max_field_size=MAX_REQUEST_LINE_BYTES,
            print=None,
            access_log=None,
            loop=loop_factory() if loop_factory else None,
        )
    except (TierError, OSError) as error:  # the SQLite file, the HTTP port taken: one line
        structlog.get_logger("tiercache").error("cannot start", error=str(error))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
