"""The OpenAPI document, made to say exactly what this gateway does.

FastAPI writes most of it from the routes; two things it writes differ from the behaviour:
security is declared even when the gateway has no keys (it then asks for none), and an
optional header or query parameter is typed "string or null", though HTTP cannot send a
null (a client that sends the word `null` is refused). Both are fixed here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

OPERATIONS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def install(app: FastAPI, keys_enforced: bool) -> None:
    """Makes `app.openapi()` return the corrected document (built once, then cached)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            for operation in _operations(document):
                if not keys_enforced:
                    operation.pop("security", None)
                for parameter in operation.get("parameters", []):
                    _absent_is_not_null(parameter)
            if not keys_enforced:
                document.get("components", {}).pop("securitySchemes", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        operation
        for item in document.get("paths", {}).values()
        for method, operation in item.items()
        if method in OPERATIONS
    ]


def _absent_is_not_null(parameter: dict[str, Any]) -> None:
    """`anyOf: [X, {type: null}]` of an optional parameter becomes X."""
    schema = parameter.get("schema", {})
    options = schema.get("anyOf")
    if parameter.get("required") or not isinstance(options, list):
        return
    kept = [o for o in options if o.get("type") != "null"]
    if len(kept) == 1 and len(kept) < len(options):
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        parameter["schema"] = {**kept[0], **rest}
