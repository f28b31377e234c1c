"""One table from each domain exception to its HTTP status and gRPC code (and headers).

REST handlers and the gRPC servicer both read it, so an error means the same thing on
either transport; anything not in the table is a server error (500 / INTERNAL). What the
framework answers by itself (no route, a method the path does not have, a body that is not
even text) gets the same JSON error shape here, and a 405 names every method of the path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from model_store.bundle import BundleError
from model_store.catalog import UnknownItem
from service.admission import Overloaded, whole_seconds
from service.api.auth import Forbidden, RateLimited, Unauthenticated
from service.api.serving import BundleNotFound, OutsideRoot, RolloutBusy
from service.events import EventsUnavailable
from service.profiles import ProfileContended, ProfileUnavailable, StaleRevision, UnknownNames


class ErrorBody(BaseModel):
    error: str
    detail: object = None


@dataclass(frozen=True)
class ErrorKind:
    status: int
    code: grpc.StatusCode
    message: Callable[[Exception], str] = str
    detail: Callable[[Exception], object] = lambda _: None
    headers: Callable[[Exception], dict[str, str]] = lambda _: {}


def _validation_message(e: Exception) -> str:
    errors = e.errors() if isinstance(e, ValidationError) else []
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors)


ERRORS: dict[type[Exception], ErrorKind] = {
    UnknownItem: ErrorKind(
        404, grpc.StatusCode.NOT_FOUND, detail=lambda e: {"uri": getattr(e, "uri", None)}
    ),
    StaleRevision: ErrorKind(
        412,
        grpc.StatusCode.FAILED_PRECONDITION,
        detail=lambda e: {"revision": getattr(e, "current", None)},
    ),
    UnknownNames: ErrorKind(
        422, grpc.StatusCode.INVALID_ARGUMENT, detail=lambda e: getattr(e, "unknown", None)
    ),
    ProfileContended: ErrorKind(409, grpc.StatusCode.ABORTED),
    ProfileUnavailable: ErrorKind(
        503,
        grpc.StatusCode.UNAVAILABLE,
        message=lambda e: f"taste profile unavailable: {e}",
        headers=lambda e: _retry_after(e),
    ),
    EventsUnavailable: ErrorKind(
        503,
        grpc.StatusCode.UNAVAILABLE,
        message=lambda e: f"events unavailable: {e}",
        headers=lambda e: _retry_after(e),
    ),
    Overloaded: ErrorKind(  # RESOURCE_EXHAUSTED is the caller's own quota (429)
        503,
        grpc.StatusCode.UNAVAILABLE,
        detail=lambda e: {"reason": getattr(e, "reason", None), "retry_after_s": _retry(e)},
        headers=lambda e: _retry_after(e),
    ),
    Unauthenticated: ErrorKind(
        401, grpc.StatusCode.UNAUTHENTICATED, headers=lambda _: {"WWW-Authenticate": "Bearer"}
    ),
    Forbidden: ErrorKind(
        403,
        grpc.StatusCode.PERMISSION_DENIED,
        detail=lambda e: {"scope": getattr(e, "scope", None)},
    ),
    RateLimited: ErrorKind(
        429,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        detail=lambda e: {"retry_after_s": _quota_reset(e)},
        headers=lambda e: {"Retry-After": str(_quota_reset(e)), **_quota_headers(e)},
    ),
    BundleNotFound: ErrorKind(404, grpc.StatusCode.NOT_FOUND),
    OutsideRoot: ErrorKind(403, grpc.StatusCode.PERMISSION_DENIED),
    BundleError: ErrorKind(
        422, grpc.StatusCode.FAILED_PRECONDITION, message=lambda e: f"bundle refused: {e}"
    ),
    RolloutBusy: ErrorKind(409, grpc.StatusCode.ABORTED),
    ValidationError: ErrorKind(422, grpc.StatusCode.INVALID_ARGUMENT, _validation_message),
}


def _retry(e: Exception) -> int:
    return e.retry_after if isinstance(e, Overloaded) else 1


def _retry_after(e: Exception) -> dict[str, str]:
    """`Retry-After` in whole seconds (at least 1) when the error says when to come back:
    the engine's expected wait, or the rest of Redis's cool-down after a failure."""
    seconds = getattr(e, "retry_after_s", None)
    return {} if seconds is None else {"Retry-After": str(whole_seconds(seconds))}


def _quota_reset(e: Exception) -> int:
    return e.quota.reset_s if isinstance(e, RateLimited) else 1


def _quota_headers(e: Exception) -> dict[str, str]:
    return e.quota.headers() if isinstance(e, RateLimited) else {}


def kind_of(exc: Exception) -> ErrorKind | None:
    """The table's entry for `exc` (or for its nearest base class); None: a server error."""
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return None


def error_response(
    status: int, message: str, detail: object = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=message, detail=detail).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _header(description: str, required: bool = True, kind: str = "integer") -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": kind}}


RATE_HEADERS = {
    "RateLimit-Limit": _header("Requests allowed in the window.", required=False),
    "RateLimit-Remaining": _header("Requests left in the window.", required=False),
    "RateLimit-Reset": _header("Seconds until the window resets.", required=False),
}
"""On every answer of a rate-limited gateway (IETF draft `RateLimit` header fields)."""

ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": _header("`Bearer`.", kind="string")},
    429: {
        "Retry-After": _header("Seconds until the key's window resets."),
        **{name: {**spec, "required": True} for name, spec in RATE_HEADERS.items()},
    },
    503: {"Retry-After": _header("Seconds to wait before trying again.", False)},
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can send, with their headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorBody}
        if status in ERROR_HEADERS:
            out[status]["headers"] = ERROR_HEADERS[status]
    return out


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    kind = kind_of(exc)
    if kind is None:  # not reachable: handlers are registered for table entries only
        raise exc
    return error_response(kind.status, kind.message(exc), kind.detail(exc), kind.headers(exc))


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return error_response(422, _invalid_message(request, errors), detail)


def _invalid_message(request: Request, errors: Sequence[Any]) -> str:
    """The 422's message; it says so when the body was not even sent as JSON (the framework
    then reads no fields, and its own message speaks only of a missing dictionary)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return "invalid request"
    if not any(tuple(e["loc"][:1]) == ("body",) for e in errors):
        return "invalid request"
    came = f"as {media}" if media else "without one"
    return f"invalid request: send the body as JSON, content-type application/json (it came {came})"


async def _framework_error(request: Request, exc: Exception) -> JSONResponse:
    """The framework's own answers in the error shape. A body it cannot even decode is
    invalid input like any other (422); a 405 lists every method the path has."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 400:
        msg = f"the body cannot be read as JSON: {_unreadable(exc.__cause__)}"
        detail = [{"loc": ["body"], "msg": msg, "type": "json_invalid"}]
        return error_response(422, "invalid request", detail)
    headers = None
    if status == 405:
        headers = {"Allow": ", ".join(allowed_methods(request))}
    message = exc.detail if isinstance(exc, HTTPException) else "error"
    return error_response(status, str(message).lower(), headers=headers)


def _unreadable(cause: BaseException | None) -> str:
    """Why a body failed before JSON syntax was even checked (syntax errors come as
    validation errors with their position)."""
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8"
    if isinstance(cause, RecursionError):
        return "its arrays or objects are nested too deep"
    if isinstance(cause, ValueError):  # e.g. an integer past Python's digit limit
        return str(cause).split(";")[0]
    return "it is not UTF-8 JSON"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (routes are one per method)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Registers the table's handlers (and the request-validation one) on `app`."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _framework_error)
    for exc_type in ERRORS:
        if exc_type is not ValidationError:  # a response model failing is a server error
            app.add_exception_handler(exc_type, _domain_error)
