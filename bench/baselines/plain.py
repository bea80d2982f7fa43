"""Baseline "plain": an aiohttp handler returning a fixed JSON (the Python HTTP ceiling).

    python bench/baselines/plain.py --port 18080 [--uvloop] [--mode fixed|dict] [--keys 10000]

--mode fixed (default) answers every GET /api/performance/cache/{key} with one constant
object through `web.json_response`, the way anyone writes it. --mode dict serves the value
from an in-process dict filled at start-up (k1..kN), 404 otherwise: "aiohttp serving from an
in-process dict". --uvloop swaps in uvloop's event loop. No access log, no middleware.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

FIXED = {
    "success": True,
    "value": {"id": 1, "name": "item-1", "tags": ["bench", "cache"], "score": 0.5},
    "source": "cache",
    "tier": "redis",
    "ttl": None,
}


def value_for(i: int) -> dict:
    return {"id": i, "name": f"item-{i}", "tags": ["bench", "cache"], "score": 0.5}


def make_app(mode: str, keys: int) -> web.Application:
    app = web.Application()
    if mode == "fixed":

        async def get(request: web.Request) -> web.Response:
            return web.json_response(FIXED)

    else:
        data = {f"k{i}": json.dumps(value_for(i)) for i in range(1, keys + 1)}

        async def get(request: web.Request) -> web.Response:
            raw = data.get(request.match_info["key"])
            if raw is None:
                return web.json_response({"success": False, "error": "not found"}, status=404)
            return web.json_response({"success": True, "value": json.loads(raw)})

    app.router.add_get("/api/performance/cache/{key}", get)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["fixed", "dict"], default="fixed")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        make_app(args.mode, args.keys),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
