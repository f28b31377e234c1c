"""User state on a Redis Cluster against one Redis server, and what a billion users need.

Starts Debian's redis-server twice over: one server alone, and a Redis Cluster of three
primaries with a replica each (`redis-cli --cluster create`, as the tests do), all on
loopback TCP, persistence off. On each, with N synthetic users (64-dim float16 embeddings,
50-item int32 histories):

(a) publish: `model_store.userstate.publish.publish` (one HSET per bucket per batch, sent to
    the primary that owns it), users/s, best of `--repeats`;
(b) fetch: `service.userstore.UserStore.fetch` (the gateway's one Lua call per request, its
    cached version), sequential, p50/p99 ms;
(c) keys and used_memory per primary for one version, and the bytes per user;
(d) the daily job's read of every log shard (16,384 of them, pipelined per node) and the
    deletion of an old version by name (no scan), seconds;
(e) the failover window (cluster only): seconds from SIGKILL of a primary to the first
    successful write to one of its slots (on the promoted replica), with
    cluster-node-timeout `--node-timeout-ms`; a client writing in a loop measures it;
(f) a second primary killed (cluster only): for `--down-seconds`, the share of reads of its
    users and of the other primaries' users that two gateway stores answer at once, one
    with the Redis cool-down per node (the gateway's) and one with a single cool-down for
    the whole cluster (the baseline: the gateway before it was per node).

Then a sizing table for `--target-users` users from the measured bytes per user: memory for
the versions kept, primaries and nodes per node size.

    python -m loadtest.bench_redis_cluster --users 200000 --out /tmp/redis-cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_beam_vs_vllm import bench_parser, percentiles, run_bench
from loadtest.bench_redis import synthetic_users
from tests.servers import REDIS_CLI, REDIS_SERVER, RedisCluster, free_port

KEPT_VERSIONS = 3  # the current, the previous, and the one being published
READ_GAP_S = 0.001  # between one store's reads while a primary is down: a request stream
HEADROOM = 0.75  # of a node's memory for data: the rest for replication buffers and forks


class OneServer:
    """One redis-server on a loopback port, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                [str(REDIS_CLI), "-p", str(self.port), "PING"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _memory(client: Any) -> list[dict[str, int]]:
    from model_store.userstate.connect import node_clients

    return [
        {"keys": int(n.dbsize()), "used_memory": int(n.info("memory")["used_memory"])}
        for n in node_clients(client)
    ]


async def _fetches(url: str, cluster: bool, users: list[str], n: int, seed: int) -> list[float]:
    from service.userstore import UserStore

    store = UserStore(url, timeout_s=1.0, cooldown_s=0.0, cluster=cluster, refresh_s=60.0)
    picks = np.random.default_rng(seed).integers(0, len(users), size=n + 500).tolist()
    out = []
    try:
        for j, u in enumerate(picks):
            start = time.perf_counter_ns()
            state = await store.fetch(users[u])
            if j >= 500:
                out.append((time.perf_counter_ns() - start) / 1e6)
            if state.embedding is None:
                raise SystemExit(f"user {users[u]} has no embedding")
    finally:
        await store.close()
    return out


def measure(url: str, cluster: bool, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    from model_store.embed_users import log_end, log_entries
    from model_store.userstate.connect import sync_client
    from model_store.userstate.publish import delete_version, publish

    user_ids, embeddings, histories = data
    client = sync_client(url, timeout_s=120.0, cluster=cluster)
    before = sum(m["used_memory"] for m in _memory(client))
    rates, versions = [], []
    for _ in range(args.repeats):
        report = publish(client, "bench", user_ids, embeddings, histories)
        rates.append(report.users_per_s)
        versions.append(report.version)
        if len(versions) == 1:
            one_version = _memory(client)
    fetch_ms = asyncio.run(_fetches(url, cluster, user_ids, args.fetches, args.seed))
    start = time.perf_counter()
    end = log_end(client, "0-0")
    entries = sum(1 for _ in log_entries(client, "0-0", end))
    log_read_s = time.perf_counter() - start
    start = time.perf_counter()
    delete_version(client, versions[-1])
    delete_s = time.perf_counter() - start
    per_user = (sum(m["used_memory"] for m in one_version) - before) / len(user_ids)
    return {
        "publish_users_per_s": max(rates),
        "publish_runs": rates,
        "fetch_ms": percentiles(fetch_ms),
        "per_primary_one_version": one_version,
        "bytes_per_user": per_user,
        "log_read_all_shards_s": log_read_s,
        "log_entries_read": entries,
        "delete_version_s": delete_s,
    }


def failover_window(nodes: RedisCluster) -> dict[str, float]:
    """Seconds from SIGKILL of a primary to the first write acknowledged for its slots."""
    import redis

    from model_store.userstate.connect import sync_client

    client = sync_client(nodes.url, timeout_s=0.2, cluster=True)
    key = "failover:{probe}"
    victim = client.get_node_from_key(key)
    assert victim is not None
    client.set(key, "0")
    killed = time.monotonic()
    nodes.kill(int(victim.port))
    attempts = 0
    while True:
        attempts += 1
        try:
            client.set(key, str(attempts))
            break
        except (redis.RedisError, OSError):
            time.sleep(0.01)
            if time.monotonic() - killed > 60:
                raise SystemExit("no failover within 60 s") from None
    window = time.monotonic() - killed
    node = client.get_node_from_key(key)
    return {
        "seconds": window,
        "attempts": attempts,
        "promoted_port": float(node.port if node else 0),
        "node_timeout_ms": float(nodes.node_timeout_ms),
    }


async def answers_while_a_primary_is_down(
    nodes: RedisCluster, users: list[str], seconds: float, per_side: int = 40
) -> dict[str, dict[str, float]]:
    """Kills a primary that does not hold `{ctl}` and, for `seconds`, reads users of it and
    of the other primaries in turn through two gateway stores at once (the gateway's
    defaults: 50 ms timeout, 2 s cool-down): one whose cool-down is a node's (now), one
    whose cool-down is the whole cluster's (before). The share of reads answered, per side."""
    from model_store.userstate.connect import sync_client
    from model_store.userstate.keys import ACTIVE, live_key
    from service.userstore import WHOLE, StoreUnavailable, UserStore

    class WholeClusterCooldown(UserStore):
        def _units(self, keys: tuple[str, ...]) -> set[str]:
            return {WHOLE}

    url = f"redis://127.0.0.1:{nodes.primaries()[0]}"  # the first node may be dead by now
    client = sync_client(url, cluster=True)
    ctl = client.get_node_from_key(ACTIVE).port
    victim = next(p for p in nodes.primaries() if p != ctl)
    on: dict[bool, list[str]] = {True: [], False: []}
    for user in users:
        side = on[client.get_node_from_key(live_key(user)).port == victim]
        if len(side) < per_side:
            side.append(user)
    order = [u for pair in zip(on[True], on[False], strict=False) for u in pair]
    stores = {
        "per_node": UserStore(url, 0.05, 2.0, cluster=True),
        "whole_cluster": WholeClusterCooldown(url, 0.05, 2.0, cluster=True),
    }

    async def drive(store: UserStore, until: float) -> dict[str, float]:
        asked = {True: 0, False: 0}
        answered = {True: 0, False: 0}
        while time.monotonic() < until:
            for user in order:
                side = user in on[True]
                asked[side] += 1
                with contextlib.suppress(StoreUnavailable):
                    await store.fetch(user)
                    answered[side] += 1
                await asyncio.sleep(READ_GAP_S)  # a skipped read awaits nothing
        return {
            "victim_answered": answered[True] / max(asked[True], 1),
            "others_answered": answered[False] / max(asked[False], 1),
            "others_asked": float(asked[False]),
        }

    try:
        for store in stores.values():
            for user in order:
                await store.fetch(user)  # the topology and the version, cached
        nodes.kill(victim)
        until = time.monotonic() + seconds
        shares = await asyncio.gather(*(drive(s, until) for s in stores.values()))
    finally:
        for store in stores.values():
            await store.close()
    return dict(zip(stores, shares, strict=True))


def sizing(bytes_per_user: float, users: float, node_gib: list[int]) -> list[dict[str, Any]]:
    data = bytes_per_user * users * KEPT_VERSIONS
    rows = []
    for gib in node_gib:
        primaries = math.ceil(data / (gib * 2**30 * HEADROOM))
        rows.append(
            {
                "node_gib": gib,
                "data_tib": data / 2**40,
                "primaries": primaries,
                "nodes_with_one_replica": 2 * primaries,
                "per_primary_gib": data / primaries / 2**30,
                "users_per_primary_millions": users / primaries / 1e6,
            }
        )
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not RedisCluster.available():
        raise SystemExit("needs Debian's redis-server and redis-cli")
    data = synthetic_users(args.users, args.dim, args.history, args.items, args.seed)
    version = (
        subprocess.run([str(REDIS_SERVER), "--version"], capture_output=True, text=True)
        .stdout.split()[2]
        .removeprefix("v=")
    )
    out: dict[str, Any] = {"benchmark": "bench_redis_cluster", "redis_server": version}
    with tempfile.TemporaryDirectory(prefix="bench-redis-cluster-") as tmp:
        one = OneServer(Path(tmp))
        try:
            out["one_node"] = measure(one.url, False, data, args)
        finally:
            one.close()
        nodes = RedisCluster(Path(tmp) / "cluster", node_timeout_ms=args.node_timeout_ms)
        start = time.perf_counter()
        nodes.start()
        out["cluster_create_s"] = time.perf_counter() - start
        try:
            out["cluster"] = measure(nodes.url, True, data, args)
            out["failover"] = failover_window(nodes)
            out["primary_down"] = asyncio.run(
                answers_while_a_primary_is_down(nodes, data[0], args.down_seconds)
            )
        finally:
            nodes.stop()
    out["settings"] = {
        k: getattr(args, k) for k in ("users", "dim", "history", "repeats", "fetches")
    } | {"down_s": args.down_seconds}
    out["sizing"] = {
        "users": args.target_users,
        "versions_kept": KEPT_VERSIONS,
        "headroom": HEADROOM,
        "rows": sizing(out["cluster"]["bytes_per_user"], args.target_users, args.node_gib),
    }
    return out


def report(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(
        f"redis-server {r['redis_server']}; {s['users']:,} users × ({s['dim']}-dim float16 + "
        f"{s['history']}-item int32 history); cluster of 3 primaries + 3 replicas created in "
        f"{r['cluster_create_s']:.1f} s"
    )
    print(
        f"{'':<10} {'publish users/s':>16} {'fetch p50 ms':>13} {'fetch p99 ms':>13} "
        f"{'B/user':>7} {'log read s':>11} {'delete s':>9}"
    )
    for name in ("one_node", "cluster"):
        m = r[name]
        print(
            f"{name:<10} {m['publish_users_per_s']:16,.0f} {m['fetch_ms']['p50']:13.3f} "
            f"{m['fetch_ms']['p99']:13.3f} {m['bytes_per_user']:7.0f} "
            f"{m['log_read_all_shards_s']:11.3f} {m['delete_version_s']:9.3f}"
        )
    for i, p in enumerate(r["cluster"]["per_primary_one_version"]):
        print(f"primary {i}: {p['keys']:,} keys, used_memory {p['used_memory'] / 2**20:.1f} MiB")
    f = r["failover"]
    print(
        f"failover window: {f['seconds']:.2f} s from SIGKILL to the first acknowledged write "
        f"(cluster-node-timeout {f['node_timeout_ms']:.0f} ms, {f['attempts']:.0f} attempts)"
    )
    print(f"reads answered in the {r['settings']['down_s']} s after a primary's SIGKILL:")
    for name, d in r["primary_down"].items():
        print(
            f"  cool-down {name:<14} its users {d['victim_answered']:6.1%}, the other "
            f"primaries' users {d['others_answered']:6.1%} ({d['others_asked']:.0f} reads)"
        )
    z = r["sizing"]
    print(
        f"sizing for {z['users']:,.0f} users ({z['versions_kept']} versions at once, "
        f"{z['headroom']:.0%} of a node's memory for data):"
    )
    print(f"{'node GiB':>8} {'data TiB':>9} {'primaries':>9} {'nodes':>6} {'GiB/primary':>12}")
    for row in z["rows"]:
        print(
            f"{row['node_gib']:8d} {row['data_tib']:9.2f} {row['primaries']:9d} "
            f"{row['nodes_with_one_replica']:6d} {row['per_primary_gib']:12.1f}"
        )


def main() -> None:
    parser = bench_parser(__doc__, engine=False)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--history", type=int, default=50, help="items per user")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalog size")
    parser.add_argument("--repeats", type=int, default=3, help="publishes per setup")
    parser.add_argument("--fetches", type=int, default=5000)
    parser.add_argument("--node-timeout-ms", type=int, default=1000)
    parser.add_argument(
        "--down-seconds", type=float, default=5.0, help="reads while a primary is down"
    )
    parser.add_argument("--target-users", type=float, default=1e9)
    parser.add_argument("--node-gib", type=int, nargs="+", default=[32, 64, 128])
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
