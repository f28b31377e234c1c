"""The daily user-embedding job: history assembly (pure), and real runs on a local Ray
against a real Redis: results, checkpoints, snapshots, worker deaths and failed runs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import psutil
import pyarrow as pa
import pytest
import redis
from redis.typing import EncodableT, FieldT
from typer.testing import CliRunner

from model_store import embed_users as embed_users_module
from model_store.bundle import Bundle, load_bundle
from model_store.embed_users import (
    Base,
    EmbedBatch,
    EmbedOptions,
    JobLease,
    JobLocked,
    SnapshotInfo,
    WriteFence,
    choose_base,
    consumed_items,
    embed_users,
    extend_histories,
    history_arrays,
    log_length,
    new_users,
    parquet_rows,
    primaries_clock_ms,
    users_table,
)
from model_store.user_model import user_states
from model_store.userstate.connect import sync_client
from model_store.userstate.keys import (
    BUILDING,
    CURRENT,
    JOB_LOCK,
    event_log_key,
    meta_key,
    stream_position,
)
from model_store.userstate.publish import new_version, publish_bundle, read_user, write_users
from service.cli import app
from tests.servers import RedisServer

ATOL = 2e-3  # float16 in Redis and in the snapshot

# ---------------------------------------------------------------------------- pure steps


def _entry(n: int, user: str, uri: str, kind: str) -> tuple[str, dict[str, str]]:
    return f"{n}-0", {"e": f"ev{n}", "u": user, "i": uri, "t": kind, "ts": "0"}


def test_consumed_items_keep_log_order_and_skip_other_types_and_unknown_items() -> None:
    uris = {"a": 0, "b": 1, "c": 2}
    entries = [
        _entry(1, "u1", "b", "play"),
        _entry(2, "u1", "a", "skip"),
        _entry(3, "u2", "c", "like"),
        _entry(4, "u1", "zzz", "finish"),
        _entry(5, "u1", "a", "finish"),
        _entry(6, "u3", "a", "dislike"),
    ]
    items, n = consumed_items(iter(entries), uris)
    assert n == 6
    assert items == {"u1": [1, 0], "u2": [2]}  # u3 only disliked: no history, no entry


def test_extend_histories_appends_events_and_keeps_the_tail() -> None:
    base = [np.array([1, 2, 3]), np.array([4]), np.zeros(0, np.int64)]
    out = extend_histories(["a", "b", "new"], base, {"a": [7, 8], "new": [9]}, history_len=4)
    assert [h.tolist() for h in out] == [[2, 3, 7, 8], [4], [9]]
    assert all(h.dtype == np.int64 for h in out)


def test_new_users_are_those_no_known_chunk_holds_in_first_event_order() -> None:
    events = {"z": [1], "a": [2], "m": [3]}
    known = [pa.array(["a", "b"]), pa.array(["c", "d"])]
    assert new_users(events, iter(known)) == ["z", "m"]
    assert new_users({}, iter(known)) == []


def test_users_table_round_trips_histories_and_half_embeddings() -> None:
    histories = [np.array([3, 1]), np.zeros(0, np.int64), np.arange(5)]
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    table = users_table(["x", "y", "z"], histories, emb)
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 2)
    back = history_arrays(table.slice(1).column("history"))  # a sliced column, too
    assert [h.tolist() for h in back] == [[], [0, 1, 2, 3, 4]]


def test_a_run_builds_only_on_a_snapshot_of_its_own_bundle(tmp_path: Path) -> None:
    bundle = cast(Bundle, SimpleNamespace(version="b-2", users=[{}] * 7))
    SnapshotInfo("b-1", "5-0", 3).save(tmp_path)
    assert choose_base(bundle, tmp_path) == Base(None, 7)  # a new bundle: start from it
    SnapshotInfo("b-2", "5-0", 3).save(tmp_path)
    assert choose_base(bundle, tmp_path) == Base(tmp_path, 3)
    assert choose_base(bundle, tmp_path / "gone") == Base(None, 7)
    assert choose_base(bundle, None) == Base(None, 7)


def test_the_fence_admits_writes_until_closed_and_counts_those_in_progress() -> None:
    fence = WriteFence()
    assert fence.enter() and fence.enter()
    fence.leave()
    assert fence.close() == 1  # one write still in progress: the cleanup waits
    assert not fence.enter()  # refused, and not counted
    fence.leave()
    assert fence.close() == 0


# ---------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module: a start costs seconds."""
    import ray

    # Logical CPUs: one per worker actor, one for the read and write tasks (as the job
    # starts its own local Ray); with only two the actors hold both and reads never start.
    ray.init(num_cpus=3, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[redis.Redis, str]]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield sync_client(server.url), server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


def _log(client: redis.Redis, user: str, uri: str, kind: str = "play") -> str:
    fields: dict[FieldT, EncodableT] = {"e": f"{user}-{kind}-{uri}", "u": user, "i": uri}
    fields.update({"t": kind, "ts": "0"})
    return client.xadd(event_log_key(user), fields).decode()  # type: ignore[union-attr]


def _clock_past(client: redis.Redis, entry: str) -> None:
    """Waits until Redis' clock has left `entry`'s millisecond: a run's checkpoint stops
    before the millisecond it reads the clock in (later entries may still land there)."""
    while primaries_clock_ms(client) <= stream_position(entry)[0]:
        time.sleep(0.001)


def _current(client: redis.Redis) -> str | None:
    raw = client.get(CURRENT)
    return None if raw is None else raw.decode()  # type: ignore[union-attr]


def _embedding(client: redis.Redis, version: str, user: str) -> np.ndarray:
    embedding, _ = read_user(client, version, user)
    assert embedding is not None
    return embedding


def _history(client: redis.Redis, version: str, user: str) -> list[int]:
    _, history = read_user(client, version, user)
    assert history is not None
    return history.tolist()


def _options(tmp_path: Path, batch_size: int = 32) -> EmbedOptions:
    return EmbedOptions(snapshots=tmp_path / "snapshots", workers=2, batch_size=batch_size)


def _assert_bundle_embeddings(client: redis.Redis, version: str, bundle: Bundle, skip: set[str]):
    ids = bundle.users["user_id"].astype(str).tolist()
    for row, user in enumerate(ids):
        if user not in skip:
            np.testing.assert_allclose(
                _embedding(client, version, user), bundle.user_embeddings[row], atol=ATOL
            )


@pytest.mark.slow
def test_two_runs_apply_each_event_once_build_on_the_snapshot_and_trim_the_log(
    local_ray: None, store: tuple[redis.Redis, str], bundle: Bundle, tmp_path: Path
) -> None:
    client, url = store
    publish_bundle(client, bundle)  # day 0: the bundle's own state, no checkpoint
    uris = bundle.catalog["uri"].tolist()
    ids = bundle.users["user_id"].astype(str).tolist()
    active, newcomer = ids[0], "listener-new"
    _log(client, active, uris[10])
    _log(client, active, "not:in:the:catalog")
    _log(client, active, uris[11], "skip")
    _log(client, active, uris[12], "finish")
    _log(client, newcomer, uris[20], "like")
    _log(client, "only-skips", uris[21], "skip")  # no consumed item: not a new user
    last = _log(client, newcomer, uris[22])
    _clock_past(client, last)

    first = embed_users(bundle, url, _options(tmp_path))

    assert (first.users, first.new_users, first.events) == (len(ids) + 1, 1, 7)
    assert _current(client) == first.version
    assert stream_position(first.checkpoint) >= stream_position(last)  # every entry is in
    meta = {k.decode(): v.decode() for k, v in client.hgetall(meta_key(first.version)).items()}  # type: ignore[union-attr]
    assert meta["checkpoint"] == first.checkpoint and meta["snapshot"] == first.snapshot
    assert parquet_rows(Path(first.snapshot)) == first.users
    _assert_bundle_embeddings(client, first.version, bundle, skip={active})
    grown = [*bundle.histories[0].tolist(), 10, 12]
    assert _history(client, first.version, active) == grown
    model = bundle.user_model
    np.testing.assert_allclose(
        _embedding(client, first.version, active),
        user_states(model, [np.array(grown)])[0],
        atol=ATOL,
    )
    assert _history(client, first.version, newcomer) == [20, 22]
    assert np.linalg.norm(_embedding(client, first.version, newcomer)) > 0.5
    assert log_length(client) == 0  # every shard trimmed up to the checkpoint

    _log(client, active, uris[30])
    last = _log(client, newcomer, uris[31], "finish")
    _clock_past(client, last)
    second = embed_users(bundle, url, _options(tmp_path))

    assert (second.users, second.new_users, second.events) == (len(ids) + 1, 0, 2)
    assert _current(client) == second.version
    assert stream_position(second.checkpoint) >= stream_position(last)
    assert _history(client, second.version, active) == [*grown, 30]  # 10, 12 not applied twice
    assert _history(client, second.version, newcomer) == [20, 22, 31]
    _assert_bundle_embeddings(client, second.version, bundle, skip={active})
    assert log_length(client) == 0
    assert len(second.deleted_versions) == 1  # the day-0 version; the first run's is kept
    assert parquet_rows(Path(second.snapshot)) == second.users


def _crash_once(marker: Path) -> type[EmbedBatch]:
    """An actor class whose process dies on its first batch, once (a class made here is
    shipped to the workers by value)."""

    class CrashOnce(EmbedBatch):
        def __call__(self, batch: pa.Table) -> pa.Table:
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    return CrashOnce


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_and_the_run_completes(
    local_ray: None, store: tuple[redis.Redis, str], bundle: Bundle, tmp_path: Path
) -> None:
    client, url = store
    marker = tmp_path / "crashed"
    report = embed_users(bundle, url, _options(tmp_path), udf=_crash_once(marker))
    assert marker.exists()  # a worker did die
    assert _current(client) == report.version
    assert parquet_rows(Path(report.snapshot)) == report.users == len(bundle.users)
    _assert_bundle_embeddings(client, report.version, bundle, skip=set())


def _fail_on(user: str) -> type[EmbedBatch]:
    """An actor class that raises on the batch holding `user`, after writing it to Redis."""

    class FailOn(EmbedBatch):
        def __call__(self, batch: pa.Table) -> pa.Table:
            out = super().__call__(batch)
            if user in batch.column("user_id").to_pylist():
                raise RuntimeError("injected failure")
            return out

    return FailOn


@pytest.mark.slow
def test_a_failed_run_keeps_the_old_version_and_the_log_and_leaves_nothing_behind(
    local_ray: None, store: tuple[redis.Redis, str], bundle: Bundle, tmp_path: Path
) -> None:
    client, url = store
    before = publish_bundle(client, bundle).version
    _log(client, "someone-new", bundle.catalog["uri"].iloc[5])
    options = _options(tmp_path)
    last_user = str(bundle.users["user_id"].iloc[-1])

    with pytest.raises(Exception, match="injected failure"):
        embed_users(bundle, url, options, udf=_fail_on(last_user))

    assert _current(client) == before
    assert log_length(client) == 1
    versions = {k.decode().split(":", 2)[2] for k in client.scan_iter(match="state:*")}
    assert versions == {before}  # the failed version's keys are gone
    # Its snapshot directory is removed; a write task still running on the shared Ray may
    # leave a stray part file, but never the snapshot.json a later run would build on.
    assert not list(options.snapshots.glob("*/snapshot.json"))


def test_the_job_lock_is_a_lease_renewed_while_the_run_lives(
    store: tuple[redis.Redis, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run holds the lock as long as it lives; one killed outright (SIGKILL, an evicted
    pod: no `finally` runs) frees it within a lease, not hours later."""
    client, _ = store
    monkeypatch.setattr(embed_users_module, "LEASE_S", 0.3)
    with JobLease(client):
        time.sleep(1.0)  # three expiries: renewed each time
        with pytest.raises(JobLocked):
            JobLease(client).__enter__()
    assert client.get(JOB_LOCK) is None  # released at the end
    killed = JobLease(client).__enter__()
    killed._stop.set()  # its process gone: nobody renews, nobody releases
    killed._renewer.join()
    time.sleep(0.5)
    with JobLease(client):  # the next run starts
        pass


@pytest.mark.slow
def test_a_second_run_is_refused_while_one_holds_the_job_lock(
    store: tuple[redis.Redis, str], bundle: Bundle, tmp_path: Path
) -> None:
    client, url = store
    before = publish_bundle(client, bundle).version
    held = client.lock(JOB_LOCK, timeout=60)
    assert held.acquire(blocking=False)
    with pytest.raises(RuntimeError, match="holds the job lock"):
        embed_users(bundle, url, _options(tmp_path))
    assert _current(client) == before  # nothing started: no Ray, no writes, no flip
    held.release()


@pytest.mark.slow
def test_the_next_run_sweeps_what_a_killed_run_and_other_publishers_left(
    local_ray: None, store: tuple[redis.Redis, str], bundle: Bundle, tmp_path: Path
) -> None:
    """A run killed outright (SIGKILL, a lost node) leaves its version's keys and snapshot;
    a version deleted by another publisher leaves its snapshot: the next run removes both."""
    client, url = store
    before = publish_bundle(client, bundle).version
    options = _options(tmp_path)
    killed = new_version(bundle.version)
    write_users(client, killed, ["u1"], np.ones((1, 8), np.float32), [np.arange(3)])
    half_written = options.snapshots / killed
    half_written.mkdir(parents=True)
    (half_written / "part-0.parquet").write_bytes(b"partial")
    client.hset(BUILDING, mapping={"version": killed, "snapshot": str(half_written)})
    deleted_elsewhere = options.snapshots / "ml-100k-0@20260101T000000000000"
    deleted_elsewhere.mkdir()
    SnapshotInfo(bundle.version, "1-0", 3).save(deleted_elsewhere)

    report = embed_users(bundle, url, options)

    versions = {k.decode().split(":", 2)[2] for k in client.scan_iter(match="state:*")}
    assert versions == {before, report.version}
    assert not half_written.exists() and not deleted_elsewhere.exists()
    assert [p.name for p in options.snapshots.iterdir()] == [report.version]
    assert not client.exists(BUILDING)


def test_a_ray_address_that_does_not_answer_ends_the_command_at_once(
    store: tuple[redis.Redis, str], tiny_bundle: Path
) -> None:
    """Ray itself would retry it for minutes; nothing is started or locked."""
    client, url = store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    args = ["embed-users", str(tiny_bundle), "--redis-url", url, "--address", f"127.0.0.1:{port}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"error: Ray at 127.0.0.1:{port} does not answer" in result.output
    assert not client.exists(JOB_LOCK) and not client.exists(BUILDING)


def _ray_of(driver: int) -> list[psutil.Process]:
    """The processes of the local Ray that process `driver` started (its session's name ends
    with the driver's pid)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(f"_{driver}/" in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
            with contextlib.suppress(psutil.Error):
                found.extend(proc.children(recursive=True))
    return found


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_leaves_nothing_behind(
    bundle: Bundle, tiny_bundle: Path, tmp_path: Path
) -> None:
    """SIGTERM (a CronJob's deadline, an eviction) in the middle of the writes: the command
    deletes its version and snapshot, frees the lock, stops its Ray, and exits."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    assert server.proc is not None
    client = sync_client(server.url)
    before = publish_bundle(client, bundle).version
    snapshots = tmp_path / "snapshots"
    args = ["embed-users", str(tiny_bundle), "--redis-url", server.url, "--workers", "1"]
    job = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args, "--snapshots", str(snapshots)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait(lambda: _ray_of(job.pid), job)  # past the run's plan: Ray starts
        server.proc.send_signal(signal.SIGSTOP)  # every write now waits: the run is mid-way
        _wait(lambda: any("MapWorker" in p.name() for p in _ray_of(job.pid)), job)
        ray_processes = _ray_of(job.pid)
        job.send_signal(signal.SIGTERM)
        server.proc.send_signal(signal.SIGCONT)
        _, err = job.communicate(timeout=120)
    finally:
        server.proc.send_signal(signal.SIGCONT)
        job.kill()
        server.stop()
        server.start()
    assert job.returncode != 0, err.decode()[-2000:]
    client = sync_client(server.url)
    assert _current(client) == before
    versions = {k.decode().split(":", 2)[2] for k in client.scan_iter(match="state:*")}
    assert versions == {before}
    assert not client.exists(BUILDING) and not client.exists(JOB_LOCK)
    assert not list(snapshots.glob("*"))
    time.sleep(2)  # Ray's shutdown ends its processes a moment after the driver
    assert not [p for p in ray_processes if p.is_running() and p.status() != "zombie"]
    server.stop()


def _wait(condition: Callable[[], object], job: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while not condition():
        assert job.poll() is None, job.stderr.read().decode()[-2000:] if job.stderr else ""
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
