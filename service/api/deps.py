"""One-line accessors routers use to reach what the lifespan started."""

from __future__ import annotations

from fastapi import Request

from service.api.runtime import Runtime
from service.events import Events
from service.profiles import Profiles
from service.recommendations import Recommendations

REQUEST_ID_CHARS = 64


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def recommendations(request: Request) -> Recommendations:
    service = runtime(request).recommendations
    if service is None:
        raise RuntimeError("the service is not started")
    return service


def profiles(request: Request) -> Profiles:
    service = runtime(request).profiles
    if service is None:
        raise RuntimeError("the service is not started")
    return service


def events(request: Request) -> Events:
    service = runtime(request).events
    if service is None:
        raise RuntimeError("the service is not started")
    return service


def request_id(request: Request) -> str | None:
    """The caller's `X-Request-ID` (truncated), or None for a fresh one."""
    given = request.headers.get("x-request-id")
    return given[:REQUEST_ID_CHARS] if given else None
