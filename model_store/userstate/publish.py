"""The batch write of user state: every user's embedding and history under a new version,
made current in one step once every key is written (readers never see half a version)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import hiredis
import numpy as np
import redis

from model_store.bundle import Bundle
from model_store.userstate.keys import (
    CURRENT,
    EMB,
    HIST,
    VERSIONS,
    encode_history,
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
        for pattern in (versioned_key(EMB, version, "*"), versioned_key(HIST, version, "*")):
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
