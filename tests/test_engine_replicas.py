"""Several vLLM replicas behind the remote engine: affinity, failover, real prefix caches.

The routing tests need no server. The slow ones start two real vLLM OpenAI servers at once
(one module fixture, ~30-60 s on two cores) over the engine tests' tiny random Qwen2 and
check what the replicas are for: same answers as one exact engine, each replica's prefix
cache as useful as a lone server's (and a round-robin spread worse), and a replica killed
mid-stream costing no search. The kill comes last: it ends the fixture's second server.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from loadtest import bench_replicas as bench
from model_store.engines.base import EngineError
from model_store.engines.remote import RemoteEngine
from model_store.engines.replicas import Replica, ReplicaSet, rendezvous_weight, search_key
from model_store.engines.torch_engine import TorchEngine
from model_store.generation import Prompt, beam_search
from tests import test_engines
from tests.servers import VLLMServer, free_port
from tests.test_engines import LAYOUT, _prompts, _trie

model_dir = test_engines.model_dir
torch_engine = test_engines.torch_engine


# ---------------------------------------------------------------------------- routing


def test_rendezvous_spreads_searches_and_moves_only_a_dead_replicas() -> None:
    urls = [f"http://engine-{i}:8100" for i in range(3)]
    replicas = ReplicaSet(urls, timeout_s=1.0, max_connections=1, health_interval_s=0)
    keys = [i.to_bytes(4, "big") for i in range(3000)]
    first = [replicas.order(k)[0] for k in keys]
    shares = [sum(f is r for f in first) / len(keys) for r in replicas.replicas]
    assert all(abs(s - 1 / 3) < 0.05 for s in shares), shares

    dead = replicas.replicas[0]
    replicas.mark_down(dead, "test")
    moved = [replicas.order(k)[0] for k in keys]
    assert all(m is f for m, f in zip(moved, first, strict=True) if f is not dead)
    heirs = [m for m, f in zip(moved, first, strict=True) if f is dead]
    assert dead not in heirs
    share = sum(h is replicas.replicas[1] for h in heirs) / len(heirs)
    assert 0.4 < share < 0.6, share  # a dead replica's searches spread evenly
    assert replicas.order(keys[0])[-1] is dead  # still a last resort
    assert rendezvous_weight(keys[0], dead) == rendezvous_weight(keys[0], dead)
    replicas.close()


def _fake(replica: Replica, handler: httpx.MockTransport) -> None:
    replica.client.close()
    replica.client = httpx.Client(base_url=replica.url, transport=handler)


def _answer(request: httpx.Request, calls: list[str], name: str) -> httpx.Response:
    calls.append(f"{name} {request.url.path}")
    if request.url.path == "/health":
        return httpx.Response(200)
    sent = json.loads(request.content)
    top = {f"token_id:{i}": -float(k + 1) for k, i in enumerate(sent["logprob_token_ids"])}
    choices = [
        {"index": j, "logprobs": {"top_logprobs": [top]}} for j in range(len(sent["prompt_embeds"]))
    ]
    return httpx.Response(200, json={"choices": choices})


def test_a_failing_replica_moves_the_search_and_comes_back(model_dir: Path) -> None:
    engine = RemoteEngine(["http://a", "http://b"], model_dir, timeout_s=5.0, health_interval_s=0)
    prompts = _prompts()[:2]
    home, other = engine.route(prompts).candidates()
    calls: list[str] = []
    dead = {"on": True}

    def flaky(request: httpx.Request) -> httpx.Response:
        if dead["on"]:
            calls.append(f"home {request.url.path}")
            raise httpx.ConnectError("connection refused", request=request)
        return _answer(request, calls, "home")

    _fake(home, httpx.MockTransport(flaky))
    _fake(other, httpx.MockTransport(lambda r: _answer(r, calls, "other")))
    with engine:
        session = engine.open(prompts)
        got = session.logprobs([np.arange(20, 23)] * 2)  # one request: same candidates
        np.testing.assert_array_equal(got[0], [-1.0, -2.0, -3.0])
        assert calls == ["home /v1/completions", "other /v1/completions"]
        assert not home.healthy and home.failures == 1
        session.extend(np.array([0, 1]), np.array([20, 21]))
        session.logprobs([np.arange(30, 33)] * 2)
        assert calls[-1] == "other /v1/completions" and len(calls) == 3  # no second try home

        engine.replicas.check(1.0)  # still refusing: stays down
        assert not home.healthy
        dead["on"] = False
        engine.replicas.check(1.0)
        assert home.healthy
        calls.clear()
        engine.open(prompts).logprobs([np.arange(20, 23)] * 2)
        assert calls == ["home /v1/completions"]  # its searches are back home


def test_bad_request_is_not_failed_over_and_all_down_is_engine_error(model_dir: Path) -> None:
    engine = RemoteEngine(["http://a", "http://b"], model_dir, timeout_s=5.0, health_interval_s=0)
    calls: list[str] = []

    def status(code: int) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(str(request.url))
            return httpx.Response(code, text=f"status {code}")

        return httpx.MockTransport(handler)

    with engine:
        for replica in engine.replicas.replicas:
            _fake(replica, status(400))
        with pytest.raises(EngineError, match="HTTP 400"):
            engine.open(_prompts()[:1]).logprobs([np.arange(20, 23)])
        assert len(calls) == 1  # no server would answer a bad request better

        calls.clear()
        for replica in engine.replicas.replicas:
            _fake(replica, status(503))
        with pytest.raises(EngineError, match="HTTP 503"):
            engine.open(_prompts()[:1]).logprobs([np.arange(20, 23)])
        assert len(calls) == 2 and not any(r.healthy for r in engine.replicas.replicas)


def test_engine_urls_setting_gives_one_replica_each(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.serving import open_serving_engine
    from service.settings import Settings

    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]  # nobody listens: warm fails
    monkeypatch.setenv("GENREC_ENGINE", "remote")
    monkeypatch.setenv("GENREC_ENGINE_URLS", f" {urls[0]}/, {urls[1]} ")
    bundle: Any = SimpleNamespace(llm_dir=model_dir)
    with open_serving_engine(Settings(), bundle) as engine:
        assert isinstance(engine, RemoteEngine)
        assert [r.url for r in engine.replicas.replicas] == urls
    monkeypatch.delenv("GENREC_ENGINE_URLS")
    monkeypatch.setenv("GENREC_ENGINE_URL", urls[1])  # the one-server setting still works
    with open_serving_engine(Settings(), bundle) as engine:
        assert isinstance(engine, RemoteEngine)
        assert [r.url for r in engine.replicas.replicas] == urls[1:]


# ---------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def servers(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[VLLMServer]]:
    """Two vLLM OpenAI servers over `model_dir`, started together; stopped at the end."""
    procs = [VLLMServer(model_dir, tmp_path_factory.mktemp(f"vllm-{i}")) for i in range(2)]
    try:
        for proc in procs:
            proc.wait_healthy(timeout=300.0)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def pair(servers: list[VLLMServer], model_dir: Path) -> Iterator[RemoteEngine]:
    urls = [s.base_url for s in servers]
    with RemoteEngine(urls, model_dir, timeout_s=120.0, health_interval_s=0.5) as engine:
        engine.warm()  # both servers compile their first batch here
        yield engine


@pytest.mark.slow
def test_two_replicas_answer_like_the_exact_engine(
    torch_engine: TorchEngine, pair: RemoteEngine
) -> None:
    trie = _trie()
    batches = [_prompts(seed) for seed in range(40)]
    homes = [_home(pair.replicas, p) for p in batches]
    mixed = [
        p for r in pair.replicas.replicas for p, h in zip(batches, homes, strict=True) if h is r
    ]
    for prompts in mixed[:3] + mixed[-3:]:  # three batches whose home is each server
        expected = beam_search(torch_engine, prompts, trie, LAYOUT, 10)
        got = beam_search(pair, prompts, trie, LAYOUT, 10)
        for g, e in zip(got, expected, strict=True):
            assert [b.item for b in g] == [b.item for b in e]
            np.testing.assert_allclose([b.logprob for b in g], [b.logprob for b in e], atol=1e-3)
    assert all(r.served > 0 and r.failures == 0 for r in pair.replicas.replicas), [
        (r.served, r.failures) for r in pair.replicas.replicas
    ]


@pytest.mark.slow
def test_affinity_keeps_each_replicas_prefix_cache_hit_rate(
    servers: list[VLLMServer], model_dir: Path
) -> None:
    a, b = (s.base_url for s in servers)
    trie = bench.sid_trie()
    use: dict[str, dict[str, bench.CacheUse]] = {}
    engines: dict[str, RemoteEngine] = {
        "single": RemoteEngine([a], model_dir, timeout_s=60.0),
        "rendezvous": RemoteEngine([a, b], model_dir, timeout_s=60.0, health_interval_s=0),
        "round_robin": bench.RoundRobinEngine([a, b], model_dir, timeout_s=60.0),
    }
    for seed, (name, engine) in enumerate(engines.items(), start=1):
        pool = bench.searches(40, 2, 3 * bench.BLOCK + 8, seed)  # fresh users every time
        # Four searches whose rendezvous choice is each server (ports differ run to run).
        first = [_home(engines["rendezvous"].replicas, p).url for p in pool]
        work = [p for p, f in zip(pool, first, strict=True) if f == a][:4]
        work += [p for p, f in zip(pool, first, strict=True) if f == b][:4]
        with engine:
            use[name], _ = bench.cache_use([a, b], partial(bench.stream, engine, work, trie, 8, 1))
    single = use["single"][a]
    assert single.rate > 0.5, use  # a search's later levels reuse its prompts
    for url in (a, b):
        assert use["rendezvous"][url].queries > 0, use  # both replicas took searches
        assert abs(use["rendezvous"][url].rate - single.rate) <= 0.05, use
        assert use["round_robin"][url].rate < single.rate - 0.02, use
    # Round robin recomputes each prompt on the second replica: more tokens for the same work.
    computed = {name: sum(u.computed for u in per.values()) for name, per in use.items()}
    assert computed["round_robin"] > 1.2 * computed["rendezvous"], computed


@pytest.mark.slow
def test_a_replica_killed_under_load_loses_no_search(
    servers: list[VLLMServer], model_dir: Path
) -> None:
    urls = [s.base_url for s in servers]
    # The deadline (GENREC_DEADLINE_MS, 1 s by default) is also each engine call's budget;
    # 2 s leaves room for a CI machine whose two cores run other jobs too.
    deadline_s = 2.0
    trie = bench.sid_trie()
    work = bench.searches(40, 1, 3 * bench.BLOCK + 8, seed=7)
    with RemoteEngine(urls, model_dir, timeout_s=deadline_s, health_interval_s=0.5) as engine:
        engine.warm()
        victim = servers[1]
        run = bench.stream(
            engine,
            work,
            trie,
            8,
            threads=2,
            during=lambda: os.killpg(victim.proc.pid, signal.SIGKILL),
        )
        killed = engine.replicas.replicas[1]
        counts = {r.url: (r.served, r.failures, r.healthy) for r in engine.replicas.replicas}
        assert run.errors == [], counts
        assert len(run.latencies) == len(work)
        # Within the deadline; on a machine so busy that searches miss it with no kill at
        # all, the kill may add at most half of that tail again.
        before, after = (run.percentile(99, after_event=e) for e in (False, True))
        assert after < max(deadline_s, 1.5 * before), (after, before, counts)
        assert not killed.healthy, counts  # a failed call or a health probe marked it down
        # Searches keyed to the dead server came after the kill: the other one answered them.
        assert killed in [_home(engine.replicas, p) for p in work[len(work) // 2 :]]


def _home(replicas: ReplicaSet, prompts: list[Prompt]) -> Replica:
    """The replica a search goes to while every replica is healthy."""
    key = search_key(prompts)
    return max(replicas.replicas, key=lambda r: rendezvous_weight(key, r))
