"""The gateway's Redis access: user state in one round trip per request, taste-profile
edits with compare-and-set, and listening events appended atomically, on one Redis server or
a Redis Cluster alike.

The active version (and its checkpoint) is cached here and refreshed every few seconds in
the background, never read per request (in a cluster that key would be one hot shard). A
reader passes its cached version to one Lua script that returns that version's embedding
and history with the user's taste-profile edits, live events and feedback sets: every key
it touches is declared and carries the user's hash tag, so it is one slot and one call, and
one answer never mixes two versions. Versions are complete when made current and the
publisher keeps the previous one, so a cache a few seconds old still reads a whole version.
An event is deduplicated, logged in its bucket's log shard and added to its user's live list
in one script. Key names come from :mod:`model_store.userstate.keys`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import structlog
from redis.exceptions import RedisClusterException

from model_store.userstate.connect import REDIS_ERRORS, async_client
from model_store.userstate.keys import (
    ACTIVE,
    BUCKETS,
    LIVE_MAX,
    bucket_log_key,
    bucket_of,
    bundle_of,
    decode_embedding,
    decode_history,
    dislikes_key,
    emb_field,
    hist_field,
    live_key,
    profile_key,
    seen_event_key,
    skips_key,
    state_key,
)
from model_store.userstate.publish import published_at
from service import metrics

log = structlog.get_logger(__name__)

LOG_LENGTH_CHUNK = 4096
"""XLENs per pipeline when the event log is counted (four round trips for 16384 shards)."""

# KEYS: state (of the cached version), profile, live, dislikes, skips; ARGV: embedding
# field, history field, '1' when a version is current.
_FETCH = """
local state = {false, false}
if ARGV[3] == '1' then state = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2]) end
local profile = redis.call('HMGET', KEYS[2], 'rev', 'edits')
return {state[1], state[2], profile[1], profile[2], redis.call('LRANGE', KEYS[3], 0, -1),
        redis.call('SMEMBERS', KEYS[4]), redis.call('SMEMBERS', KEYS[5])}
"""

# KEYS: the bucket's log shard, then per event (seen, live, dislikes, skips); ARGV: dedup
# seconds, live cap, then per event (id, user, uri, type, ts); all events of one bucket.
# Per event: its log entry id, or 0 when the id was seen before.
_APPEND_EVENTS = """
local out = {}
local k = 1
for b = 3, #ARGV, 5 do
  local id, uri, kind = ARGV[b], ARGV[b + 2], ARGV[b + 3]
  if redis.call('SET', KEYS[k + 1], '1', 'NX', 'EX', ARGV[1]) then
    local entry = redis.call('XADD', KEYS[1], '*', 'e', id, 'u', ARGV[b + 1], 'i', uri,
                             't', kind, 'ts', ARGV[b + 4])
    redis.call('RPUSH', KEYS[k + 2], entry .. ' ' .. kind .. ' ' .. uri)
    redis.call('LTRIM', KEYS[k + 2], -tonumber(ARGV[2]), -1)
    local dislikes, skips = KEYS[k + 3], KEYS[k + 4]
    if kind == 'dislike' then
      redis.call('SADD', dislikes, uri)
      redis.call('SREM', skips, uri)
    elseif kind == 'skip' then
      redis.call('SADD', skips, uri)
    elseif kind == 'like' then
      redis.call('SREM', dislikes, uri)
      redis.call('SREM', skips, uri)
    end
    out[#out + 1] = entry
  else
    out[#out + 1] = 0
  end
  k = k + 4
end
return out
"""

# Compare-and-set of a user's taste-profile edits: writes only when the stored revision is
# the one the caller read, and bumps it.
_SET_EDITS = """
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if tonumber(ARGV[1]) ~= rev then return {0, rev} end
redis.call('HSET', KEYS[1], 'rev', rev + 1, 'edits', ARGV[2])
return {1, rev + 1}
"""


class Unavailable(RuntimeError):
    """Something stored in Redis cannot be reached now; `retry_after_s`: when Redis will be
    tried again (None: waiting will not help, e.g. none is configured)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreUnavailable(Unavailable):
    """Redis did not answer in time, or is being skipped after a recent failure."""


@dataclass(frozen=True)
class UserState:
    """What Redis holds for one user; `embedding`/`history` are None when not published."""

    version: str | None
    embedding: np.ndarray | None
    history: np.ndarray | None
    edits: str | None = None  # taste-profile edits, JSON
    revision: int = 0  # of the edits
    checkpoint: str | None = None  # the last log position the version's histories include
    live: tuple[str, ...] = ()  # recent events, `<log id> <type> <URI>`, oldest first
    dislikes: frozenset[str] = frozenset()  # URIs
    skips: frozenset[str] = frozenset()  # URIs

    @property
    def bundle_version(self) -> str | None:
        return None if self.version is None else bundle_of(self.version)


@dataclass(frozen=True)
class LoggedEvent:
    """An event to append: already validated, its item known to the catalog."""

    event_id: str
    user_id: str
    item: str  # URI
    type: str
    ts: float


_published_at = lru_cache(maxsize=8)(published_at)
"""When a version was published (each version parsed once)."""


WHOLE = ""
"""The cool-down's unit for a single server, and for a cluster whose topology is not known."""


class Cooldowns:
    """Until when each unit of Redis is skipped after a failure: a cluster node (so a dead
    primary costs only its own users' answers and its own slots' events), or the whole
    single server."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._until: dict[str, float] = {}

    def left(self, units: set[str]) -> float:
        """Seconds until every one of `units` is tried again (0: none is skipped)."""
        now = time.monotonic()
        return max((self._until.get(u, 0.0) - now for u in units | {WHOLE}), default=0.0)

    def open(self, units: set[str]) -> None:
        until = time.monotonic() + self.seconds
        for unit in units:
            self._until[unit] = until


class UserStore:
    """The gateway's reader: one round trip per request, short timeouts, no retries, and
    after a failure the server (in a cluster, the node) is skipped for `cooldown_s`, so a
    dead one costs nothing.

    `cluster`: `url` names any node of a Redis Cluster. `refresh_s`: how often the active
    version is read again (a flip reaches the gateway within this plus one round trip)."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        cooldown_s: float,
        *,
        cluster: bool = False,
        refresh_s: float = 2.0,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.cluster = cluster
        self.refresh_s = refresh_s
        self._client: Any = async_client(url, timeout_s, cluster)
        self._fetch: Any = self._client.register_script(_FETCH)
        self._set_edits: Any = self._client.register_script(_SET_EDITS)
        self._append_events: Any = self._client.register_script(_APPEND_EVENTS)
        self._cooling = Cooldowns(cooldown_s)
        self._active: tuple[str | None, str | None] | None = None  # (version, checkpoint)
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def client(self) -> Any:
        """The client (timeouts, no retries), for other users of the same Redis."""
        return self._client

    def _units(self, keys: tuple[str, ...]) -> set[str]:
        """What a call on `keys` depends on: the nodes that serve them in a cluster (none for
        a call without keys: it neither waits for a node nor closes one), else the server."""
        if not self.cluster:
            return {WHOLE}
        try:
            return {self._client.get_node_from_key(k).name for k in keys}
        except RedisClusterException:  # slots not read yet: the cluster is all we know
            return {WHOLE}

    async def call(self, coro: Any, *keys: str) -> Any:
        """Awaits one Redis call on `keys`: StoreUnavailable when it fails, or when a node
        it needs failed in the last `cooldown_s` (then it is not sent)."""
        units = self._units(keys)
        left = self._cooling.left(units)
        if left > 0:
            coro.close()
            raise StoreUnavailable("redis skipped after a recent failure", left)
        try:
            return await coro
        except REDIS_ERRORS as e:
            self._cooling.open(units)
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}", self.cooldown_s) from e

    async def active_version(self) -> tuple[str | None, str | None]:
        """(version, checkpoint) served now, as cached: read at the first call, then every
        `refresh_s` by a background task (a failed refresh keeps the cached one)."""
        if self._active is None:
            await self._refresh()
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_loop())
        assert self._active is not None
        return self._active

    async def _refresh(self) -> None:
        reply = await self.call(self._client.hmget(ACTIVE, ["version", "checkpoint"]), ACTIVE)
        version, checkpoint = reply
        self._active = (_text(version), _text(checkpoint))
        at = _published_at(self._active[0]) if self._active[0] is not None else None
        if at is not None:  # the age metric follows the version served, requests or not
            metrics.embedding_published(at)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._refresh()
            except StoreUnavailable as e:
                log.warning("active version not refreshed; keeping the cached one", error=str(e))

    async def fetch(self, user: str) -> UserState:
        version, checkpoint = await self.active_version()
        keys = [
            state_key(version or "", user),
            profile_key(user),
            live_key(user),
            dislikes_key(user),
            skips_key(user),
        ]
        args = [emb_field(user), hist_field(user), "1" if version else "0"]
        reply = await self.call(self._fetch(keys=keys, args=args), keys[0])
        emb, hist, rev, edits, live, dislikes, skips = reply
        return UserState(
            version=version,
            embedding=None if emb is None else decode_embedding(emb),
            history=None if hist is None else decode_history(hist),
            edits=_text(edits),
            revision=int(rev or 0),
            checkpoint=checkpoint if version else None,
            live=tuple(e.decode() for e in live),
            dislikes=frozenset(u.decode() for u in dislikes),
            skips=frozenset(u.decode() for u in skips),
        )

    async def append_events(self, events: list[LoggedEvent], dedup_s: int) -> list[str | None]:
        """Logs each event not seen in the last `dedup_s` seconds and adds it to its user's
        live list, atomically per bucket (one script call per bucket the events touch, all
        at once): its log entry id, or None for a duplicate, per event. A failed call fails
        the whole batch; events it did log are duplicates when the client sends the batch
        again."""
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            groups.setdefault(bucket_of(e.user_id), []).append(i)
        batches = []
        for bucket, members in groups.items():
            keys = [bucket_log_key(bucket)]
            args: list[str | int | float] = [dedup_s, LIVE_MAX]
            for i in members:
                e = events[i]
                u = e.user_id
                keys += [seen_event_key(u, e.event_id), live_key(u), dislikes_key(u), skips_key(u)]
                args += [e.event_id, u, e.item, e.type, e.ts]
            batches.append((keys, args))
        replies = await self._append_all(batches)
        ids: list[str | None] = [None] * len(events)
        for members, reply in zip(groups.values(), replies, strict=True):
            for i, entry in zip(members, reply, strict=True):
                ids[i] = None if entry == 0 else entry.decode()
        return ids

    async def event_log_length(self) -> int:
        """Entries in the event log: every shard's length, summed (one XLEN per bucket, in a
        few pipelines; a cluster's pipeline sends each node its share)."""
        total = 0
        for start in range(0, BUCKETS, LOG_LENGTH_CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for bucket in range(start, min(start + LOG_LENGTH_CHUNK, BUCKETS)):
                pipe.xlen(bucket_log_key(bucket))
            total += sum(await self.call(pipe.execute()))
        return int(total)

    async def _append_all(self, batches: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One script call per bucket, all at once; none is sent while a node the batch
        needs is skipped, and each failed call closes its own node."""
        left = self._cooling.left(self._units(tuple(keys[0] for keys, _ in batches)))
        if left > 0:
            raise StoreUnavailable("redis skipped after a recent failure", left)
        calls = (self.call(self._append_events(keys=k, args=a), k[0]) for k, a in batches)
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def get_edits(self, user: str) -> tuple[int, str | None]:
        """(revision, edits JSON or None) of the user's taste profile."""
        key = profile_key(user)
        rev, edits = await self.call(self._client.hmget(key, ["rev", "edits"]), key)
        return int(rev or 0), None if edits is None else edits.decode()

    async def set_edits(self, user: str, expected_revision: int, edits: str) -> tuple[bool, int]:
        """Writes `edits` if the stored revision is `expected_revision`: (written, revision)."""
        key = profile_key(user)
        ok, rev = await self.call(self._set_edits(keys=[key], args=[expected_revision, edits]), key)
        return bool(ok), int(rev)

    async def ping(self) -> bool:
        """Reachability for /readyz; a failure also opens the cool-down."""
        try:
            return bool(await self.call(self._client.ping()))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        await self._client.aclose()


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()
