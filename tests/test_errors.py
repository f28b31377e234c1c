"""Unit tests of the error table in `service.api.errors` and of If-Match revision parsing."""

from __future__ import annotations

import grpc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from model_store.catalog import UnknownItem
from service.api import errors
from service.api.errors import ERRORS, BadRevision, kind_of
from service.api.routes.profiles import revision
from service.profiles import ProfileUnavailable, StaleRevision


class Pair(BaseModel):
    name: str
    counts: list[int]


def validation_error() -> ValidationError:
    try:
        Pair.model_validate({"counts": [1, "many"]})
    except ValidationError as e:
        return e
    raise AssertionError("the model accepted a bad value")


class GoneItem(UnknownItem):
    """A subclass the table does not name."""


CASES: list[tuple[Exception, int, grpc.StatusCode, str, object]] = [
    (
        UnknownItem("ml-100k:movie:9"),
        404,
        grpc.StatusCode.NOT_FOUND,
        "unknown item 'ml-100k:movie:9'",
        {"uri": "ml-100k:movie:9"},
    ),
    (
        StaleRevision(2, 5),
        412,
        grpc.StatusCode.FAILED_PRECONDITION,
        "revision 2 is stale; the profile is at revision 5",
        {"revision": 5},
    ),
    (
        ProfileUnavailable("redis is down"),
        503,
        grpc.StatusCode.UNAVAILABLE,
        "taste profile unavailable: redis is down",
        None,
    ),
    (BadRevision("not a number"), 400, grpc.StatusCode.INVALID_ARGUMENT, "not a number", None),
    (
        validation_error(),
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
        "name: Field required; counts.1: Input should be a valid integer, "
        "unable to parse string as an integer",
        None,
    ),
]


def test_every_table_entry_is_covered() -> None:
    assert set(ERRORS) == {type(exc) for exc, *_ in CASES}


@pytest.mark.parametrize(("exc", "status", "code", "message", "detail"), CASES)
def test_each_domain_error_maps_to_its_status_code_and_body(
    exc: Exception, status: int, code: grpc.StatusCode, message: str, detail: object
) -> None:
    kind = kind_of(exc)
    assert kind is not None
    assert (kind.status, kind.code) == (status, code)
    assert kind.message(exc) == message
    assert kind.detail(exc) == detail


def test_kind_of_walks_base_classes_and_leaves_the_rest_to_the_server() -> None:
    assert kind_of(GoneItem("ml-100k:movie:1")) is ERRORS[UnknownItem]
    assert kind_of(RuntimeError("boom")) is None
    assert kind_of(ValueError("BadRevision's base is not in the table")) is None
    assert kind_of(KeyError("UnknownItem's sibling")) is None


def app_raising() -> FastAPI:
    app = FastAPI()
    errors.install(app)
    raising: dict[str, Exception] = {
        "unknown": UnknownItem("ml-100k:movie:9"),
        "gone": GoneItem("ml-100k:movie:1"),
        "stale": StaleRevision(1, 3),
        "unavailable": ProfileUnavailable("no Redis configured"),
        "bad-revision": BadRevision("If-Match must be a revision number"),
        "validation": validation_error(),
        "boom": RuntimeError("boom"),
    }

    @app.get("/raise/{name}")
    async def raise_it(name: str) -> None:
        raise raising[name]

    @app.get("/typed")
    async def typed(n: int) -> int:
        return n

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(app_raising(), raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("name", "status", "body"),
    [
        (
            "unknown",
            404,
            {"error": "unknown item 'ml-100k:movie:9'", "detail": {"uri": "ml-100k:movie:9"}},
        ),
        (
            "gone",
            404,
            {"error": "unknown item 'ml-100k:movie:1'", "detail": {"uri": "ml-100k:movie:1"}},
        ),
        (
            "stale",
            412,
            {
                "error": "revision 1 is stale; the profile is at revision 3",
                "detail": {"revision": 3},
            },
        ),
        (
            "unavailable",
            503,
            {"error": "taste profile unavailable: no Redis configured", "detail": None},
        ),
        ("bad-revision", 400, {"error": "If-Match must be a revision number", "detail": None}),
    ],
)
def test_installed_handlers_answer_with_status_and_error_body(
    client: TestClient, name: str, status: int, body: dict[str, object]
) -> None:
    response = client.get(f"/raise/{name}")
    assert response.status_code == status
    assert response.json() == body


@pytest.mark.parametrize("name", ["validation", "boom"])
def test_a_failing_response_model_and_unknown_errors_are_server_errors(
    client: TestClient, name: str
) -> None:
    assert client.get(f"/raise/{name}").status_code == 500


def test_an_invalid_request_is_422_with_each_problem_in_detail(client: TestClient) -> None:
    response = client.get("/typed", params={"n": "many"})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid request"
    assert [(d["loc"], d["type"]) for d in body["detail"]] == [(["query", "n"], "int_parsing")]
    assert client.get("/typed", params={"n": "4"}).json() == 4


@pytest.mark.parametrize(
    ("header", "expected"),
    [('"3"', 3), ('W/"3"', 3), ("3", 3), (' "12" ', 12), ('"0"', 0), (None, None)],
)
def test_revision_reads_if_match(header: str | None, expected: int | None) -> None:
    assert revision(header) == expected


@pytest.mark.parametrize("header", ["abc", "null", "", '"-1"', '"3.0"', 'W/"x"'])
def test_revision_refuses_what_is_not_a_number(header: str) -> None:
    with pytest.raises(BadRevision, match="If-Match must be a revision number"):
        revision(header)
