"""HTTP handlers: parse and validate, call the cascade, shape the JSON. No cache logic here."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from service import glob
from service.errors import BadRequest, Guard, error_response, instrumented, unmatched
from service.keys import cascade_key, metrics_key, mode_key, settings_key

API = "/api/performance/cache"
STATS_KEY = "stats"
MAX_KEY_BYTES = 1024
#: Ten years: longer is "forever" for a cache, and keeps expiry times within every tier's range.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600

routes = web.RouteTableDef()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_bytes_response(data, status=status, dumps=orjson.dumps)


def _check_length(key: str) -> str:
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(f"key is longer than {MAX_KEY_BYTES} bytes")
    return key


def _key(request: web.Request) -> str:
    return _check_length(request.match_info["key"])


def _hit_rate(hits: float, misses: float) -> str:
    total = hits + misses
    return "0%" if total == 0 else f"{hits / total * 100:.2f}%"


def _count(op: str, outcome: str, request: web.Request) -> None:
    request.app[metrics_key].count_request(op, outcome)


@routes.post(API)
async def set_value(request: web.Request) -> web.Response:
    settings = request.app[settings_key]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with key, value and optional ttl")
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise BadRequest("key must be a non-empty string")
    _check_length(key)
    if key == STATS_KEY:
        raise BadRequest(f"the key {STATS_KEY!r} is reserved for the stats route")
    if "value" not in body:
        raise BadRequest("value is required (any JSON value, null included)")
    ttl = body.get("ttl")
    if ttl is not None and (type(ttl) is not int or not 0 < ttl <= MAX_TTL_SECONDS):
        raise BadRequest(f"ttl must be a whole number of seconds from 1 to {MAX_TTL_SECONDS}")
    # A copy: orjson's own result keeps a ~4 KiB allocation behind even a tiny value, which
    # the memory tier would hold on to (measured: RSS 5x its configured bound).
    raw = bytes(memoryview(orjson.dumps(body["value"])))
    if len(raw) > settings.cache_max_value_bytes:
        raise BadRequest(
            f"value is {len(raw)} bytes, over the limit of {settings.cache_max_value_bytes}",
            status=413,
        )
    await request.app[cascade_key].set(key, raw, ttl or settings.cache_default_ttl_seconds)
    _count("set", "ok", request)
    return _json({"success": True, "message": "Cache set successfully"})


@routes.get(API + "/" + STATS_KEY)
async def stats(request: web.Request) -> web.Response:
    cascade = request.app[cascade_key]
    mode = request.app[mode_key]
    registry = request.app[metrics_key].registry

    def counter(name: str, tier: str) -> float:
        return registry.get_sample_value(f"tiercache_tier_{name}_total", {"tier": tier}) or 0.0

    tiers: dict[str, dict[str, Any]] = {}
    for tier in ("memory", "database", "redis"):
        hits, misses = counter("hits", tier), counter("misses", tier)
        tiers[tier] = {"hits": int(hits), "misses": int(misses), "hitRate": _hit_rate(hits, misses)}
    tiers["memory"]["entries"] = len(cascade.memory)
    tiers["memory"]["bytes"] = cascade.memory.bytes_used
    tiers["database"]["total_entries"] = await cascade.database.count()
    tiers["redis"]["connected"] = mode.redis_usable
    tiers["redis"]["errors"] = int(counter("errors", "redis"))
    tiers["redis"]["server"] = await cascade.redis_server_stats()
    return _json({
        "success": True,
        "mode": mode.name,
        "degradedSince": mode.degraded_since(),
        **tiers,
    })  # fmt: skip


@routes.get(API + "/{key:(?s:.+)}", allow_head=False)
async def get_value(request: web.Request) -> web.Response:
    key = _key(request)
    hit = await request.app[cascade_key].get(key)
    if hit is None:
        _count("get", "miss", request)
        return error_response(404, f"key not found: {key}")
    _count("get", "hit", request)
    ttl = hit.entry.ttl_seconds(time.time())
    # The stored bytes are already the value's JSON: splice them in rather than re-encode.
    body = b"".join((
        b'{"success":true,"value":', hit.entry.raw,
        b',"source":"cache","tier":"', hit.tier.encode(),
        b'","ttl":', b"null" if ttl is None else str(ttl).encode(), b"}",
    ))  # fmt: skip
    return web.Response(body=body, content_type="application/json")


@routes.head(API + "/{key:(?s:.+)}")
async def has_value(request: web.Request) -> web.Response:
    found = await request.app[cascade_key].contains(_key(request))
    _count("head", "hit" if found else "miss", request)
    return web.Response(status=200 if found else 404)


@routes.delete(API + "/{key:(?s:.+)}")
async def delete(request: web.Request) -> web.Response:
    target = _key(request)
    cascade = request.app[cascade_key]
    if glob.is_pattern(target):
        if target.strip("*?") == "" and request.query.get("confirm") != "all":
            raise BadRequest(
                f"the pattern {target!r} matches every key, or nearly; add ?confirm=all to mean it"
            )
        deleted, complete = await cascade.delete_pattern(
            target, request.app[settings_key].cache_max_pattern_delete_keys
        )
        _count("delete_pattern", "ok", request)
        return _json({"success": True, "deleted": deleted, "complete": complete})
    key = glob.unescape(target)
    if key == STATS_KEY:
        raise BadRequest(f"the key {STATS_KEY!r} is reserved for the stats route")
    deleted = await cascade.delete(key)
    _count("delete", "ok", request)
    return _json({"success": True, "deleted": deleted})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    mode = request.app[mode_key]
    return _json({
        "status": "ok", "mode": mode.name, "degradedSince": mode.degraded_since(),
        "pid": os.getpid(),
    })  # fmt: skip


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    mode = request.app[mode_key]
    if not await request.app[cascade_key].database.ready():
        return _json({"ready": False, "mode": mode.name, "reason": "sqlite unavailable"}, 503)
    return _json({"ready": True, "mode": mode.name})


OPENAPI_DOCUMENT = Path(__file__).with_name("openapi.json")


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 document of this API (service/openapi.json)."""
    return web.Response(body=OPENAPI_DOCUMENT.read_bytes(), content_type="application/json")


def setup_routes(app: web.Application, guards: Sequence[Guard] = ()) -> None:
    """Register every route, each handler wrapped by `instrumented` behind `guards`, then the
    catch-all (last: it matches every path)."""
    metrics = app[metrics_key]
    exposition = make_aiohttp_handler(metrics.exposition)
    mode = app[mode_key]

    async def scrape(request: web.Request) -> web.StreamResponse:
        # The degraded-time counter is otherwise brought up to date at each monitor tick,
        # which is up to the backoff cap (30 s) apart during an outage: a scrape sees it now.
        mode.account_degraded_time()
        return await exposition(request)

    for definition in [*routes, web.get("/metrics", scrape)]:
        assert isinstance(definition, web.RouteDef), "only plain routes are defined here"
        # The resource the route joins (aiohttp reuses the last one for the same path).
        name = definition.kwargs.get("name")
        template = app.router.add_resource(definition.path, name=name).canonical
        handler = instrumented(definition.handler, template, metrics, guards)
        web.RouteDef(definition.method, definition.path, handler, definition.kwargs).register(
            app.router
        )
    # `(?s:…)`: a path may hold a newline (%0A), which `.` alone does not match.
    catch_all = instrumented(unmatched, "unmatched", metrics, guards)
    app.router.add_route("*", "/{path:(?s:.*)}", catch_all)
