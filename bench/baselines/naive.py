"""Baseline "naive": aiohttp + redis-py, `await redis.get(key)` + `json_response`.

    python bench/baselines/naive.py --port 18081 --redis-port 16379 [--fast]

Written the way a typical user writes it: one module-level `redis.asyncio.Redis` with its
default settings (default pool, redis-py's default 5 s socket timeout and retries), the
stdlib `json`, the stock asyncio loop, and redis-py's pure-Python RESP parser, which is what
`pip install redis` gives (hiredis is an extra; this venv has it because the service asks for
`redis[hiredis]`, so it is switched off here explicitly).

--fast is "naive + hiredis + orjson + uvloop": the same handler with the three speed-ups a
user can get without changing the code's shape.

Routes: GET /api/performance/cache/{key} (the value stored at {key} in Redis, 404 when
absent) and POST /api/performance/cache ({"key","value","ttl"?} -> SET).
"""

from __future__ import annotations

import argparse
import json

import redis.asyncio as aioredis
from aiohttp import web


def make_app(redis_port: int, fast: bool) -> web.Application:
    if fast:
        import orjson

        loads, dumps = orjson.loads, lambda v: orjson.dumps(v).decode()
        client = aioredis.Redis(host="127.0.0.1", port=redis_port)  # hiredis: the default
    else:
        from redis._parsers import _AsyncRESP2Parser

        loads, dumps = json.loads, json.dumps
        # What redis-py does without hiredis installed (it picks the RESP2/3 Python parser).
        client = aioredis.Redis(host="127.0.0.1", port=redis_port)
        # Everything else as Redis(host, port) sets it; only the parser is the pure-Python
        # one (redis-py switches it to its RESP3 twin when the protocol asks for it).
        client.connection_pool.connection_kwargs["parser_class"] = _AsyncRESP2Parser

    async def get(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value = await client.get(key)
        if value is None:
            return web.json_response(
                {"success": False, "error": f"key not found: {key}"}, status=404, dumps=dumps
            )
        return web.json_response(
            {"success": True, "value": loads(value), "source": "redis"}, dumps=dumps
        )

    async def post(request: web.Request) -> web.Response:
        body = await request.json(loads=loads)
        await client.set(body["key"], dumps(body["value"]), ex=body.get("ttl"))
        return web.json_response(
            {"success": True, "message": "Cache set successfully"}, dumps=dumps
        )

    async def close(app: web.Application) -> None:
        await client.aclose()

    app = web.Application()
    app.router.add_get("/api/performance/cache/{key}", get)
    app.router.add_post("/api/performance/cache", post)
    app.on_cleanup.append(close)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args()
    loop = None
    if args.fast:
        import uvloop

        loop = uvloop.new_event_loop()
    # run_app's defaults otherwise (its access logger stays silent below INFO, as by default).
    web.run_app(
        make_app(args.redis_port, args.fast), host=args.host, port=args.port, print=None, loop=loop
    )


if __name__ == "__main__":
    main()
