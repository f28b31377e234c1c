"""The daily user-embedding job (`genrec embed-users`): every user's long-term embedding,
recomputed from their latest history on Ray Data and published to Redis as a new version.

A run starts from the previous run's Parquet snapshot (or, the first time or after a new
bundle, from the bundle's own histories), appends the items consumed in the event log since
the previous version's checkpoint, and streams the users through an actor pool that loads
the user model once per actor, writes each batch to Redis and passes it on to the new
snapshot. Nothing is materialised on the driver but the day's events. The version becomes
current in one step only after every write succeeded and the snapshot holds every user; a
failed run leaves the old version current and the log untouched.

With ``--address`` the snapshots directory must be storage every Ray node can reach.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from redis.exceptions import LockError

from model_store.bundle import Bundle
from model_store.userstate.connect import (
    REDIS_ERRORS,
    SyncClient,
    node_clients,
    pipelined,
    sync_client,
)
from model_store.userstate.keys import (
    BUCKETS,
    BUILDING,
    CONSUMED_TYPES,
    JOB_LOCK,
    NO_CHECKPOINT,
    bucket_log_key,
    checkpoint_before,
    first_after,
    meta_key,
    stream_position,
)
from model_store.userstate.publish import (
    current_version,
    delete_version,
    flip,
    listed_versions,
    new_version,
    write_users,
)

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

SNAPSHOT_INFO = "snapshot.json"
EVENT_CHUNK = 10_000  # log entries per XRANGE
PIPELINE = 1024  # commands per pipeline when every log shard is read or trimmed
LEASE_S = 60.0
"""The job lock's expiry, renewed every third of it while the run lives: a run killed
outright (SIGKILL, an evicted pod) blocks the next one for a minute at most."""
RETRIES = 3
"""Restarts of a dead actor and retries of its batch: a worker killed mid-run (node loss,
OOM) does not fail the run, a worker that dies on every batch does (Ray's default of
unlimited retries would spin forever)."""
REDIS_TIMEOUT_S = 60.0  # one batch of a few thousand users, on a busy server
BATCHES_PER_BLOCK = 4
WRITE_DRAIN_S = 60.0  # longest wait for a failed run's writes in progress
RAY_CONNECT_S = 10.0  # a Ray cluster at --address that does not answer within: refused


@dataclass(frozen=True)
class EmbedOptions:
    snapshots: Path = Path("data/snapshots")
    address: str | None = None
    workers: int = 2
    batch_size: int = 4096
    history_len: int = 1000
    redis_cluster: bool = False  # the Redis URL names a node of a Redis Cluster

    @property
    def block_rows(self) -> int:
        """Users per block and per snapshot row group (the next run's read unit)."""
        return BATCHES_PER_BLOCK * self.batch_size


@dataclass(frozen=True)
class EmbedReport:
    version: str
    users: int
    new_users: int
    events: int  # log entries up to the checkpoint (all of them are in this version)
    seconds: float
    checkpoint: str
    snapshot: str
    deleted_versions: list[str] = field(default_factory=list)

    @property
    def users_per_s(self) -> float:
        return self.users / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot directory holds, so a later run only builds on one for its bundle."""

    bundle_version: str
    checkpoint: str
    users: int

    def save(self, directory: Path) -> None:
        (directory / SNAPSHOT_INFO).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> SnapshotInfo | None:
        try:
            return cls(**json.loads((directory / SNAPSHOT_INFO).read_text()))
        except (OSError, ValueError, TypeError):
            return None


# ---------------------------------------------------------------------------- pure steps


def consumed_items(
    entries: Iterable[tuple[str, Mapping[str, str]]], uri_index: Mapping[str, int]
) -> tuple[dict[str, list[int]], int]:
    """(items each user consumed, in log order; entries read) from event-log entries.

    Only consuming types count, and URIs the bundle does not know are skipped, so a user
    whose events hold nothing else gets no entry (and is no new user)."""
    items: dict[str, list[int]] = {}
    n = 0
    for _, fields in entries:
        n += 1
        if fields.get("t") not in CONSUMED_TYPES:
            continue
        item, user = uri_index.get(fields.get("i", "")), fields.get("u")
        if item is not None and user:
            items.setdefault(user, []).append(item)
    return items, n


def extend_histories(
    user_ids: Sequence[str],
    histories: Sequence[np.ndarray],
    events: Mapping[str, Sequence[int]],
    history_len: int,
) -> list[np.ndarray]:
    """Each base history with the user's consumed items appended, the last `history_len`
    kept (what Redis holds, and all the next run needs)."""
    out = []
    for user, base in zip(user_ids, histories, strict=True):
        extra = events.get(user)
        full = np.concatenate([base, np.asarray(extra, np.int64)]) if extra else base
        out.append(np.asarray(full[-history_len:], dtype=np.int64))
    return out


def new_users(events: Mapping[str, object], known: Iterable[pa.Array]) -> list[str]:
    """Users with events found in none of the `known` id chunks, in first-event order.

    Streams the known ids chunk by chunk, so memory follows the day's users, not all users."""
    if not events:
        return []
    pending = pa.array(list(events), pa.string())
    found: set[str] = set()
    for chunk in known:
        ids = chunk.cast(pa.string())
        found.update(pc.filter(ids, pc.is_in(ids, value_set=pending)).to_pylist())
    return [u for u in events if u not in found]


def users_table(
    user_ids: Sequence[str], histories: Sequence[np.ndarray], embeddings: np.ndarray | None = None
) -> pa.Table:
    """(user_id, history list<int64>[, embedding fixed_size_list<float16>]) as Arrow."""
    lengths = np.fromiter((len(h) for h in histories), np.int64, len(histories))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(histories).astype(np.int64) if len(histories) else np.zeros(0, np.int64)
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(user_ids, pa.string()),
        "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
    }
    if embeddings is not None:
        half = np.ascontiguousarray(embeddings, dtype=np.float16)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(half.ravel(), pa.float16()), half.shape[1]
        )
    return pa.table(columns)


def history_arrays(column: pa.ChunkedArray | pa.ListArray) -> list[np.ndarray]:
    """A list<int64> column as one numpy view per row (no per-row Python lists)."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = lists.offsets.to_numpy()
    flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    offsets = offsets - offsets[0]
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(lists))]


# ---------------------------------------------------------------------------- the actor


class EmbedBatch:
    """The Ray Data actor: loads the user model once, then per batch applies the day's
    events, computes the embeddings, writes them to Redis under the new version (an
    idempotent HSET, so a retried batch is harmless) and passes the batch on."""

    def __init__(
        self,
        bundle_dir: str,
        redis_url: str,
        version: str,
        events: dict[str, list[int]],
        history_len: int,
        fence: Any,  # a WriteFence actor
        cluster: bool = False,
    ) -> None:
        import torch

        from model_store.user_model import load_user_model

        torch.set_num_threads(1)  # one core per actor: `workers` is the parallelism
        self.model = load_user_model(Path(bundle_dir))
        self.client = sync_client(redis_url, timeout_s=REDIS_TIMEOUT_S, cluster=cluster)
        self.version = version
        self.events = events
        self.history_len = history_len
        self.fence = fence

    def __call__(self, batch: pa.Table) -> pa.Table:
        from model_store.user_model import user_states

        users = [str(u) for u in batch.column("user_id").to_pylist()]
        histories = extend_histories(
            users, history_arrays(batch.column("history")), self.events, self.history_len
        )
        embeddings = user_states(self.model, histories).astype(np.float16)
        self._write(users, embeddings, histories)
        return users_table(users, histories, embeddings)

    def _write(self, users: list[str], embeddings: np.ndarray, histories: list[np.ndarray]) -> None:
        import ray

        if not ray.get(self.fence.enter.remote()):
            raise RunAborted(f"{self.version}: the run failed, batch not written")
        try:
            write_users(
                self.client,
                self.version,
                users,
                embeddings,
                histories,
                history_len=self.history_len,
            )
        finally:
            self.fence.leave.remote()


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Base:
    """Where this run's histories start: the previous run's snapshot, or the bundle."""

    snapshot: Path | None
    users: int

    def dataset(self, bundle: Bundle, rows: int) -> ray.data.Dataset:
        """One block per snapshot row group (the job writes them `rows` long), or the
        bundle's users in blocks of `rows`: enough blocks to keep every actor busy."""
        import ray.data

        if self.snapshot is None:
            return ray.data.from_arrow(blocks(_bundle_table(bundle), rows))
        groups = row_groups(self.snapshot)
        return ray.data.from_items(groups, override_num_blocks=max(1, len(groups))).map_batches(
            read_row_groups, batch_size=1, batch_format="pyarrow"
        )

    def user_ids(self, bundle: Bundle) -> Iterator[pa.Array]:
        if self.snapshot is None:
            yield _bundle_table(bundle).column("user_id").combine_chunks()
            return
        for path in _parquet_files(self.snapshot):
            for batch in pq.ParquetFile(path).iter_batches(columns=["user_id"]):
                yield batch.column(0)


def row_groups(directory: Path) -> list[dict[str, object]]:
    """Every row group of a snapshot, from the footers: the read tasks' units.

    Not `ray.data.read_parquet`: ray 2.60 lists the files with dozens of footer-reading
    actors (seconds on a small machine) and packs small files into one block, which then
    feeds a single actor."""
    return [
        {"path": str(path), "row_group": group}
        for path in _parquet_files(directory)
        for group in range(pq.ParquetFile(path).num_row_groups)
    ]


def read_row_groups(batch: pa.Table) -> pa.Table:
    """(user_id, history) of the row groups `batch` lists (a Ray Data task)."""
    paths, groups = batch.column("path").to_pylist(), batch.column("row_group").to_pylist()
    return pa.concat_tables(
        pq.ParquetFile(path).read_row_group(group, columns=["user_id", "history"])
        for path, group in zip(paths, groups, strict=True)
    )


def blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, max(len(table), 1), rows)]


def _bundle_table(bundle: Bundle) -> pa.Table:
    h = bundle.histories
    return pa.table(
        {
            "user_id": pa.array(bundle.users["user_id"].astype(str).tolist(), pa.string()),
            "history": pa.LargeListArray.from_arrays(
                pa.array(h.offsets, pa.int64()), pa.array(h.items, pa.int64())
            ).cast(pa.list_(pa.int64())),
        }
    )


def choose_base(bundle: Bundle, snapshot: Path | None) -> Base:
    """The previous snapshot when it exists and was made for this bundle, else the bundle."""
    info = SnapshotInfo.load(snapshot) if snapshot is not None else None
    if snapshot is not None and info is not None and info.bundle_version == bundle.version:
        return Base(snapshot, info.users)
    if snapshot is not None:
        log.warning(
            "snapshot %s is not for bundle %s: starting from the bundle", snapshot, bundle.version
        )
    return Base(None, len(bundle.users))


def _text(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else (raw or "")


def previous_version(client: SyncClient) -> tuple[str, Path | None]:
    """(checkpoint, snapshot directory) of the current version; nothing current: no checkpoint."""
    current = current_version(client)
    if not current:
        return NO_CHECKPOINT, None
    meta = {_text(k): _text(v) for k, v in client.hgetall(meta_key(current)).items()}
    snapshot = meta.get("snapshot", "")
    return meta.get("checkpoint") or NO_CHECKPOINT, Path(snapshot) if snapshot else None


def primaries_clock_ms(client: SyncClient) -> int:
    """The lowest clock of the primaries now, in milliseconds (Stream ids count in these)."""
    clocks = [node.time() for node in node_clients(client)]
    return min(int(s) * 1000 + int(us) // 1000 for s, us in clocks)


def log_end(client: SyncClient, checkpoint: str) -> str:
    """This run's checkpoint: the last log position before the lowest clock of the primaries
    now (never before `checkpoint`). A shard's new ids are at least its node's clock, so any
    event logged from now on lies after it, on every shard, and this run reads every entry
    up to it (see `model_store.userstate.keys`)."""
    end = checkpoint_before(primaries_clock_ms(client))
    return end if stream_position(end) > stream_position(checkpoint) else checkpoint


def log_entries(client: SyncClient, after: str, end: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Entries after `after` up to `end`, shard by shard (so each user's in log order), read
    EVENT_CHUNK per shard per pipelined XRANGE."""
    cursors = dict.fromkeys(range(BUCKETS), after)
    if stream_position(after) >= stream_position(end):
        return
    while cursors:
        buckets = list(cursors)
        replies = pipelined(
            client,
            (_xrange(bucket_log_key(b), cursors[b], end) for b in buckets),
            PIPELINE,
        )
        cursors = {}
        for bucket, chunk in zip(buckets, replies, strict=True):
            for entry_id, fields in chunk:
                yield _text(entry_id), {_text(k): _text(v) for k, v in (fields or {}).items()}
            if len(chunk) == EVENT_CHUNK:
                cursors[bucket] = _text(chunk[-1][0])


def _xrange(key: str, after: str, end: str) -> Any:
    return lambda pipe: pipe.xrange(key, f"({after}", end, count=EVENT_CHUNK)


def trim_log(client: SyncClient, checkpoint: str) -> None:
    """Drops every shard's entries up to `checkpoint` (a published version holds them)."""
    keep = first_after(checkpoint)
    pipelined(
        client,
        (_xtrim(bucket_log_key(b), keep) for b in range(BUCKETS)),
        PIPELINE,
    )


def _xtrim(key: str, keep: str) -> Any:
    return lambda pipe: pipe.xtrim(key, minid=keep, approximate=False)


def log_length(client: SyncClient) -> int:
    """Entries in the event log, every shard (reads each shard's length: tools and tests)."""
    lengths = pipelined(client, (_xlen(bucket_log_key(b)) for b in range(BUCKETS)), PIPELINE)
    return int(sum(lengths))


def _xlen(key: str) -> Any:
    return lambda pipe: pipe.xlen(key)


def _parquet_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.parquet"))


def parquet_rows(directory: Path) -> int:
    """Rows in a snapshot, from the Parquet footers only."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in _parquet_files(directory))


def discard_version(client: SyncClient, version: str, snapshot: Path | None) -> None:
    """Best effort after a failed run: the version's keys and snapshot go, and the record of
    the run; never those of a version that was listed (a flip can fail after its script)."""
    try:
        listed = version in listed_versions(client)
        if not listed:
            delete_version(client, version)
        client.delete(BUILDING)
    except REDIS_ERRORS as e:  # unknown state: the snapshot and the record stay, too
        log.warning("could not delete the failed version %s: %s", version, e)
        return
    if snapshot is not None and not listed:
        shutil.rmtree(snapshot, ignore_errors=True)


def sweep_killed_run(client: SyncClient) -> None:
    """Deletes what a run killed before its own cleanup left behind (SIGKILL, a lost node):
    its version's keys and snapshot, found in the record it wrote before its first write.
    Called under the job lock, so that run is over."""
    record = {_text(k): _text(v) for k, v in client.hgetall(BUILDING).items()}
    version = record.get("version")
    if not version:
        return
    log.warning("sweeping version %s of a run that ended without its cleanup", version)
    snapshot = record.get("snapshot")
    discard_version(client, version, Path(snapshot) if snapshot else None)


def sweep_snapshots(snapshots: Path, keep: Iterable[str]) -> None:
    """Removes the snapshots in `snapshots` of versions that are no longer listed (deleted by
    a flip, here or by another publisher): only the last two are ever built on. A directory
    counts as a snapshot when it holds the snapshot info, which is written last."""
    kept = set(keep)
    for info in snapshots.glob(f"*/{SNAPSHOT_INFO}"):
        if info.parent.name not in kept:
            shutil.rmtree(info.parent, ignore_errors=True)


class RayUnreachable(RuntimeError):
    """The Ray cluster at `--address` does not answer."""


def check_ray_reachable(address: str | None, timeout_s: float = RAY_CONNECT_S) -> None:
    """One TCP connect to `address` (``host:port`` or ``ray://host:port``): Ray itself retries
    an address that does not answer 20 times, ~40 s each, before it gives up."""
    if not address:
        return
    host, sep, port = address.split("://")[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray's own resolution and errors
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayUnreachable(f"Ray at {address} does not answer: {e}") from None


@contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[None]:
    """A local Ray (one CPU per worker plus one for reading and writing) or the cluster at
    `address`; an already running Ray is used as is, and only one started here is stopped."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address or None,
            num_cpus=None if address else workers + 1,
            include_dashboard=False,
            ignore_reinit_error=True,
        )
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < workers + 1:  # the actors hold every CPU and the read/write tasks never start
        log.warning("%s Ray CPUs for %d workers plus reads and writes: may stall", cpus, workers)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class WriteFence:
    """Admits the actors' Redis writes until the run fails, and counts those in progress.

    Ray Data does not kill a failed run's actors (they finish their queued batches), so
    without it a late write could land after the cleanup swept the version's keys."""

    def __init__(self) -> None:
        self.open = True
        self.writing = 0

    def enter(self) -> bool:
        self.writing += self.open
        return self.open

    def leave(self) -> None:
        self.writing -= 1

    def close(self) -> int:
        """Admits no more writes; the writes still in progress."""
        self.open = False
        return self.writing


class RunAborted(RuntimeError):
    """The run failed elsewhere: this batch is not written."""


def _close_fence(fence: Any, timeout_s: float) -> None:
    """Admits no more writes and waits for those in progress (a writer that died mid-write
    never leaves: then until the timeout)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while int(ray.get(fence.close.remote())) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def _embed_stage(
    ds: ray.data.Dataset, udf: type[EmbedBatch], kwargs: dict[str, object], options: EmbedOptions
) -> ray.data.Dataset:
    import ray.data

    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter yet in ray 2.60.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            udf,
            batch_size=options.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            fn_constructor_kwargs=kwargs,
            num_cpus=1,
            udf_modifying_row_count=False,
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
        )


@dataclass(frozen=True)
class Plan:
    """What a run will do, read from Redis before any write."""

    end: str  # this run's checkpoint: the log position the primaries' clocks had passed
    events: dict[str, list[int]]
    n_events: int
    base: Base
    added: list[str]  # users first seen in the events
    version: str

    @property
    def users(self) -> int:
        return self.base.users + len(self.added)


def plan_run(client: SyncClient, bundle: Bundle) -> Plan:
    after, previous = previous_version(client)
    end = log_end(client, after)
    uri_index = {str(u): i for i, u in enumerate(bundle.catalog["uri"])}
    events, n_events = consumed_items(log_entries(client, after, end), uri_index)
    base = choose_base(bundle, previous)
    added = new_users(events, base.user_ids(bundle))
    return Plan(end, events, n_events, base, added, new_version(bundle.version))


def _write_snapshot(
    bundle: Bundle,
    plan: Plan,
    redis_url: str,
    snapshot: Path,
    options: EmbedOptions,
    udf: type[EmbedBatch],
) -> None:
    """Streams base + new users through the actors (and so into Redis) into `snapshot`."""
    import ray

    with ray_session(options.address, options.workers):
        ds = plan.base.dataset(bundle, options.block_rows)
        if plan.added:
            added = users_table(plan.added, [np.zeros(0, np.int64)] * len(plan.added))
            ds = ds.union(ray.data.from_arrow(blocks(added, options.block_rows)))
        fence: Any = ray.remote(WriteFence).options(num_cpus=0).remote()
        kwargs: dict[str, object] = {
            "bundle_dir": str(bundle.dir.resolve()),
            "redis_url": redis_url,
            "version": plan.version,
            "events": plan.events,
            "history_len": options.history_len,
            "fence": fence,
            "cluster": options.redis_cluster,
        }
        try:
            _embed_stage(ds, udf, kwargs, options).write_parquet(
                str(snapshot), row_group_size=options.block_rows
            )
        except BaseException:
            _close_fence(fence, WRITE_DRAIN_S)
            raise
    written = parquet_rows(snapshot)
    if written != plan.users:
        raise RuntimeError(f"snapshot {snapshot} holds {written} users, expected {plan.users}")
    SnapshotInfo(bundle.version, plan.end, plan.users).save(snapshot)


def embed_users(
    bundle: Bundle,
    redis_url: str,
    options: EmbedOptions | None = None,
    udf: type[EmbedBatch] = EmbedBatch,
) -> EmbedReport:
    """Recomputes and publishes every user's embedding; the flip happens only after every
    write succeeded and the snapshot holds every user, and only then is the log trimmed.

    `udf`: the actor class (a subclass lets tests inject worker failures)."""
    options = options or EmbedOptions()
    check_ray_reachable(options.address)
    start = time.perf_counter()
    client = sync_client(redis_url, timeout_s=REDIS_TIMEOUT_S, cluster=options.redis_cluster)
    try:
        # One run at a time: two overlapping runs could trim log entries the other needs.
        with JobLease(client) as lease:
            return _run(client, bundle, redis_url, options, udf, start, lease)
    finally:
        client.close()  # an embedded Redis stops only once its last client is gone


class JobLocked(RuntimeError):
    """Another run holds the job lock."""


class JobLease:
    """The job lock as a lease: a short expiry that a thread renews while the run lives, so
    a run that dies without releasing it (killed outright) frees it within `LEASE_S`. A
    lease lost all the same (Redis unreachable for longer than that) stops the run before
    its flip: another run may have started meanwhile."""

    def __init__(self, client: SyncClient) -> None:
        # The token is shared with the renewing thread (redis-py keeps it per thread by default).
        self._lock = client.lock(JOB_LOCK, timeout=LEASE_S, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="job-lease", daemon=True)
        self.lost = False

    def __enter__(self) -> JobLease:
        if not self._lock.acquire():
            raise JobLocked("another embed-users run holds the job lock; try again later")
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            try:
                self._lock.extend(LEASE_S, replace_ttl=True)
            except LockError as e:  # expired and maybe taken: not ours any more
                log.error("the job lock was lost: %s", e)
                self.lost = True
                return
            except REDIS_ERRORS as e:  # a hiccup: the lease still runs, try again
                log.warning("the job lock was not renewed: %s", e)

    def check(self) -> None:
        """RuntimeError once the lease is lost (called before anything is made current)."""
        if self.lost:
            raise RuntimeError("the job lock was lost (its lease expired): not flipping")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._renewer.join()
        with contextlib.suppress(LockError, *REDIS_ERRORS):
            self._lock.release()


def _run(
    client: SyncClient,
    bundle: Bundle,
    redis_url: str,
    options: EmbedOptions,
    udf: type[EmbedBatch],
    start: float,
    lease: JobLease,
) -> EmbedReport:
    sweep_killed_run(client)
    plan = plan_run(client, bundle)
    snapshot = (options.snapshots / plan.version).resolve()
    client.hset(BUILDING, mapping={"version": plan.version, "snapshot": str(snapshot)})
    try:
        _write_snapshot(bundle, plan, redis_url, snapshot, options, udf)
        lease.check()
        deleted = flip(
            client, plan.version, plan.users, checkpoint=plan.end, snapshot=str(snapshot)
        )
    except BaseException:
        discard_version(client, plan.version, snapshot)
        raise
    client.delete(BUILDING)  # killed before this, the next run finds its version listed
    sweep_snapshots(options.snapshots, listed_versions(client))
    if plan.end != NO_CHECKPOINT:
        trim_log(client, plan.end)
    return EmbedReport(
        version=plan.version,
        users=plan.users,
        new_users=len(plan.added),
        events=plan.n_events,
        seconds=time.perf_counter() - start,
        checkpoint=plan.end,
        snapshot=str(snapshot),
        deleted_versions=deleted,
    )
