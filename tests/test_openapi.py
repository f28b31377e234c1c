"""The OpenAPI document says what the gateway does (the live check is test_contract.py):
security only when keys are enforced, no null headers, every status with its headers."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings


def document(monkeypatch: pytest.MonkeyPatch, keys: str | None) -> dict[str, Any]:
    if keys is None:
        monkeypatch.delenv("GENREC_API_KEYS", raising=False)
    else:
        monkeypatch.setenv("GENREC_API_KEYS", keys)
    return create_app(Settings()).openapi()


def test_security_is_declared_only_when_keys_are_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    open_doc = document(monkeypatch, None)
    assert "securitySchemes" not in open_doc.get("components", {})
    assert all("security" not in op for item in open_doc["paths"].values() for op in item.values())
    keyed = document(monkeypatch, "k1:read,k2")
    schemes = keyed["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer" and schemes["APIKeyHeader"]["in"] == "header"
    paths = keyed["paths"]
    needs = {
        ("/v1/recommendations", "post"): "read",
        ("/v1/users/{user_id}/taste-profile", "get"): "read",
        ("/v1/users/{user_id}/taste-profile", "patch"): "write",
        ("/v1/events", "post"): "write",
        ("/v1/admin/bundle", "post"): "admin",
    }
    for (path, method), scope in needs.items():
        assert paths[path][method]["security"] == [
            {"HTTPBearer": [scope]},
            {"APIKeyHeader": [scope]},
        ]
    assert "security" not in paths["/readyz"]["get"]


def test_statuses_headers_and_links(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = document(monkeypatch, None)["paths"]
    recommend = paths["/v1/recommendations"]["post"]["responses"]
    assert set(recommend) == {"200", "401", "403", "404", "413", "422", "429", "503"}
    assert recommend["429"]["headers"]["Retry-After"]["required"] is True
    assert recommend["429"]["headers"]["RateLimit-Remaining"]["required"] is True
    assert set(recommend["503"]["headers"]) == {"Retry-After"}
    assert "RateLimit-Limit" in recommend["200"]["headers"]
    assert set(paths["/v1/events"]["post"]["responses"]) >= {"202", "429", "503"}
    patch = paths["/v1/users/{user_id}/taste-profile"]["patch"]
    (if_match,) = [p for p in patch["parameters"] if p["name"] == "if-match"]
    assert if_match["schema"]["type"] == "string" and "anyOf" not in if_match["schema"]
    assert if_match["schema"]["pattern"].startswith("^")
    get = paths["/v1/users/{user_id}/taste-profile"]["get"]["responses"]["200"]
    assert "ETag" in get["headers"]
    link = get["links"]["patch_taste_profile"]
    assert link["parameters"]["header.if-match"] == "$response.header.ETag"
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_nothing_from_outside(page: str) -> None:
    """Every script, style and icon of the docs pages comes from the gateway itself: a
    cluster without egress shows them too."""
    client = TestClient(create_app(Settings()))  # no lifespan: nothing else starts
    html = client.get(page).text
    assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assert len(assets) >= 2 and not [a for a in assets if "//" in a], assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_every_bound_is_written_as_json_schema_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic leaves a bound it cannot place as its own `ge`/`le` (an optional field
    whose type carries a validator): JSON Schema knows no such keyword, so a client, or
    the contract test, sends what the gateway refuses."""
    schemas = document(monkeypatch, None)["components"]["schemas"]
    assert not _keys(schemas) & {"ge", "le", "gt", "lt"}
