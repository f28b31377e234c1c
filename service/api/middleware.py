"""What every HTTP request passes first: its metrics, the lease on the bundle serving now (a
rollout meanwhile does not change it) and the `RateLimit-*` headers the guard left for the
answer (:func:`observe`), then the body-size cap (:class:`BodyLimit`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.auth import Quota
from service.api.errors import error_response
from service.api.runtime import Runtime

MAX_BODY_BYTES = 64 * 1024

Next = Callable[[Request], Awaitable[Response]]


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413, however it is sent.

    A declared `Content-Length` is checked before anything is read. A body without one
    (`Transfer-Encoding: chunked`) is read here up to the limit and handed on whole, so a
    client cannot stream past the cap by leaving the length out.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
        whole: list[Message] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"request body over {self.limit} bytes")(scope, receive, send)


def _endpoint(request: Request) -> str:
    """The metrics' endpoint label: the method and route template the request was routed
    to, or would have been had nothing refused it first (the body cap); else `unmatched`."""
    route = request.scope.get("route")
    if route is None:
        routes = request.app.router.routes
        route = next((r for r in routes if r.matches(request.scope)[0] == Match.FULL), None)
    return f"{request.method} {route.path}" if route is not None else "unmatched"


def observe(runtime: Runtime) -> Callable[[Request, Next], Awaitable[Response]]:
    """The middleware for a gateway with `runtime` (keys and rates are the routes' guard)."""

    async def middleware(request: Request, call_next: Next) -> Response:
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
            endpoint = _endpoint(request)
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
        quota: Quota | None = getattr(request.state, "quota", None)
        if quota is not None:
            response.headers.update(quota.headers())
        return response

    return middleware
