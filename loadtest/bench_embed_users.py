"""The daily user-embedding job (`genrec embed-users`) on a local Ray: users/s with 1 and
with 2 workers, and the Redis memory one published version takes.

N synthetic users (random histories of 20–100 items over the bundle's catalog, seeded), or
the users of a `genrec data synth` directory (their items folded onto the bundle's
catalog), are written as the previous run's Parquet snapshot; each measured run then goes
the job's real path: read the snapshot, embed with the bundle's user model in the actor
pool, write Redis (a throw-away redis-server, no persistence) and the new snapshot, flip.
Ray is started once, before the runs, so its start-up (printed apart) is not in the
figures; the actors' start (loading the user model) is.

    python -m loadtest.bench_embed_users --bundle /tmp/embed_bundle --users 200000
    python -m loadtest.bench_embed_users --bundle /tmp/embed_bundle --synth /tmp/synth
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loadtest.bench_beam_vs_vllm import bench_parser, machine_info, machine_line, run_bench
from loadtest.bench_redis import RedisServer

SEED_FILES = 16
MIN_ITEMS, MAX_ITEMS = 20, 100


def synthetic_histories(n: int, n_items: int, seed: int) -> tuple[list[str], pa.ListArray]:
    """`n` users with 20–100 uniformly random items each, built flat (no per-user lists)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_ITEMS, MAX_ITEMS + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(0, n_items, size=int(offsets[-1]), dtype=np.int64)
    return [f"u{i}" for i in range(n)], _lists(offsets, items)


def synth_histories(directory: Path, n_items: int) -> tuple[list[str], pa.ListArray]:
    """The users of a `genrec data synth` directory, their items folded onto the catalog."""
    from model_store.data import load_dataset, sequences

    inter = next(directory.glob("*.inter"), None)  # `synth` names its files synthetic.*
    if inter is None:
        raise SystemExit(f"{directory}: no .inter file (expected `genrec data synth` output)")
    seqs = sequences(load_dataset(directory, inter.stem))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    items = np.concatenate(seqs).astype(np.int64) % n_items
    return [f"synth-{i}" for i in range(len(seqs))], _lists(offsets, items)


def _lists(offsets: np.ndarray, items: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(items))


def write_seed_snapshot(
    directory: Path,
    user_ids: list[str],
    histories: pa.ListArray,
    bundle_version: str,
    row_group: int,
) -> None:
    """The users as a previous run's snapshot of `bundle_version`, in SEED_FILES files of
    `row_group`-row groups (what the job writes)."""
    from model_store.embed_users import SnapshotInfo
    from model_store.userstate.keys import NO_CHECKPOINT

    directory.mkdir(parents=True)
    table = pa.table({"user_id": pa.array(user_ids, pa.string()), "history": histories})
    step = -(-len(table) // SEED_FILES)
    for part, start in enumerate(range(0, len(table), step)):
        path = directory / f"seed-{part:03d}.parquet"
        pq.write_table(table.slice(start, step), path, row_group_size=row_group)
    SnapshotInfo(bundle_version, NO_CHECKPOINT, len(table)).save(directory)


def measure(
    url: str, bundle_dir: Path, seed: Path, users: int, workers: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One job run from the seed snapshot, on an empty Redis."""
    from model_store.bundle import load_bundle
    from model_store.embed_users import EmbedOptions, embed_users
    from model_store.userstate.connect import sync_client
    from model_store.userstate.publish import flip, new_version

    bundle = load_bundle(bundle_dir)
    client = sync_client(url, timeout_s=120.0)
    client.flushall()
    flip(client, new_version("seed"), users, snapshot=str(seed))
    before = int(client.info("memory")["used_memory"])
    options = EmbedOptions(
        snapshots=seed.parent / f"snapshots-{workers}",
        workers=workers,
        batch_size=args.batch_size,
        history_len=args.history_len,
    )
    report = embed_users(bundle, url, options)
    after = int(client.info("memory")["used_memory"])
    keys = int(client.dbsize())
    client.flushall()
    client.close()
    if report.users != users:
        raise SystemExit(f"{workers} workers: published {report.users} users, expected {users}")
    return {
        "workers": workers,
        "seconds": report.seconds,
        "users_per_s": report.users_per_s,
        "redis_bytes_per_version": after - before,
        "redis_keys": keys,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from model_store.bundle import load_bundle
    from model_store.embed_users import EmbedOptions

    info = machine_info()
    bundle = load_bundle(args.bundle)
    n_items = len(bundle.catalog)
    t0 = time.perf_counter()
    if args.synth is not None:
        user_ids, histories = synth_histories(args.synth, n_items)
    else:
        user_ids, histories = synthetic_histories(args.users, n_items, args.seed)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # One CPU per worker of the largest run, plus one for the read and write tasks.
    ray.init(num_cpus=max(args.workers) + 1, include_dashboard=False)
    ray_s = time.perf_counter() - t0
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        seed = Path(tmp) / "seed"
        rows = EmbedOptions(batch_size=args.batch_size).block_rows
        write_seed_snapshot(seed, user_ids, histories, bundle.version, rows)
        server = RedisServer(Path(tmp))
        try:
            url, n = server.urls["unix"], len(user_ids)
            runs = [measure(url, args.bundle, seed, n, w, args) for w in args.workers]
        finally:
            server.close()
            ray.shutdown()
    return {
        "benchmark": "bench_embed_users",
        "machine": info,
        "redis_version": server.version,
        "ray": ray.__version__,
        "settings": {
            "users": len(user_ids),
            "source": str(args.synth) if args.synth else "random",
            "mean_history": float(len(histories.flatten()) / max(len(user_ids), 1)),
            "bundle": str(args.bundle),
            "bundle_version": bundle.version,
            "batch_size": args.batch_size,
            "history_len": args.history_len,
            "data_s": gen_s,
            "ray_init_s": ray_s,
            "omp_threads_per_worker": 1,
            "cores_usable": len(os.sched_getaffinity(0)),
        },
        "runs": runs,
    }


def report(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(machine_line(r["machine"]))
    print(
        f"embed-users: {s['users']:,} users ({s['source']}, mean history "
        f"{s['mean_history']:.0f} items), bundle {s['bundle_version']}, batch {s['batch_size']}; "
        f"ray {r['ray']} (start {s['ray_init_s']:.1f} s, not counted), "
        f"redis-server {r['redis_version']}"
    )
    print(f"{'workers':>7} {'seconds':>9} {'users/s':>10} {'MiB/version':>12} {'B/user':>7}")
    for run_ in r["runs"]:
        memory = run_["redis_bytes_per_version"]
        print(
            f"{run_['workers']:>7} {run_['seconds']:9.1f} {run_['users_per_s']:10,.0f} "
            f"{memory / 2**20:12.1f} {memory / s['users']:7.0f}"
        )
    by_workers = {run_["workers"]: run_["users_per_s"] for run_ in r["runs"]}
    if 1 in by_workers and 2 in by_workers:
        print(f"ratio 2 workers / 1 worker: {by_workers[2] / by_workers[1]:.2f}")


def main() -> None:
    parser = bench_parser(__doc__, engine=False)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/ml-100k"))
    parser.add_argument("--synth", type=Path, default=None, help="a `genrec data synth` dir")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--history-len", type=int, default=1000)
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
