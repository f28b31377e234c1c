"""Unit tests of the error table in `service.api.errors` and of If-Match revision parsing."""

from __future__ import annotations

import re

import grpc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from model_store.bundle import BundleError
from model_store.catalog import UnknownItem
from service.admission import Overloaded
from service.api import errors
from service.api.auth import Forbidden, Quota, RateLimited, Unauthenticated
from service.api.errors import ERRORS, kind_of
from service.api.routes.profiles import IF_MATCH, revision
from service.api.serving import BundleNotFound, OutsideRoot, RolloutBusy
from service.events import EventsUnavailable
from service.profiles import ProfileContended, ProfileUnavailable, StaleRevision, UnknownNames


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
        UnknownNames({"genres": ["thriler"]}),
        422,
        grpc.StatusCode.INVALID_ARGUMENT,
        "not in this catalog: genres 'thriler'",
        {"genres": ["thriler"]},
    ),
    (
        ProfileContended("the profile changed under 5 concurrent edits in a row; try again"),
        409,
        grpc.StatusCode.ABORTED,
        "the profile changed under 5 concurrent edits in a row; try again",
        None,
    ),
    (
        ProfileUnavailable("redis is down"),
        503,
        grpc.StatusCode.UNAVAILABLE,
        "taste profile unavailable: redis is down",
        None,
    ),
    (
        EventsUnavailable("redis is down"),
        503,
        grpc.StatusCode.UNAVAILABLE,
        "events unavailable: redis is down",
        None,
    ),
    (
        Overloaded("deadline", 2.2, "overloaded: the engine is busy"),
        503,
        grpc.StatusCode.UNAVAILABLE,
        "overloaded: the engine is busy",
        {"reason": "deadline", "retry_after_s": 3},
    ),
    (Unauthenticated("no key"), 401, grpc.StatusCode.UNAUTHENTICATED, "no key", None),
    (
        Forbidden("admin"),
        403,
        grpc.StatusCode.PERMISSION_DENIED,
        "this API key lacks the 'admin' scope",
        {"scope": "admin"},
    ),
    (
        RateLimited(Quota(limit=5, remaining=0, reset_s=4)),
        429,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate limit of 5 reached; retry in 4 s",
        {"retry_after_s": 4},
    ),
    (BundleNotFound("no bundle 'x'"), 404, grpc.StatusCode.NOT_FOUND, "no bundle 'x'", None),
    (
        OutsideRoot("'..' is outside"),
        403,
        grpc.StatusCode.PERMISSION_DENIED,
        "'..' is outside",
        None,
    ),
    (
        BundleError("b/catalog.parquet: sha256 does not match"),
        422,
        grpc.StatusCode.FAILED_PRECONDITION,
        "bundle refused: b/catalog.parquet: sha256 does not match",
        None,
    ),
    (RolloutBusy("busy"), 409, grpc.StatusCode.ABORTED, "busy", None),
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
    assert kind_of(ValueError("BundleError's base is not in the table")) is None
    assert kind_of(KeyError("UnknownItem's sibling")) is None
    assert kind_of(BundleNotFound("x")) is ERRORS[BundleNotFound]  # not its base's 422


def test_refusals_say_when_to_come_back() -> None:
    overloaded = Overloaded("queue_full", 0.2, "full")
    assert ERRORS[Overloaded].headers(overloaded) == {"Retry-After": "1"}  # at least 1 s
    limited = RateLimited(Quota(limit=5, remaining=0, reset_s=4))
    assert ERRORS[RateLimited].headers(limited) == {
        "Retry-After": "4",
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "4",
    }
    assert ERRORS[UnknownItem].headers(UnknownItem("x")) == {}
    # Redis skipped after a failure: back when its cool-down ends; none configured: never
    skipped = EventsUnavailable("redis skipped after a recent failure", 1.2)
    assert ERRORS[EventsUnavailable].headers(skipped) == {"Retry-After": "2"}
    assert ERRORS[ProfileUnavailable].headers(ProfileUnavailable("no Redis configured")) == {}


def app_raising() -> FastAPI:
    app = FastAPI()
    errors.install(app)
    raising: dict[str, Exception] = {
        "unknown": UnknownItem("ml-100k:movie:9"),
        "gone": GoneItem("ml-100k:movie:1"),
        "stale": StaleRevision(1, 3),
        "unavailable": ProfileUnavailable("no Redis configured"),
        "overloaded": Overloaded("deadline", 1.5, "overloaded"),
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
        (
            "overloaded",
            503,
            {"error": "overloaded", "detail": {"reason": "deadline", "retry_after_s": 2}},
        ),
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


@pytest.mark.parametrize("header", ["abc", "null", "", '"-1"', '"3.0"', 'W/"x"', '"3', "*"])
def test_if_match_refuses_what_is_not_a_revision(header: str) -> None:
    assert re.fullmatch(IF_MATCH, header) is None
    for good in ('"3"', 'W/"3"', "3", ' "12" ', '"0"'):
        assert re.fullmatch(IF_MATCH, good)


def test_framework_answers_get_the_error_shape_and_a_405_lists_every_method() -> None:
    app = FastAPI()
    errors.install(app)

    @app.get("/thing")
    async def read_thing() -> int:
        return 1

    @app.patch("/thing")
    async def patch_thing(body: Pair) -> int:
        return 2

    client = TestClient(app)
    for method in ("OPTIONS", "DELETE", "POST", "HEAD"):
        r = client.request(method, "/thing")
        assert r.status_code == 405 and (method == "HEAD" or r.json()["error"])
        assert r.headers["allow"] == "GET, PATCH"
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "not found", "detail": None}
    r = client.patch("/thing", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b'{"name": "a", "counts": [' + b"9" * 5000 + b"]}", "application/json", "4300 digits"),
        (b"[" * 30_000 + b"]" * 30_000, "application/json", "nested too deep"),
        (b'{"name": "a", "counts": []}', "text/plain", "it came as text/plain"),
        (b'{"name": "a", "counts": []}', None, "it came without one"),
    ],
)
def test_a_body_that_cannot_be_read_says_why(
    body: bytes, content_type: str | None, says: str
) -> None:
    app = FastAPI()
    errors.install(app)

    @app.post("/pairs")
    async def add_pair(pair: Pair) -> int:
        return len(pair.counts)

    headers = {"content-type": content_type} if content_type else {}
    r = TestClient(app).post("/pairs", content=body, headers=headers)
    assert r.status_code == 422
    assert says in r.json()["error"] + " ".join(d["msg"] for d in r.json()["detail"])
