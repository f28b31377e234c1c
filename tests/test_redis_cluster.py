"""User state on a real Redis Cluster (three primaries, three replicas on loopback ports):
publishing, the daily job's log reads, and a real gateway serving, editing taste profiles and
taking events against it; then a primary killed under load: no 5xx, degraded answers while
its replica takes over, generative ones after, and never an answer from two versions."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from limits import parse

from model_store.bundle import Bundle, load_bundle
from model_store.embed_users import log_end, log_entries, log_length, trim_log
from model_store.userstate.connect import node_clients, sync_client
from model_store.userstate.keys import (
    ACTIVE,
    bucket_of,
    bucket_state_key,
    event_log_key,
    live_key,
    stream_position,
)
from model_store.userstate.publish import current_version, publish, publish_bundle, read_user
from service.api.auth import RateLimiter
from service.userstore import LoggedEvent, StoreUnavailable, UserStore
from tests.servers import RedisCluster, ServiceProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RedisCluster.available(), reason="needs Debian's redis-server"),
]

REFRESH_S = 0.2  # how often the gateway reads the active version
_ids = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path_factory.mktemp("cluster"))
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


def test_publish_spreads_users_over_every_primary_and_deletes_old_versions_by_name(
    cluster: RedisCluster, bundle: Bundle
) -> None:
    client = sync_client(cluster.url, cluster=True)
    first = publish_bundle(client, bundle)  # one MSET across slots would answer CROSSSLOT
    users = bundle.users["user_id"].astype(str).tolist()
    embedding, history = read_user(client, first.version, users[7])
    assert embedding is not None and history is not None
    np.testing.assert_allclose(embedding, bundle.user_embeddings[7], atol=2e-3)
    assert history.tolist() == bundle.histories[7].tolist()[-1000:]
    per_node = [n.dbsize() for n in node_clients(client)]
    assert len(per_node) == 3 and min(per_node) > 0  # every primary holds a share
    second = publish_bundle(client, bundle)
    third = publish_bundle(client, bundle)
    assert third.deleted_versions == [first.version] and current_version(client) == third.version
    assert read_user(client, first.version, users[7]) == (None, None)
    assert read_user(client, second.version, users[7])[0] is not None  # the previous is kept
    for node in node_clients(client):  # nothing of the first version left on any primary
        assert not list(node.scan_iter(match=f"*{first.version}*"))
    keys = {bucket_state_key(third.version, bucket_of(u)) for u in users}
    assert sum(int(client.exists(k)) for k in keys) == len(keys)


def test_the_daily_job_reads_every_log_shard_up_to_its_checkpoint_and_trims_them(
    cluster: RedisCluster,
) -> None:
    client = sync_client(cluster.url, cluster=True)
    trim_log(client, log_end(client, "0-0"))  # a clean log
    users = [f"log-user-{i}" for i in range(40)]
    for i, user in enumerate(users):
        client.xadd(event_log_key(user), {"e": f"x{i}", "u": user, "i": "a:b:c", "t": "play"})
    time.sleep(0.01)  # entries of the millisecond the clocks are read in come after it
    end = log_end(client, "0-0")
    late = client.xadd(event_log_key(users[0]), {"e": "late", "u": users[0], "i": "a:b:c"})
    read = list(log_entries(client, "0-0", end))
    assert sorted(f["u"] for _, f in read) == sorted(users)  # every shard, each entry once
    assert stream_position(str(late.decode())) > stream_position(end)  # type: ignore[union-attr]
    trim_log(client, end)
    assert log_length(client) == 1  # only the entry logged after the checkpoint


# ---------------------------------------------------------------------------- a real gateway


@dataclass
class Gateway:
    bundle: Bundle
    cluster: RedisCluster
    service: ServiceProcess

    def url(self, path: str) -> str:
        return f"{self.service.base}{path}"

    def recommend(self, user: str) -> httpx.Response:
        body = {"user_id": user, "k": 10}
        return httpx.post(self.url("/v1/recommendations"), json=body, timeout=30)

    def state(self, user: str) -> httpx.Response:
        """The user's embedding (projected) and history, read together in one request."""
        return httpx.get(self.url("/v1/ui/map"), params={"user_id": user, "k": 0}, timeout=30)


@pytest.fixture(scope="module")
def gateway(
    cluster: RedisCluster, bundle: Bundle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    publish_bundle(sync_client(cluster.url, cluster=True), bundle)
    env = {
        "REDIS_URL": cluster.url,
        "GENREC_REDIS_CLUSTER": "true",
        "GENREC_REDIS_VERSION_REFRESH_S": str(REFRESH_S),
        "GENREC_REDIS_TIMEOUT_MS": "200",
        "GENREC_REDIS_COOLDOWN_S": "0.5",
        "GENREC_RATE_LIMIT": "100000/minute",
    }
    log = tmp_path_factory.mktemp("gateway") / "service.log"
    service = ServiceProcess(bundle.dir, env, log)
    try:
        service.wait_ready()
        yield Gateway(bundle, cluster, service)
    finally:
        service.stop()


def _user(gw: Gateway, index: int) -> str:
    return str(gw.bundle.users["user_id"][index])


def test_serving_edits_and_events_on_the_cluster(gateway: Gateway) -> None:
    user = _user(gateway, 3)
    first = gateway.recommend(user)
    assert first.status_code == 200, first.text
    assert first.json()["served_by"] == "generative" and first.json()["degraded"] == []
    assert first.headers["RateLimit-Limit"] == "100000"  # counted in the cluster
    profile = gateway.url(f"/v1/users/{user}/taste-profile")
    edit = httpx.patch(profile, json={"more": {"genres": ["comedy"]}}, timeout=30)
    assert edit.status_code == 200, edit.text
    assert httpx.get(profile, timeout=30).json()["revision"] == edit.json()["revision"]
    played = [i["uri"] for i in first.json()["items"][:3]]
    events = [
        {"event_id": f"c{next(_ids)}", "user_id": user, "item": uri, "type": "play"}
        for uri in played
    ]
    r = httpx.post(gateway.url("/v1/events"), json={"events": [*events, events[0]]}, timeout=30)
    assert r.json() == {"accepted": 3, "duplicates": 1, "rejected": []}
    after = gateway.recommend(user).json()
    assert after["served_by"] == "generative"
    assert not set(played) & {i["uri"] for i in after["items"]}


def _points(gw: Gateway, users: list[str]) -> dict[str, tuple[Any, tuple[str, ...]]]:
    out = {}
    for user in users:
        body = gw.state(user).json()
        assert body["degraded"] == [] and body["user"] is not None, body
        out[user] = (body["user"], tuple(body["history"]))
    return out


def _republish(client: Any, bundle: Bundle, flipped: bool) -> None:
    """A version of the bundle's users (`flipped`: negated embeddings, histories one item
    shorter, so every answer shows which version it read)."""
    users = bundle.users["user_id"].astype(str).tolist()
    histories = bundle.histories.to_lists()
    embeddings = bundle.user_embeddings
    if flipped:
        embeddings, histories = -embeddings, [h[:-1] for h in histories]
    publish(client, bundle.version, users, embeddings, histories)


def test_a_primary_killed_under_load_degrades_then_recovers_and_never_mixes_versions(
    gateway: Gateway,
) -> None:
    gw, bundle = gateway, gateway.bundle
    client = sync_client(gw.cluster.url, cluster=True)
    users = [_user(gw, i) for i in range(40, 52)]
    _republish(client, bundle, flipped=False)
    time.sleep(4 * REFRESH_S)
    plain = _points(gw, users)
    _republish(client, bundle, flipped=True)
    # Polled, not slept on: the gateway's cached version follows within a few REFRESH_S,
    # later when a busy machine holds its refresh up.
    deadline = time.monotonic() + 20
    while True:
        time.sleep(REFRESH_S)
        flipped = _points(gw, users)
        if all(plain[u] != flipped[u] for u in users) or time.monotonic() > deadline:
            break
    assert all(plain[u] != flipped[u] for u in users)
    # The primary that holds the first user's state: its users lose Redis for a while.
    victim = client.get_node_from_key(event_log_key(users[0]))
    assert victim is not None and victim.port in gw.cluster.primaries()

    stop = threading.Event()
    statuses: list[int] = []
    states: list[tuple[str, dict[str, Any]]] = []
    served: list[tuple[float, str, list[str]]] = []

    def load(offset: int) -> None:
        for n in itertools.count(offset):
            if stop.is_set():
                return
            user = users[n % len(users)]
            r = gw.recommend(user)
            statuses.append(r.status_code)
            if r.status_code == 200:
                served.append((time.monotonic(), r.json()["served_by"], r.json()["degraded"]))
            s = gw.state(user)
            statuses.append(s.status_code)
            if s.status_code == 200:
                states.append((user, s.json()))

    def flips() -> None:  # versions keep changing throughout, failover included
        for n in itertools.count():
            if stop.wait(0.7):
                return
            # A publish that meets the dead primary fails, and flips nothing.
            with contextlib.suppress(redis.RedisError, OSError):
                _republish(sync_client(gw.cluster.url, cluster=True), bundle, flipped=n % 2 == 1)

    threads = [threading.Thread(target=load, args=(i * 5,)) for i in range(2)]
    threads.append(threading.Thread(target=flips))
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        killed = time.monotonic()
        gw.cluster.kill(victim.port)
        deadline = killed + 30
        while len(gw.cluster.primaries()) < 3 or victim.port in gw.cluster.primaries():
            assert time.monotonic() < deadline, "no replica took over"
            time.sleep(0.1)
        failed_over = time.monotonic()
        time.sleep(4.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    assert statuses and set(statuses) == {200}, sorted(set(statuses))  # no 5xx at all
    for user, body in states:
        pair = (body["user"], tuple(body["history"]))
        if body["degraded"]:  # Redis skipped: no embedding, the bundle's history
            assert body["user"] is None
        else:
            assert pair in (plain[user], flipped[user]), (user, body["degraded"])
    assert any(d for at, _, d in served if at >= killed), "the dead primary went unnoticed"
    recovered = [s for at, s, _ in served if at > failed_over + 2.0]
    assert recovered and set(recovered) == {"generative"}, recovered
    for user in users:
        answer = gw.recommend(user)
        assert answer.status_code == 200 and answer.json()["served_by"] == "generative"


def test_the_store_reads_one_version_per_answer_while_versions_flip(
    cluster: RedisCluster, bundle: Bundle
) -> None:
    """In-process and fast: a reader whose cached version is a flip behind still reads one
    whole version (the publisher keeps the previous one)."""
    client = sync_client(cluster.url, cluster=True)
    user = str(bundle.users["user_id"][5])

    async def scenario() -> tuple[float, int]:
        store = UserStore(cluster.url, timeout_s=1.0, cooldown_s=0.0, cluster=True, refresh_s=60)
        try:
            await store.fetch(user)  # caches the version current now
            _republish(client, bundle, flipped=True)  # the cache is now a flip behind
            state = await store.fetch(user)
            ids = await store.append_events(
                [LoggedEvent(f"s{next(_ids)}", user, str(bundle.catalog["uri"][3]), "play", 0)],
                dedup_s=60,
            )
            after = await store.fetch(user)
            assert ids[0] is not None and after.live[-1].startswith(ids[0])
            assert await store.event_log_length() == log_length(client) > 0  # every node
            assert state.embedding is not None and state.history is not None
            return float(state.embedding @ bundle.user_embeddings[5]), len(state.history)
        finally:
            await store.close()

    similarity, length = asyncio.run(scenario())
    full = min(len(bundle.histories[5]), 1000)
    assert (similarity > 0, length) in ((True, full), (False, full - 1))  # one version


@contextlib.contextmanager
def _paused(cluster: RedisCluster, port: int) -> Iterator[None]:
    """A primary that stops answering for a moment (well within the node timeout: no
    failover), as one does under a long command or a stalled disk."""
    cluster.procs[port].send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        cluster.procs[port].send_signal(signal.SIGCONT)


def test_a_node_that_fails_is_skipped_alone(cluster: RedisCluster, bundle: Bundle) -> None:
    """The cool-down is a node's: while one primary is skipped the users of the others are
    served, and while the node of `{ctl}` does not answer the cached version serves."""
    client = sync_client(cluster.url, cluster=True)
    version = publish_bundle(client, bundle).version
    ctl = client.get_node_from_key(ACTIVE).port
    stopped, healthy = [p for p in cluster.primaries() if p != ctl][:2]
    ids = [str(u) for u in bundle.users["user_id"]]

    def user_on(port: int) -> str:
        return next(u for u in ids if client.get_node_from_key(live_key(u)).port == port)

    a, b = user_on(stopped), user_on(healthy)

    def window(caller: str) -> str:
        return f"LIMITS:{parse('5/minute').key_for(caller)}"

    def window_port(caller: str) -> int:
        return int(client.get_node_from_key(window(caller)).port)

    uri = str(bundle.catalog["uri"][3])

    async def scenario() -> None:
        store = UserStore(cluster.url, timeout_s=0.2, cooldown_s=30.0, cluster=True, refresh_s=60)
        try:
            await store.fetch(a)  # the topology and the version, cached
            with _paused(cluster, stopped), pytest.raises(StoreUnavailable, match="Timeout"):
                await store.fetch(a)
            with pytest.raises(StoreUnavailable, match="skipped") as skipped:
                await store.fetch(a)  # answering again, but in its cool-down: not asked
            assert 25 < (skipped.value.retry_after_s or 0) <= 30
            assert (await store.fetch(b)).embedding is not None  # its users are served
            with pytest.raises(StoreUnavailable, match="skipped"):  # a batch is whole or not
                await store.append_events(
                    [LoggedEvent(f"n{next(_ids)}", u, uri, "play", 0) for u in (a, b)], 60
                )
            with _paused(cluster, ctl):
                with pytest.raises(StoreUnavailable):
                    await store._refresh()
                served = await store.fetch(b)
            assert served.version == version and served.embedding is not None
            # A rate-limit window is a key like any other: its node's cool-down holds.
            limiter = RateLimiter(store)
            identities = (f"{n * 2654435761 % 2**32:08x}" for n in range(200))  # all slots
            callers = {window_port(caller): caller for caller in identities}
            assert await limiter.hit(callers[healthy], "5/minute") is not None
            assert client.exists(window(callers[healthy]))  # the key the cool-down follows
            assert await limiter.hit(callers[stopped], "5/minute") is None  # skipped: uncounted
        finally:
            await store.close()

    asyncio.run(scenario())
