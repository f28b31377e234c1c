"""What every HTTP request passes first: the body-size cap, the lease on the bundle serving
now (a rollout meanwhile does not change it), its metrics, and the `RateLimit-*` headers
the guard left for the answer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from service import metrics
from service.api.auth import Quota
from service.api.errors import error_response
from service.api.runtime import Runtime

MAX_BODY_BYTES = 64 * 1024

Next = Callable[[Request], Awaitable[Response]]


def observe(runtime: Runtime) -> Callable[[Request, Next], Awaitable[Response]]:
    """The middleware for a gateway with `runtime` (keys and rates are the routes' guard)."""

    async def middleware(request: Request, call_next: Next) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")
        start = time.perf_counter()
        metrics.INFLIGHT.inc()
        status = 500  # what an exception escaping the app becomes
        try:
            if runtime.serving is None:  # the lifespan has not started it (yet)
                response = await call_next(request)
            else:
                with runtime.lease() as serving:
                    request.state.serving = serving
                    response = await call_next(request)
            status = response.status_code
        finally:
            metrics.INFLIGHT.dec()
            route = request.scope.get("route")
            endpoint = f"{request.method} {route.path}" if route is not None else "unmatched"
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
        quota: Quota | None = getattr(request.state, "quota", None)
        if quota is not None:
            response.headers.update(quota.headers())
        return response

    return middleware
