"""The batch write of user state: every user's embedding and history under a new version,
made current in one step once every key is written (readers never see half a version)."""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import hiredis
import numpy as np
import redis
from redis.typing import EncodableT, FieldT

from model_store.bundle import Bundle
from model_store.userstate.keys import (
    CURRENT,
    EMB,
    HIST,
    NO_CHECKPOINT,
    VERSIONS,
    encode_history,
    meta_key,
    versioned_key,
)

KEEP_VERSIONS = 2  # the active one and the one readers may still be using


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


def new_version(bundle_version: str) -> str:
    """A fresh version name: ``<bundle version>@<UTC publish time>``."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now / 1e9))
    return f"{bundle_version}@{stamp}{now % 10**6:06d}"


def published_at(version: str) -> float | None:
    """Seconds since the epoch when `version` was made (None for a foreign name)."""
    _, _, stamp = version.partition("@")
    try:
        return calendar.timegm(time.strptime(stamp[:15], "%Y%m%dT%H%M%S"))
    except ValueError:
        return None


def write_users(
    client: redis.Redis,
    version: str,
    user_ids: Sequence[str],
    embeddings: np.ndarray,
    histories: Sequence[np.ndarray],
    *,
    history_len: int = 1000,
    batch: int = 5000,
) -> int:
    """Writes the users' embeddings and histories under `version` (not yet current).

    Each batch is one MSET of 2 × `batch` keys packed by hiredis, and a few batches stay in
    flight on one connection: the client packs batch i+1 while Redis stores batch i, instead
    of a round trip (or a command) per user. Safe to call from many workers at once.
    """
    if len(user_ids) != len(embeddings) or len(user_ids) != len(histories):
        raise ValueError("user_ids, embeddings and histories must have equal lengths")
    half = np.asarray(embeddings, dtype="<f2")
    emb_prefix, hist_prefix = versioned_key(EMB, version, ""), versioned_key(HIST, version, "")
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
    return len(user_ids)


def current_version(client: redis.Redis) -> str | None:
    """The version readers are served now (None before the first publish)."""
    raw = client.get(CURRENT)
    return raw.decode() if isinstance(raw, bytes) else raw


def flip(
    client: redis.Redis,
    version: str,
    users: int,
    *,
    checkpoint: str = NO_CHECKPOINT,
    snapshot: str = "",
) -> list[str]:
    """Makes `version` current in one SET, after recording what it holds (`checkpoint`: the
    last event-log entry its histories include; `snapshot`: where its Parquet copy is), then
    deletes versions older than the previous one. The deleted versions."""
    meta: dict[FieldT, EncodableT] = {
        "checkpoint": checkpoint,
        "snapshot": snapshot,
        "users": str(users),
        "published_at": str(published_at(version) or time.time()),
    }
    client.hset(meta_key(version), mapping=meta)
    client.lpush(VERSIONS, version)
    client.set(CURRENT, version)
    return _delete_old_versions(client)


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
    checkpoint: str = NO_CHECKPOINT,
    snapshot: str = "",
) -> PublishReport:
    """Writes every user's embedding and history under a new version, then flips
    ``emb:current`` to it (one atomic SET) and deletes versions older than the previous one."""
    version = version or new_version(version_of)
    start = time.perf_counter()
    write_users(
        client, version, user_ids, embeddings, histories, history_len=history_len, batch=batch
    )
    seconds = time.perf_counter() - start
    deleted = flip(client, version, len(user_ids), checkpoint=checkpoint, snapshot=snapshot)
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
        delete_version(client, version)
    return stale


def delete_version(client: redis.Redis, version: str, chunk: int = 10_000) -> None:
    """Every key of `version` (embeddings, histories, meta) and its place in the list."""
    for kind in (EMB, HIST):
        batch: list[bytes] = []
        for key in client.scan_iter(match=versioned_key(kind, version, "*"), count=chunk):
            batch.append(key)
            if len(batch) >= chunk:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    client.unlink(meta_key(version))
    client.lrem(VERSIONS, 0, version)


def publish_bundle(client: redis.Redis, bundle: Bundle, history_len: int = 1000) -> PublishReport:
    """Publishes the bundle's own user embeddings and histories: the daily job's first run,
    without Ray, consuming no logged events (every live event stays visible after it)."""
    users = bundle.users["user_id"].astype(str).tolist()
    return publish(
        client,
        bundle.version,
        users,
        bundle.user_embeddings,
        bundle.histories.to_lists(),
        history_len=history_len,
    )
