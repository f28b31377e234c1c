"""The gateway's Redis access: user state in one round trip per request, taste-profile
edits with compare-and-set, and listening events appended atomically.

A reader gets the version (and its checkpoint), embedding, history, taste-profile edits,
live events and feedback sets in one Lua script call, so it never sees a half-published
version (``emb:current`` flips only after every key of a version is written). An event is
deduplicated, logged and added to its user's live list in one script. Key names come from
:mod:`model_store.userstate.keys`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from model_store.userstate.keys import (
    CURRENT,
    EMB,
    EVENT_LOG,
    HIST,
    LIVE_MAX,
    bundle_of,
    decode_embedding,
    decode_history,
    dislikes_key,
    live_key,
    lua_key,
    lua_meta_key,
    lua_versioned_key,
    profile_key,
    seen_event_key,
    skips_key,
)

# KEYS: current, profile, live, dislikes, skips; ARGV: user.
_FETCH = f"""
local profile = redis.call('HMGET', KEYS[2], 'rev', 'edits')
local live = redis.call('LRANGE', KEYS[3], 0, -1)
local dislikes = redis.call('SMEMBERS', KEYS[4])
local skips = redis.call('SMEMBERS', KEYS[5])
local v = redis.call('GET', KEYS[1])
if not v then
  return {{false, false, false, profile[1], profile[2], false, live, dislikes, skips}}
end
return {{v, redis.call('GET', {lua_versioned_key(EMB, "v", "ARGV[1]")}),
        redis.call('GET', {lua_versioned_key(HIST, "v", "ARGV[1]")}), profile[1], profile[2],
        redis.call('HGET', {lua_meta_key("v")}, 'checkpoint'), live, dislikes, skips}}
"""

# KEYS: the event log; ARGV: dedup seconds, live cap, then (id, user, uri, type, ts) per
# event. Per event: its log entry id, or 0 when the id was seen before. Then the log length.
_APPEND_EVENTS = f"""
local out = {{}}
for b = 3, #ARGV, 5 do
  local id, user, uri, kind = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  if redis.call('SET', {lua_key(seen_event_key, "id")}, '1', 'NX', 'EX', ARGV[1]) then
    local entry = redis.call('XADD', KEYS[1], '*', 'e', id, 'u', user, 'i', uri, 't', kind,
                             'ts', ARGV[b + 4])
    local live = {lua_key(live_key, "user")}
    redis.call('RPUSH', live, entry .. ' ' .. kind .. ' ' .. uri)
    redis.call('LTRIM', live, -tonumber(ARGV[2]), -1)
    local dislikes, skips = {lua_key(dislikes_key, "user")}, {lua_key(skips_key, "user")}
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
end
out[#out + 1] = redis.call('XLEN', KEYS[1])
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
    checkpoint: str | None = None  # the last logged event the version's histories include
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
        self._append_events: Any = self._client.register_script(_APPEND_EVENTS)
        self._down_until = 0.0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def mark_down(self) -> None:
        self._down_until = time.monotonic() + self.cooldown_s

    @property
    def pool(self) -> aredis.ConnectionPool:
        """The connections (timeouts, no retries), for other clients of the same Redis."""
        return self._client.connection_pool

    async def call(self, coro: Any) -> Any:
        """Awaits one Redis call: StoreUnavailable when it fails or Redis is being skipped."""
        if not self.healthy:
            coro.close()
            raise StoreUnavailable("redis skipped after a recent failure")
        try:
            return await coro
        except (redis.RedisError, OSError) as e:
            self.mark_down()
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def fetch(self, user: str) -> UserState:
        keys = [CURRENT, profile_key(user), live_key(user), dislikes_key(user), skips_key(user)]
        reply = await self.call(self._fetch(keys=keys, args=[user]))
        version, emb, hist, rev, edits, checkpoint, live, dislikes, skips = reply
        return UserState(
            version=_text(version),
            embedding=None if emb is None else decode_embedding(emb),
            history=None if hist is None else decode_history(hist),
            edits=_text(edits),
            revision=int(rev or 0),
            checkpoint=_text(checkpoint),
            live=tuple(e.decode() for e in live),
            dislikes=frozenset(u.decode() for u in dislikes),
            skips=frozenset(u.decode() for u in skips),
        )

    async def append_events(
        self, events: list[LoggedEvent], dedup_s: int
    ) -> tuple[list[str | None], int]:
        """Logs each event not seen in the last `dedup_s` seconds and adds it to its user's
        live list, atomically: (log entry id, or None for a duplicate, per event; log length)."""
        args: list[str | int | float] = [dedup_s, LIVE_MAX]
        for e in events:
            args += [e.event_id, e.user_id, e.item, e.type, e.ts]
        reply = await self.call(self._append_events(keys=[EVENT_LOG], args=args))
        ids = [None if entry == 0 else entry.decode() for entry in reply[:-1]]
        return ids, int(reply[-1])

    async def get_edits(self, user: str) -> tuple[int, str | None]:
        """(revision, edits JSON or None) of the user's taste profile."""
        rev, edits = await self.call(self._client.hmget(profile_key(user), ["rev", "edits"]))
        return int(rev or 0), None if edits is None else edits.decode()

    async def set_edits(self, user: str, expected_revision: int, edits: str) -> tuple[bool, int]:
        """Writes `edits` if the stored revision is `expected_revision`: (written, revision)."""
        ok, rev = await self.call(
            self._set_edits(keys=[profile_key(user)], args=[expected_revision, edits])
        )
        return bool(ok), int(rev)

    async def ping(self) -> bool:
        """Reachability for /readyz; a failure also opens the cool-down."""
        try:
            return bool(await self.call(self._client.ping()))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self._client.aclose()


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()
