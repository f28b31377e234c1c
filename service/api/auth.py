"""API keys, their scopes and their rates: who may call what, and how often.

Keys and scopes come from `GENREC_API_KEYS` (`service.settings.parse_api_keys`). Each route
and gRPC method names the scope it needs, and both transports ask one :class:`Guard`, so a
key means the same on either. Rates (a key's own, else `GENREC_RATE_LIMIT`) are counted per
key (per client address when the gateway has no keys) in fixed windows in the gateway's
Redis, through the `limits` library, so a key's budget holds across every gateway pod. When
Redis does not answer, requests pass: a rate limit must not turn a Redis outage into a total
one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from service import metrics
from service.settings import ApiKey
from service.userstore import StoreUnavailable, UserStore

log = structlog.get_logger(__name__)


class Unauthenticated(Exception):
    """No API key, or one the gateway does not know."""


class Forbidden(Exception):
    """The API key is known but lacks the scope the call needs."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"this API key lacks the {scope!r} scope")
        self.scope = scope


@dataclass(frozen=True)
class Quota:
    """Where a caller stands in its current window (the IETF `RateLimit-*` fields)."""

    limit: int
    remaining: int
    reset_s: int  # seconds until the window resets

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }


class RateLimited(Exception):
    """The caller used up its window; `quota.reset_s` says when the next one starts."""

    def __init__(self, quota: Quota) -> None:
        super().__init__(f"rate limit of {quota.limit} reached; retry in {quota.reset_s} s")
        self.quota = quota


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `Authorization: Bearer KEY` or `X-API-Key: KEY` (header names lower-case)."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def grant_of(key: str | None, keys: Mapping[str, ApiKey]) -> ApiKey | None:
    """What `key` may do, compared in constant time with every configured key; None: not a
    key of this gateway."""
    if key is None:
        return None
    found = None
    for known, grant in keys.items():
        if hmac.compare_digest(key.encode(), known.encode()):
            found = grant
    return found


def limits_uri(redis_url: str, cluster: bool = False) -> str:
    """The `limits` storage URI of a Redis URL (`redis://`, `rediss://`, `unix://`); with
    `cluster`, of the Redis Cluster the node at `redis_url` belongs to."""
    if cluster:
        return "async+redis+cluster://" + redis_url.split("://", 1)[1]
    if redis_url.startswith("unix://"):
        return "async+redis+unix://" + redis_url.removeprefix("unix://")
    return "async+" + redis_url


class RateLimiter:
    """Fixed windows per caller in the gateway's Redis, through the store (its cool-down
    after a failure): over the store's connections on one server; on a Redis Cluster over a
    cluster client of its own with the store's timeouts and no retries (each window is one
    key, so any slot serves)."""

    def __init__(self, store: UserStore) -> None:
        self.store = store
        self._items: dict[str, RateLimitItem] = {}
        uri = limits_uri(store.url, store.cluster)
        storage: RedisStorage
        if store.cluster:
            timeout: Any = store.timeout_s  # `limits` types its options as scalars
            retry: Any = Retry(NoBackoff(), 0)
            storage = RedisClusterStorage(
                uri,
                implementation="redispy",
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=retry,
            )
        else:
            pool: Any = store.client.connection_pool
            storage = RedisStorage(uri, implementation="redispy", connection_pool=pool)
        self._limiter = FixedWindowRateLimiter(storage)

    async def hit(self, identity: str, rate: str) -> Quota | None:
        """Counts one call against `rate`; :class:`RateLimited` past it, None when Redis is
        away."""
        item = self._items.get(rate) or self._items.setdefault(rate, parse(rate))
        # The window's key as `limits` names it: in a cluster, the node whose cool-down holds.
        key = f"{RedisStorage.PREFIX}:{item.key_for(identity)}"
        try:
            allowed = await self.store.call(self._limiter.hit(item, identity), key)
            stats = await self.store.call(self._limiter.get_window_stats(item, identity), key)
        except StoreUnavailable as e:
            metrics.REDIS_ERRORS.labels("rate_limit").inc()
            log.warning("rate limit not counted", error=str(e))
            return None
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        quota = Quota(item.amount, stats.remaining, reset)
        if not allowed:
            metrics.SHED.labels("rate_limit").inc()
            raise RateLimited(quota)
        return quota


class Guard:
    """Authentication, scopes and rates for every call, REST or gRPC."""

    def __init__(
        self, keys: Mapping[str, ApiKey], rate: str | None, store: UserStore | None
    ) -> None:
        self.keys = keys
        self.rate = rate
        rated = rate is not None or any(grant.rate for grant in keys.values())
        self.limiter = RateLimiter(store) if rated and store is not None else None

    async def check(self, key: str | None, scope: str, client: str) -> Quota | None:
        """Raises :class:`Unauthenticated`, :class:`Forbidden` or :class:`RateLimited`;
        otherwise the caller's quota (None without a rate limit)."""
        identity, rate = f"client:{client}", self.rate
        if self.keys:
            grant = grant_of(key, self.keys)
            if grant is None:
                raise Unauthenticated(
                    "missing or unknown API key (Authorization: Bearer KEY or X-API-Key: KEY)"
                )
            if scope not in grant.scopes:
                raise Forbidden(scope)
            # The key itself never reaches Redis, only a digest of it.
            identity = "key:" + hashlib.sha256(str(key).encode()).hexdigest()[:24]
            rate = grant.rate or rate
        if self.limiter is None or rate is None:
            return None
        return await self.limiter.hit(identity, rate)
