"""Several vLLM replicas behind the remote engine: prefix-cache hit rates and failover.

A search asks the engine once per SID level, each time with the same prompts plus one more
token; only a replica that computed the prompts at level 0 can serve them from its prefix
cache later. This measures each replica's hit rate (vLLM's own `vllm:prefix_cache_hits` /
`vllm:prefix_cache_queries` counters, in tokens) over fresh searches for:

* one replica alone (the reference);
* two replicas, each search pinned to one by rendezvous hashing (what the engine does);
* two replicas taking engine calls in turn (what a round-robin Service would do);
* with `--router-bin`, two replicas behind vllm-router hashing the search's header.

Then it SIGKILLs one replica while searches stream and counts errors and latency.

    python -m loadtest.bench_replicas              # random model, two servers started here
    python -m loadtest.bench_replicas --urls http://a:8100,http://b:8100 --model-dir DIR
    python -m loadtest.bench_replicas --router-bin vllm-router  # also through vllm-router
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np

from model_store.engines.remote import RemoteEngine, server_args
from model_store.engines.replicas import Replica, ReplicaSet, Route
from model_store.generation import Prompt, beam_search
from model_store.trie import SIDTrie
from model_store.vocab import TokenLayout

# The random model of loadtest.bench_engines (vocab 300, hidden 128): three SID levels of
# 16 codes each, dense enough that every level has rows with a choice (all are scored).
HIDDEN = 128
USER = 4
LEVELS = (16, 16, 16)
LAYOUT = TokenLayout((20, 36, 52))
WORDS = (68, 300)  # token ids used for prompt words
BLOCK = 32  # the servers' KV block size (server_args)

T = TypeVar("T")

_METRIC = re.compile(r"^(vllm:prefix_cache_(?:hits|queries))_total(?:\{[^}]*\})? (\S+)$", re.M)


def sid_trie(n_items: int = 2000, seed: int = 0) -> SIDTrie:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, s, n_items) for s in LEVELS], axis=1)
    return SIDTrie.build(np.unique(codes, axis=0))


def searches(n: int, batch: int, prompt_len: int, seed: int) -> list[list[Prompt]]:
    """`n` searches of `batch` fresh users each: a soft user row, then words; every prompt
    is distinct, so hits only come from a search's own earlier levels."""
    rng = np.random.default_rng(seed)

    def prompt() -> Prompt:
        words = rng.integers(*WORDS, prompt_len - 2)
        soft = rng.normal(0, 0.1, (1, HIDDEN)).astype(np.float32)
        return Prompt((2, USER, *map(int, words)), soft, USER)

    return [[prompt() for _ in range(batch)] for _ in range(n)]


def prefix_cache_counters(url: str) -> tuple[float, float]:
    """(hits, queries) in tokens since the server started, from its `/metrics`."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    values = {"vllm:prefix_cache_hits": 0.0, "vllm:prefix_cache_queries": 0.0}
    for name, value in _METRIC.findall(text):
        values[name] += float(value)
    return values["vllm:prefix_cache_hits"], values["vllm:prefix_cache_queries"]


def settled_counters(url: str, pause_s: float = 0.2) -> tuple[float, float]:
    """The counters once two reads agree (the server records a step's stats just after
    it answers)."""
    last = prefix_cache_counters(url)
    for _ in range(20):
        time.sleep(pause_s)
        now = prefix_cache_counters(url)
        if now == last:
            return now
        last = now
    return last


@dataclass(frozen=True)
class CacheUse:
    """Prompt tokens a server was asked for, and how many its prefix cache held."""

    hits: float
    queries: float

    @property
    def rate(self) -> float:
        """Hits per queried token (NaN for a server that got no query)."""
        return self.hits / self.queries if self.queries else float("nan")

    @property
    def computed(self) -> float:
        """Tokens the server had to compute (the misses)."""
        return self.queries - self.hits


def cache_use(urls: Sequence[str], work: Callable[[], T]) -> tuple[dict[str, CacheUse], T]:
    """Each server's prefix-cache use over `work`, and what `work` returned."""
    before = [settled_counters(u) for u in urls]
    done = work()
    after = [settled_counters(u) for u in urls]
    use = {
        url: CacheUse(h1 - h0, q1 - q0)
        for url, (h0, q0), (h1, q1) in zip(urls, before, after, strict=True)
    }
    return use, done


class RoundRobinRoute(Route):
    """The baseline: every engine call to the next replica, whatever the search."""

    def __init__(self, replicas: ReplicaSet, turn: itertools.count[int]) -> None:
        super().__init__(replicas, b"")
        self._turn = turn

    def candidates(self) -> list[Replica]:
        replicas = self.replicas.replicas
        start = next(self._turn) % len(replicas)
        return replicas[start:] + replicas[:start]


class RoundRobinEngine(RemoteEngine):
    """A remote engine without search affinity, as behind a round-robin Service."""

    _turn = itertools.count()

    def route(self, prompts: Sequence[Prompt]) -> Route:
        return RoundRobinRoute(self.replicas, self._turn)


@dataclass
class Stream:
    """What a stream of concurrent searches saw."""

    latencies: list[float]
    errors: list[str]
    seconds: float
    ends: list[float]  # when each answered search ended (seconds from the start)
    event_at: float | None = None  # when `during` ran

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, *, after_event: bool | None = None) -> float:
        """Latency percentile of every answered search, or only of those that ended
        before (`after_event` False) or after (True) the event."""
        values = self.latencies
        if after_event is not None and self.event_at is not None:
            at = self.event_at
            values = [
                v for v, e in zip(self.latencies, self.ends, strict=True) if (e > at) == after_event
            ]
        return float(np.percentile(values, q)) if values else float("nan")


def stream(
    engine: RemoteEngine,
    work: list[list[Prompt]],
    trie: SIDTrie,
    beam: int,
    threads: int,
    during: Callable[[], object] | None = None,
) -> Stream:
    """Runs the searches of `work` on `threads` threads; `during` runs meanwhile (e.g. a
    kill) once a quarter of them is done."""
    todo = iter(work)
    lock = threading.Lock()
    latencies: list[float] = []
    ends: list[float] = []
    errors: list[str] = []
    quarter = threading.Event()
    event_at: float | None = None

    def worker() -> None:
        while True:
            with lock:
                prompts = next(todo, None)
            if prompts is None:
                return
            start = time.perf_counter()
            try:
                beam_search(engine, prompts, trie, LAYOUT, beam)
            except Exception as exc:  # every failure counts, whatever its type
                with lock:
                    errors.append(repr(exc))
            else:
                with lock:
                    latencies.append(time.perf_counter() - start)
                    ends.append(time.perf_counter() - began)
            with lock:
                if len(latencies) + len(errors) >= len(work) // 4:
                    quarter.set()

    began = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    if during is not None:
        while not quarter.wait(0.1) and any(t.is_alive() for t in pool):
            pass
        event_at = time.perf_counter() - began
        during()
    for t in pool:
        t.join()
    return Stream(latencies, errors, time.perf_counter() - began, ends, event_at)


def _start_server(model_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    args = server_args(model_dir, "127.0.0.1", port, kv_cache_bytes=64 * 2**20)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _start_router(binary: str, urls: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """vllm-router in front of `urls`, hashing each request's `X-Session-ID` header."""
    port, metrics_port = _free_port(), _free_port()
    args = [
        binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
        "--policy", "consistent_hash", "--health-check-interval-secs", "1",
        "--prometheus-port", str(metrics_port), "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s:g} s")


def _run(
    args: argparse.Namespace,
    model_dir: Path,
    urls: list[str],
    kill: Callable[[], object],
    router: str | None,
) -> dict[str, object]:
    trie = sid_trie()
    a, b = urls[:2]
    out: dict[str, object] = {"searches": args.searches, "batch": args.batch}
    out["prompt_len"], out["beam"] = args.prompt_len, args.beam
    engines = {
        "single": RemoteEngine([a], model_dir, timeout_s=args.deadline_s),
        "rendezvous": RemoteEngine([a, b], model_dir, timeout_s=args.deadline_s),
        "round_robin": RoundRobinEngine([a, b], model_dir, timeout_s=args.deadline_s),
    }
    if router is not None:  # the same searches' keys, hashed by the router instead
        engines["router"] = RemoteEngine([router], model_dir, timeout_s=args.deadline_s)
    try:
        for engine in engines.values():
            engine.warm()
        for seed, (name, engine) in enumerate(engines.items(), start=1):
            work = searches(args.searches, args.batch, args.prompt_len, seed)
            use, run = cache_use([a, b], partial(stream, engine, work, trie, args.beam, 1))
            print(f"{name}: {use} {run.per_second:.2f} searches/s", file=sys.stderr)
            out[name] = {
                "hit_rate": {"a": use[a].rate, "b": use[b].rate},
                "computed_tokens_per_search": (use[a].computed + use[b].computed) / len(work),
                "searches_per_s": run.per_second,
                "p50_ms": 1000 * run.percentile(50),
                "p99_ms": 1000 * run.percentile(99),
                "errors": len(run.errors),
            }
        work = searches(args.failover_searches, args.batch, args.prompt_len, seed=99)
        engine = engines["router" if router is not None else "rendezvous"]
        run = stream(engine, work, trie, args.beam, args.threads, during=kill)
        out["failover"] = {
            "through": "router" if router is not None else "engine",
            "searches": len(work),
            "threads": args.threads,
            "answered": len(run.latencies),
            "errors": len(run.errors),
            "p50_ms": 1000 * run.percentile(50),
            "p99_ms": 1000 * run.percentile(99),
            "p99_ms_before_kill": 1000 * run.percentile(99, after_event=False),
            "p99_ms_after_kill": 1000 * run.percentile(99, after_event=True),
            "deadline_ms": 1000 * args.deadline_s,
            # engine calls that failed on one server (or the router) and were tried again
            "calls_tried_again": sum(r.failures for r in engine.replicas.replicas),
            "first_errors": run.errors[:3],
        }
    finally:
        for engine in engines.values():
            engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", help="two running servers, comma-separated (else started)")
    parser.add_argument("--model-dir", type=Path, help="their model (else a random one)")
    parser.add_argument("--searches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="users per search")
    parser.add_argument("--prompt-len", type=int, default=3 * BLOCK + 8)
    parser.add_argument("--beam", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=1.0, help="budget per engine call")
    parser.add_argument("--threads", type=int, default=2, help="concurrent searches (failover)")
    parser.add_argument("--failover-searches", type=int, default=100)
    parser.add_argument(
        "--router-bin",
        help="a vllm-router executable: start it (consistent_hash) in front of the two "
        "started servers, measure searches through it, and kill a server behind it",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from loadtest.bench_engines import save_random_qwen2

            model_dir = save_random_qwen2(Path(tmp) / "llm")
        procs: list[subprocess.Popen[bytes]] = []
        if args.urls:
            urls = [u.strip() for u in args.urls.split(",")]

            def kill() -> None:
                print(f"stop {urls[1]} now (SIGKILL)", file=sys.stderr)

        else:
            started = [_start_server(model_dir, Path(tmp) / f"vllm-{i}.log") for i in range(2)]
            procs = [p for p, _ in started]
            urls = [u for _, u in started]

            def kill() -> None:
                os.killpg(procs[1].pid, signal.SIGKILL)

        router: str | None = None
        try:
            for i, url in enumerate(urls):
                _wait_healthy(url, procs[i] if procs else None, 300.0)
            if args.router_bin:
                proc, router = _start_router(args.router_bin, urls, Path(tmp) / "router.log")
                procs.append(proc)
                _wait_healthy(router, proc, 60.0)
            print(json.dumps(_run(args, model_dir, urls, kill, router), indent=2))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    main()
