"""Event ingest: events/s and per-call latency of the atomic Redis step, and through a gateway.

(a) `service.userstore.UserStore.append_events` (dedup + log append + live list, one Lua
    call per batch) against a throw-away redis-server on a unix socket, `--concurrency`
    callers on one event loop, batches of `--batch` events, against a baseline of batches of
    one event (the same callers): the ratio says what batching buys.
(b) With `--target` (a running gateway, e.g. `genrec serve`), `POST /v1/events` with the same
    batches over HTTP: validation, the use case and the transport on top of (a).

    python -m loadtest.bench_events --events 200000 --batch 100 --concurrency 8
    python -m loadtest.bench_events --target http://127.0.0.1:8000 --bundle bundles/ml-100k
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loadtest.bench_beam_vs_vllm import (
    bench_parser,
    machine_info,
    machine_line,
    percentiles,
    run_bench,
)
from loadtest.bench_redis import RedisServer

TYPES = ("play", "play", "play", "finish", "skip", "like", "dislike")


def make_batches(
    n_events: int, batch: int, users: list[str], items: list[str], run: str
) -> list[list[dict[str, Any]]]:
    """`n_events` events in batches, spread over users and items, every id new."""
    ids = itertools.count()
    events = [
        {
            "event_id": f"{run}-{next(ids)}",
            "user_id": users[i % len(users)],
            "item": items[(i * 7919) % len(items)],
            "type": TYPES[i % len(TYPES)],
        }
        for i in range(n_events)
    ]
    return [events[i : i + batch] for i in range(0, len(events), batch)]


async def drive(
    batches: list[list[dict[str, Any]]],
    send: Callable[[list[dict[str, Any]]], Awaitable[None]],
    concurrency: int,
) -> dict[str, Any]:
    """Sends every batch with `concurrency` callers; throughput and per-call latency."""
    queue = iter(batches)
    latencies: list[float] = []

    async def caller() -> None:
        for events in queue:
            start = time.perf_counter()
            await send(events)
            latencies.append((time.perf_counter() - start) * 1000.0)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    n = sum(len(b) for b in batches)
    return {"events": n, "seconds": seconds, "events_per_s": n / seconds,
            "call_ms": percentiles(latencies)}  # fmt: skip


async def direct(url: str, batches: list[list[dict[str, Any]]], concurrency: int) -> Any:
    from service.userstore import LoggedEvent, UserStore

    store = UserStore(url, timeout_s=5.0, cooldown_s=0.0)
    now = time.time()

    async def send(events: list[dict[str, Any]]) -> None:
        logged = [LoggedEvent(e["event_id"], e["user_id"], e["item"], e["type"], now)
                  for e in events]  # fmt: skip
        await store.append_events(logged, dedup_s=3600)

    try:
        return await drive(batches, send, concurrency)
    finally:
        await store.close()


async def over_rest(target: str, batches: list[list[dict[str, Any]]], concurrency: int) -> Any:
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=target, timeout=30.0, limits=limits) as client:

        async def send(events: list[dict[str, Any]]) -> None:
            r = await client.post("/v1/events", json={"events": events})
            r.raise_for_status()

        return await drive(batches, send, concurrency)


def population(bundle: Path | None) -> tuple[list[str], list[str]]:
    """User ids and item URIs of the bundle, else synthetic ones (Redis does not check them)."""
    if bundle is not None and (bundle / "catalog.parquet").exists():
        import pandas as pd

        items = pd.read_parquet(bundle / "catalog.parquet", columns=["uri"])["uri"].tolist()
        users = pd.read_parquet(bundle / "users.parquet", columns=["user_id"])["user_id"]
        return [str(u) for u in users], items
    return [f"u{i}" for i in range(10_000)], [f"synthetic:track:{i}" for i in range(50_000)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    users, items = population(args.bundle)
    result: dict[str, Any] = {"machine": machine_info(), "batch": args.batch,
                              "concurrency": args.concurrency}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            url = server.urls["unix"]
            single = make_batches(args.events // 10, 1, users, items, "one")
            batched = make_batches(args.events, args.batch, users, items, "many")
            result["redis_batch_1"] = asyncio.run(direct(url, single, args.concurrency))
            result["redis_batched"] = asyncio.run(direct(url, batched, args.concurrency))
        finally:
            server.close()
    if args.target:
        batched = make_batches(args.events, args.batch, users, items, f"rest{time.time_ns()}")
        result["rest_batched"] = asyncio.run(over_rest(args.target, batched, args.concurrency))
    return result


def report(r: dict[str, Any]) -> None:
    print(machine_line(r["machine"]))
    base = r["redis_batch_1"]["events_per_s"]
    for name in ("redis_batch_1", "redis_batched", "rest_batched"):
        if name not in r:
            continue
        x = r[name]
        print(
            f"{name:14s} {x['events_per_s']:>10,.0f} events/s ({x['events_per_s'] / base:5.1f}x "
            f"batch-1)  call p50 {x['call_ms']['p50']:.2f} ms  p99 {x['call_ms']['p99']:.2f} ms"
        )


def main() -> None:
    parser = bench_parser(__doc__, engine=False)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bundle", type=Path, default=None, help="users and items from here")
    parser.add_argument("--target", default=None, help="a running gateway's base URL")
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
