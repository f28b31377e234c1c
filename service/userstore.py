"""The gateway's reader of user state in Redis: one round trip per request.

A reader gets the version, embedding, history and taste-profile edits in one Lua script
call, so it never sees a half-published version (``emb:current`` flips only after every
key of a version is written). Key names come from :mod:`model_store.userstate.keys`.
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
    HIST,
    bundle_of,
    decode_embedding,
    decode_history,
    lua_versioned_key,
    profile_key,
)

_FETCH = f"""
local profile = redis.call('HMGET', KEYS[2], 'rev', 'edits')
local v = redis.call('GET', KEYS[1])
if not v then return {{false, false, false, profile[1], profile[2]}} end
return {{v, redis.call('GET', {lua_versioned_key(EMB, "v", "ARGV[1]")}),
        redis.call('GET', {lua_versioned_key(HIST, "v", "ARGV[1]")}), profile[1], profile[2]}}
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
        return None if self.version is None else bundle_of(self.version)


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
