"""Several engine servers behind one remote engine: search affinity, health, failover.

vLLM's prefix cache is per server. One search asks the engine L times (one call per SID
level), each time with the same prompts plus one more token, so its levels hit the cache
only if they all reach the server that computed the prompts at level 0. A Kubernetes
Service spreads connections, not searches; so the gateway picks the replica itself, once
per search, by rendezvous (highest-random-weight) hashing of the search's key over the
healthy replicas: every replica gets an even share, and when one leaves, only its searches
move, spread evenly over the others.

A replica that refuses a connection, drops one, or answers 5xx is marked down; the search
redoes that level on the next replica in its rendezvous order (each level's requests carry
the whole prompt, so nothing is lost but cache). A background thread probes every
replica's `/health` and brings a down one back once it answers again. (With a router in
front instead, one URL, every request of a search carries the search's key in a header
the router can hash on: see `SESSION_HEADER` in :mod:`model_store.engines.remote`.)
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from model_store.generation import Prompt

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
"""Seconds between two `/health` probes of every replica (when there are several)."""


@dataclass(eq=False)
class Replica:
    """One engine server: its URL, its connection pool, and what the gateway knows of it."""

    url: str
    client: httpx.Client
    healthy: bool = True
    served: int = 0  # engine calls it answered
    failures: int = 0  # engine calls it failed (each moved to another replica or failed)


def search_key(prompts: Sequence[Prompt]) -> bytes:
    """A stable key of a search: its first prompt's tokens and soft rows.

    The same user searched again lands on the same replica (whose cache may still hold the
    prompt), and different batches spread like their first users.
    """
    first = prompts[0]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(first.token_ids, dtype=np.int64).tobytes())
    if first.soft is not None:
        digest.update(np.ascontiguousarray(first.soft, dtype=np.float32).tobytes())
    return digest.digest()


def rendezvous_weight(key: bytes, replica: Replica) -> int:
    """The replica's random weight for `key`; the search goes to the heaviest."""
    digest = hashlib.blake2b(replica.url.encode() + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ReplicaSet:
    """The engine servers, each with its own connection pool and health flag."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float,
        max_connections: int,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        clean = [u.rstrip("/") for u in urls]
        if not clean:
            raise ValueError("no engine server URL")
        if len(set(clean)) != len(clean):
            raise ValueError(f"engine server URLs repeat: {clean}")
        self.replicas = [
            Replica(
                url,
                httpx.Client(
                    base_url=url,
                    timeout=httpx.Timeout(timeout_s),
                    limits=httpx.Limits(
                        max_connections=max_connections, max_keepalive_connections=max_connections
                    ),
                ),
            )
            for url in clean
        ]
        self.health_interval_s = health_interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if len(self.replicas) > 1 and health_interval_s > 0:
            self._thread = threading.Thread(target=self._watch, name="engine-health", daemon=True)
            self._thread.start()

    def __len__(self) -> int:
        return len(self.replicas)

    def order(self, key: bytes) -> list[Replica]:
        """Replicas to try for `key`: healthy ones by rendezvous weight, then the down ones
        in the same order (a last resort: one may be back before its probe says so)."""
        ranked = sorted(self.replicas, key=lambda r: rendezvous_weight(key, r), reverse=True)
        return [r for r in ranked if r.healthy] + [r for r in ranked if not r.healthy]

    def mark_down(self, replica: Replica, reason: str) -> None:
        with self._lock:
            was, replica.healthy = replica.healthy, False
        if was and len(self.replicas) > 1:
            log.warning("engine replica down: %s: %s", replica.url, reason)

    def record(self, replica: Replica, *, ok: bool) -> None:
        """Counts an engine call the replica answered (`ok`) or failed; a down replica
        that answered (tried as a last resort) is up again."""
        with self._lock:
            if ok:
                replica.served += 1
                was, replica.healthy = replica.healthy, True
            else:
                replica.failures += 1
                was = True
        if not was and len(self.replicas) > 1:
            log.warning("engine replica back: %s", replica.url)

    def probe(self, replica: Replica, timeout_s: float) -> bool | None:
        """True: `/health` answered 200 within `timeout_s`; False: refused, dropped or
        non-200; None: no answer in time (load or a partition: cannot tell)."""
        return self._health(replica, timeout_s)[0]

    def _health(self, replica: Replica, timeout_s: float) -> tuple[bool | None, str]:
        try:
            response = replica.client.get("/health", timeout=httpx.Timeout(timeout_s))
        except httpx.TimeoutException as exc:
            return None, repr(exc)
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client was closed
            return False, repr(exc)
        return response.status_code == 200, f"HTTP {response.status_code}"

    def check(self, timeout_s: float) -> None:
        """Probes every replica once: a down one that answers comes back; a healthy one
        that fails twice in a row goes down (one dropped keep-alive connection is not a
        dead server). A slow answer is load, not death, and does not move searches (that
        would cascade)."""
        for replica in self.replicas:
            up, why = self._health(replica, timeout_s)
            if up is False and replica.healthy:
                up, why = self._health(replica, timeout_s)
                if up is False:
                    self.mark_down(replica, f"health check: {why}")
            elif up and not replica.healthy:
                replica.healthy = True
                log.warning("engine replica back: %s", replica.url)

    def _watch(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            self.check(min(1.0, self.health_interval_s))

    def close(self) -> None:
        """Stops the health probes and closes every connection pool; idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        for replica in self.replicas:
            replica.client.close()


class Route:
    """One search's way through the replicas: the replica that answered its first level
    keeps the others while it is healthy (its cache holds the prompts); otherwise the
    search's rendezvous order decides."""

    def __init__(self, replicas: ReplicaSet, key: bytes) -> None:
        self.replicas = replicas
        self.key = key
        self.pinned: Replica | None = None

    def candidates(self) -> list[Replica]:
        """Replicas to try for the next level, best first."""
        order = self.replicas.order(self.key)
        pinned = self.pinned
        if pinned is not None and pinned.healthy and order[0] is not pinned:
            order.remove(pinned)
            order.insert(0, pinned)
        return order

    def served(self, replica: Replica) -> None:
        self.pinned = replica
