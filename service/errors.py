"""What wraps every request: its id, its latency, and a JSON error for every failure
(4xx for bad input, 503 for a refused write, 500 logged once).

No traceback ever leaves the process; each request carries an id (the client's X-Request-ID
or a fresh one) that its log lines share. This is done by wrapping each route's handler when
it is registered, not by a middleware: with any middleware at all aiohttp runs two extra
coroutine layers per request, and the route's latency label is known at registration. The
optional access guards (service.security) run inside the wrapper too, so their refusals are
timed and JSON like any other answer. A catch-all route registered last answers unknown
paths (404) and wrong methods (405) in JSON.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service.keys import metrics_key
from service.metrics import Metrics

log = structlog.get_logger("tiercache.http")

_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-"
REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_LENGTH = 128


def error_response(status: int, message: str) -> web.Response:
    return web.json_bytes_response(
        {"success": False, "error": message}, status=status, dumps=orjson.dumps
    )


class WriteRejected(Exception):
    """The durable tier could not take a write or delete; no tier changed."""


class BadRequest(Exception):
    """Input the API refuses: becomes a 4xx JSON error and changes nothing."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


#: Runs before a handler: a response refusing the request, or None to let it through.
Guard = Callable[[web.Request], web.StreamResponse | None]


def instrumented(
    handler: Handler, route: str, metrics: Metrics, guards: Sequence[Guard] = ()
) -> Handler:
    """`handler` behind `guards`, with a request id its log lines share, its latency observed
    under `route` (the route's template, not the concrete path), and a JSON answer for any
    failure."""
    observe = metrics.duration_observer(route)

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID_HEADER, "")[:MAX_REQUEST_ID_LENGTH]
        structlog.contextvars.bind_contextvars(
            request_id=request_id or _ID_PREFIX + str(next(_ids))
        )
        try:
            for guard in guards:
                refusal = guard(request)
                if refusal is not None:
                    return refusal
            return await handler(request)
        except Exception as error:
            return _error_reply(request, error)
        finally:
            observe(time.perf_counter() - started)

    return handle


async def unmatched(request: web.Request) -> web.StreamResponse:
    """The catch-all route: 405 with `Allow` when another route has this path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _error_reply(request: web.Request, error: Exception) -> web.StreamResponse:
    """The JSON error for a failure; redirects and other non-errors go on as they are."""
    if isinstance(error, BadRequest):
        _count_rejected(request, "bad_request")
        return error_response(error.status, str(error))
    if isinstance(error, WriteRejected):
        _count_rejected(request, "unavailable")
        return error_response(503, "the durable tier could not take the write; nothing changed")
    if isinstance(error, web.HTTPException):
        if error.status < 400:
            raise error
        reason = error.reason
        allow = error.headers.get("Allow", "")
        if error.status == 413:
            reason = "request body too large"
        elif error.status == 405:
            reason = f"method {request.method} not allowed here; allowed: {allow}"
        elif error.status == 404:
            reason = f"no route for {request.path}"
        response = error_response(error.status, reason)
        if allow:
            response.headers["Allow"] = allow
        return response
    log.exception("unhandled error", method=request.method, path=request.path)
    _count_rejected(request, "error")
    return error_response(500, "internal error")


_OPERATIONS = {"POST": "set", "GET": "get", "HEAD": "head", "DELETE": "delete"}


def _count_rejected(request: web.Request, outcome: str) -> None:
    """Count requests that ended in an error response (handlers count their successes)."""
    operation = _OPERATIONS.get(request.method, "other")
    request.app[metrics_key].count_request(operation, outcome)
