"""Access control for the cache API: optional bearer tokens and a per-client rate limit,
as guards that `service.errors.instrumented` runs before the handler.

Tokens are compared in constant time, all of them every time, so neither a token nor which
kind of token was close can be learnt from response times. /health, /ready, /metrics and
/openapi.json stay open: they say nothing about cached data.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable

from aiohttp import web

from service.errors import Guard, error_response
from service.settings import Settings

PROTECTED_PREFIX = "/api/"
READ_METHODS = frozenset({"GET", "HEAD"})
#: Above this many tracked clients, forget those whose bucket has refilled.
MAX_TRACKED_CLIENTS = 10_000


def auth_guard(settings: Settings) -> Guard | None:
    """A guard requiring a bearer token on the API, or None when no token is set."""
    full = [t.get_secret_value().encode() for t in (settings.cache_api_token,
            settings.cache_write_token) if t is not None]  # fmt: skip
    read = [t.get_secret_value().encode() for t in (settings.cache_read_token,) if t]
    if not full and not read:
        return None

    def require_token(request: web.Request) -> web.StreamResponse | None:
        if not request.path.startswith(PROTECTED_PREFIX):
            return None
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        # aiohttp keeps a header's undecodable bytes as surrogates: they stay wrong bytes.
        given = (
            presented.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() == "bearer"
            else b""
        )
        # Compare against every token, always: the time taken must not depend on which.
        write_matches = [hmac.compare_digest(given, token) for token in full]
        read_matches = [hmac.compare_digest(given, token) for token in read]
        may_write, may_read = any(write_matches), any(read_matches)
        if not given or not (may_write or may_read):
            response = error_response(401, "missing or invalid bearer token")
            response.headers["WWW-Authenticate"] = 'Bearer realm="tiercache"'
            return response
        if not may_write and request.method not in READ_METHODS:
            return error_response(403, "this token may only read")
        return None

    return require_token


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


def rate_limit_guard(
    settings: Settings, clock: Callable[[], float] = time.monotonic
) -> Guard | None:
    """A token bucket per client address on the API, or None when no limit is set."""
    rate = settings.rate_limit_per_second
    if rate is None:
        return None
    burst = float(settings.rate_limit_burst or max(1, math.ceil(rate)))
    buckets: dict[str, _Bucket] = {}

    def limit(request: web.Request) -> web.StreamResponse | None:
        if not request.path.startswith(PROTECTED_PREFIX):
            return None
        now = clock()
        client = request.remote or "unknown"
        bucket = buckets.get(client)
        if bucket is None:
            if len(buckets) >= MAX_TRACKED_CLIENTS:
                for key in [
                    k for k, b in buckets.items() if b.tokens + (now - b.updated) * rate >= burst
                ]:
                    del buckets[key]
            bucket = buckets[client] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1:
            response = error_response(429, "rate limit exceeded")
            response.headers["Retry-After"] = str(math.ceil((1 - bucket.tokens) / rate))
            return response
        bucket.tokens -= 1
        return None

    return limit
