"""What every HTTP request passes first: the API key, the body-size cap, and its metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from service import metrics
from service.api.auth import authorized, needs_key, presented_key
from service.api.errors import error_response

MAX_BODY_BYTES = 64 * 1024

Next = Callable[[Request], Awaitable[Response]]


def observe(api_keys: list[str]) -> Callable[[Request, Next], Awaitable[Response]]:
    """The middleware for a gateway with `api_keys` (none: every request passes)."""

    async def middleware(request: Request, call_next: Next) -> Response:
        if needs_key(request.url.path, api_keys) and not authorized(
            presented_key(request.headers), api_keys
        ):
            return error_response(401, "missing or unknown API key (Authorization: Bearer KEY)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")
        start = time.perf_counter()
        metrics.INFLIGHT.inc()
        status = 500  # what an exception escaping the app becomes
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            metrics.INFLIGHT.dec()
            route = request.scope.get("route")
            endpoint = f"{request.method} {route.path}" if route is not None else "unmatched"
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
        return response

    return middleware
