"""API keys: when the gateway has any, every /v1 request and gRPC call must carry one."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/ui")
"""Probes, scrapes, docs and the page itself stay open; its data calls (/v1) do not."""


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `Authorization: Bearer KEY` or `X-API-Key: KEY` (header names lower-case)."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def authorized(key: str | None, keys: Iterable[str]) -> bool:
    """Constant-time comparison against every configured key."""
    if key is None:
        return False
    return any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


def needs_key(path: str, keys: Iterable[str]) -> bool:
    return any(True for _ in keys) and not path.startswith(PUBLIC_PREFIXES)
