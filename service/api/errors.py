"""One table from each domain exception to its HTTP status and gRPC code.

REST handlers and the gRPC servicer both read it, so an error means the same thing on
either transport; anything not in the table is a server error (500 / INTERNAL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from model_store.catalog import UnknownItem
from service.events import EventsUnavailable
from service.profiles import ProfileUnavailable, StaleRevision


class ErrorBody(BaseModel):
    error: str
    detail: object = None


class BadRevision(ValueError):
    """An If-Match header that is not a revision number."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    code: grpc.StatusCode
    message: Callable[[Exception], str] = str
    detail: Callable[[Exception], object] = lambda _: None


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
    ProfileUnavailable: ErrorKind(
        503, grpc.StatusCode.UNAVAILABLE, message=lambda e: f"taste profile unavailable: {e}"
    ),
    EventsUnavailable: ErrorKind(
        503, grpc.StatusCode.UNAVAILABLE, message=lambda e: f"events unavailable: {e}"
    ),
    BadRevision: ErrorKind(400, grpc.StatusCode.INVALID_ARGUMENT),
    ValidationError: ErrorKind(422, grpc.StatusCode.INVALID_ARGUMENT, _validation_message),
}


def kind_of(exc: Exception) -> ErrorKind | None:
    """The table's entry for `exc` (or for its nearest base class); None: a server error."""
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return None


def error_response(status: int, message: str, detail: object = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=message, detail=detail).model_dump(), status_code=status)


def responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses` for the error statuses a route can send."""
    return {status: {"model": ErrorBody} for status in statuses}


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    kind = kind_of(exc)
    if kind is None:  # not reachable: handlers are registered for table entries only
        raise exc
    return error_response(kind.status, kind.message(exc), kind.detail(exc))


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return error_response(422, "invalid request", detail)


def install(app: FastAPI) -> None:
    """Registers the table's handlers (and the request-validation one) on `app`."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    for exc_type in ERRORS:
        if exc_type is not ValidationError:  # a response model failing is a server error
            app.add_exception_handler(exc_type, _domain_error)
