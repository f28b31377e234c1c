"""What routers use: accessors for what the lifespan started (the bundle serving this
request, leased by the middleware), and the guard every /v1 route declares."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import presented_key
from service.api.errors import RATE_HEADERS, responses
from service.api.runtime import Runtime
from service.api.serving import Serving
from service.events import Events
from service.profiles import Profiles
from service.recommendations import Recommendations

REQUEST_ID_CHARS = 64
GUARD_STATUSES = (401, 403, 429)
"""What the guard can answer on any /v1 route: no key, a key without the scope, over rate."""

# Declared for the OpenAPI document (either header works); the guard reads the key itself.
BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY`")
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: KEY`")


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def serving(request: Request) -> Serving:
    """The bundle this request started on (a rollout meanwhile does not change it)."""
    leased: Serving | None = getattr(request.state, "serving", None)
    if leased is None:
        raise RuntimeError("the service is not started")
    return leased


def recommendations(request: Request) -> Recommendations:
    return serving(request).recommendations


def profiles(request: Request) -> Profiles:
    return serving(request).profiles


def events(request: Request) -> Events:
    return serving(request).events


def request_id(request: Request) -> str | None:
    """The caller's `X-Request-ID` (truncated), or None for a fresh one."""
    given = request.headers.get("x-request-id")
    return given[:REQUEST_ID_CHARS] if given else None


def require(scope: str) -> Any:
    """The dependency that lets a request in only with a key holding `scope`, within its
    rate; the quota it leaves goes into the response's `RateLimit-*` headers."""

    async def check(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        _key: Annotated[str | None, Depends(API_KEY)],
    ) -> None:
        client = request.client.host if request.client else "unknown"
        guard = runtime(request).guard
        quota = await guard.check(presented_key(request.headers), scope, client)
        if quota is not None:
            request.state.quota = quota

    return Security(check, scopes=[scope])


def guarded(
    scope: str,
    *statuses: int,
    ok: int = 200,
    extra: dict[int | str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Route options of a /v1 route: the scope it needs, checked before anything else, and
    every status it can answer, documented; the success (`ok`) carries the `RateLimit-*`
    headers, and `extra` adds to the documented responses (more headers, links)."""
    documented = responses(*GUARD_STATUSES, *statuses)
    documented[ok] = {"headers": dict(RATE_HEADERS)}
    for status, more in (extra or {}).items():
        entry = documented.setdefault(status, {})
        headers = {**entry.get("headers", {}), **more.get("headers", {})}
        entry.update(more)
        if headers:
            entry["headers"] = headers
    return {"dependencies": [require(scope)], "responses": documented}
