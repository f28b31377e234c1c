"""The batch write of user state: every user's embedding and history under a new version,
made current in one step once every key is written (readers never see half a version).

Works on one server and on a Redis Cluster alike: writes go to each primary on its own
connection (commands grouped by the node that owns their slot, never one multi-key command
across slots), and the flip is one script over the control keys, which share one slot."""

from __future__ import annotations

import calendar
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import numpy as np
import redis

from model_store.bundle import Bundle
from model_store.userstate.connect import SyncClient, node_clients, node_of
from model_store.userstate.keys import (
    ACTIVE,
    BUCKETS,
    CURRENT,
    EMB_FIELD,
    HIST_FIELD,
    NO_CHECKPOINT,
    VERSIONS,
    bucket_of,
    bucket_state_key,
    decode_embedding,
    decode_history,
    emb_field,
    encode_history,
    hist_field,
    meta_key,
    state_key,
)

KEEP_VERSIONS = 2
"""The active version and the previous one: a gateway whose cached version is a few seconds
old still reads a complete version."""
IN_FLIGHT = 4
"""Batches sent to a node before the first of their replies is read (bounded memory)."""

# KEYS: meta, versions, current, active; ARGV: version, checkpoint, then meta field/value
# pairs. One script over one slot: the version is recorded, listed and made current at once.
_FLIP = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[4], 'version', ARGV[1], 'checkpoint', ARGV[2])
return redis.call('LRANGE', KEYS[2], 0, -1)
"""


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
    client: SyncClient,
    version: str,
    user_ids: Sequence[str],
    embeddings: np.ndarray,
    histories: Sequence[np.ndarray],
    *,
    history_len: int = 1000,
    batch: int = 5000,
) -> int:
    """Writes the users' embeddings and histories under `version` (not yet current).

    Per batch, one HSET per bucket with its users' two fields, packed by hiredis and sent
    to the primary that owns the bucket; a few batches stay in flight per node, so the
    client packs batch i+1 while the nodes store batch i, and every node works at once.
    Idempotent (a retried batch is harmless); safe to call from many workers at once."""
    if len(user_ids) != len(embeddings) or len(user_ids) != len(histories):
        raise ValueError("user_ids, embeddings and histories must have equal lengths")
    half = np.asarray(embeddings, dtype="<f2")
    nodes = node_clients(client)
    where = node_of(client)
    keys = [bucket_state_key(version, b) for b in range(BUCKETS)]
    node_of_bucket = [where(k) for k in keys]
    with _Writers(nodes) as out:
        for part in _chunks(len(user_ids), batch):
            commands: dict[int, list[str | bytes]] = {}
            for i in range(part.start, part.stop):
                user = user_ids[i]
                bucket = bucket_of(user)
                args = commands.get(bucket)
                if args is None:
                    args = commands[bucket] = ["HSET", keys[bucket]]
                args += (
                    EMB_FIELD + user,  # emb_field(user), without a call per user
                    half[i].tobytes(),
                    HIST_FIELD + user,
                    encode_history(histories[i][-history_len:]),
                )
            per_node: dict[int, list[list[str | bytes]]] = {}
            for bucket, args in commands.items():
                per_node.setdefault(node_of_bucket[bucket], []).append(args)
            for node, batch_commands in per_node.items():
                out.send(node, batch_commands)
    return len(user_ids)


def read_user(
    client: SyncClient, version: str, user: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(embedding, history) of `user` in `version`, None where absent (tools and tests)."""
    raw: list[Any] = client.hmget(state_key(version, user), [emb_field(user), hist_field(user)])
    emb, hist = raw
    return (
        None if emb is None else decode_embedding(emb),
        None if hist is None else decode_history(hist),
    )


def current_version(client: SyncClient) -> str | None:
    """The version readers are served now (None before the first publish)."""
    raw = client.get(CURRENT)
    return raw.decode() if isinstance(raw, bytes) else raw


def listed_versions(client: SyncClient) -> list[str]:
    """The published versions not yet deleted, newest first (the current one included)."""
    return [v.decode() if isinstance(v, bytes) else v for v in client.lrange(VERSIONS, 0, -1)]


def flip(
    client: SyncClient,
    version: str,
    users: int,
    *,
    checkpoint: str = NO_CHECKPOINT,
    snapshot: str = "",
) -> list[str]:
    """Makes `version` current in one script that also records what it holds (`checkpoint`:
    the last event-log position its histories include; `snapshot`: where its Parquet copy
    is), then deletes versions older than the previous one. The deleted versions."""
    meta = {
        "checkpoint": checkpoint,
        "snapshot": snapshot,
        "users": str(users),
        "published_at": str(published_at(version) or time.time()),
    }
    pairs = [x for kv in meta.items() for x in kv]
    keys = [meta_key(version), VERSIONS, CURRENT, ACTIVE]
    listed = client.eval(_FLIP, len(keys), *keys, version, checkpoint, *pairs)
    stale = [v.decode() for v in listed[KEEP_VERSIONS:]]
    for old in stale:
        delete_version(client, old)
    return stale


def publish(
    client: SyncClient,
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
    """Writes every user's embedding and history under a new version, then flips the current
    version to it (one script) and deletes versions older than the previous one."""
    version = version or new_version(version_of)
    start = time.perf_counter()
    write_users(
        client, version, user_ids, embeddings, histories, history_len=history_len, batch=batch
    )
    seconds = time.perf_counter() - start
    deleted = flip(client, version, len(user_ids), checkpoint=checkpoint, snapshot=snapshot)
    return PublishReport(version, len(user_ids), seconds, deleted)


def delete_version(client: SyncClient, version: str) -> None:
    """Every key of `version` and its place in the list: one UNLINK per bucket (the key
    names are known, so no node is scanned), sent to each primary at once; Redis frees the
    hashes in the background."""
    where = node_of(client)
    per_node: dict[int, list[list[str | bytes]]] = {}
    for bucket in range(BUCKETS):
        key = bucket_state_key(version, bucket)
        per_node.setdefault(where(key), []).append(["UNLINK", key])
    with _Writers(node_clients(client)) as out:
        for node, commands in per_node.items():
            out.send(node, commands)
    client.unlink(meta_key(version))
    client.lrem(VERSIONS, 0, version)


def publish_bundle(client: SyncClient, bundle: Bundle, history_len: int = 1000) -> PublishReport:
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


class _Writers:
    """One connection per node, each with up to :data:`IN_FLIGHT` batches of replies
    outstanding; an error reply (or a lost node) is raised once the sends stop."""

    def __init__(self, nodes: Sequence[redis.Redis]) -> None:
        self._nodes = nodes
        self._conns: dict[int, Any] = {}  # redis-py connections
        self._pending: dict[int, deque[int]] = {}

    def __enter__(self) -> _Writers:
        return self

    def _conn(self, node: int) -> Any:
        conn = self._conns.get(node)
        if conn is None:
            conn = self._conns[node] = self._nodes[node].connection_pool.get_connection()
            self._pending[node] = deque()
        return conn

    def send(self, node: int, commands: list[list[str | bytes]]) -> None:
        packed = b"".join(hiredis.pack_command(tuple(c)) for c in commands)  # type: ignore[arg-type]
        self._conn(node).send_packed_command([packed])  # one write per batch
        pending = self._pending[node]
        pending.append(len(commands))
        if len(pending) > IN_FLIGHT:
            self._read(node, pending.popleft())

    def _read(self, node: int, replies: int) -> None:
        conn = self._conns[node]
        for _ in range(replies):
            conn.read_response()  # raises an error reply

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        failed = exc_type is not None
        try:
            for node, pending in self._pending.items():
                while pending and not failed:
                    try:
                        self._read(node, pending.popleft())
                    except BaseException:
                        failed = True
                        raise
        finally:
            for node, conn in self._conns.items():
                if failed:
                    conn.disconnect()  # replies left unread
                self._nodes[node].connection_pool.release(conn)
