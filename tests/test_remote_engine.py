"""The remote engine against a real vLLM OpenAI server: same scores and beams as TorchEngine.

One server per module (start ~20 s, in-process engine core, small KV cache) over the tiny
random Qwen2 of test_engines.py; the failure-path tests need no server and are not slow.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_store.engines.base import EngineError
from model_store.engines.remote import RemoteEngine
from model_store.engines.torch_engine import TorchEngine
from model_store.generation import beam_search
from tests import test_engines
from tests.servers import VLLMServer, free_port
from tests.test_engines import LAYOUT, VOCAB, _prompts, _trie, _walk

SERVED_NAME = "genrec-llm"


# The engine tests' tiny model and its exact reference engine (session fixtures, built once).
model_dir = test_engines.model_dir
torch_engine = test_engines.torch_engine


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a vLLM OpenAI server over `model_dir`; stopped at the end."""
    proc = VLLMServer(model_dir, tmp_path_factory.mktemp("vllm-server"), SERVED_NAME)
    try:
        proc.wait_healthy()
        yield proc.base_url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def remote_engine(server: str, model_dir: Path) -> Iterator[RemoteEngine]:
    with RemoteEngine(server, model_dir, timeout_s=120.0, model_name=SERVED_NAME) as engine:
        engine.warm()  # the first batch compiles; keep that out of the tests below
        yield engine


@pytest.mark.slow
def test_remote_matches_torch_row_by_row(
    torch_engine: TorchEngine, remote_engine: RemoteEngine
) -> None:
    assert remote_engine.ready()
    prompts = _prompts()
    torch_trace = _walk(torch_engine.open(prompts), prompts, seed=2)
    remote_trace = _walk(remote_engine.open(prompts), prompts, seed=2)
    worst = 0.0
    for (_, _, c_t, got_t), (_, _, c_r, got_r) in zip(torch_trace, remote_trace, strict=True):
        for ct, cr, gt, gr in zip(c_t, c_r, got_t, got_r, strict=True):
            np.testing.assert_array_equal(ct, cr)
            assert np.shape(gt) == np.shape(gr)
            worst = max(worst, float(np.abs(gt - gr).max()))
    assert worst < 1e-3, worst


@pytest.mark.slow
def test_remote_more_candidates_than_logprob_token_ids_allows(
    torch_engine: TorchEngine, remote_engine: RemoteEngine
) -> None:
    prompts = _prompts()[:2]
    cands = [np.arange(VOCAB - 1, 99, -1), np.array([7, 3])]  # 200 ids, then 2
    got = remote_engine.open(prompts).logprobs(cands)
    ref = torch_engine.open(prompts).logprobs(cands)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-3)


@pytest.mark.slow
def test_remote_beam_search_matches_torch(
    torch_engine: TorchEngine, remote_engine: RemoteEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests: list[int] = []  # HTTP requests per engine call
    score = remote_engine.score

    def counting(batches: Any, route: Any = None) -> Any:
        requests.append(len(batches))
        return score(batches, route)

    monkeypatch.setattr(remote_engine, "score", counting)
    prompts = _prompts()
    trie = _trie()
    expected = beam_search(torch_engine, prompts, trie, LAYOUT, 10)
    got = beam_search(remote_engine, prompts, trie, LAYOUT, 10)
    for g, e in zip(got, expected, strict=True):
        assert [b.item for b in g] == [b.item for b in e]
        np.testing.assert_allclose([b.logprob for b in g], [b.logprob for b in e], atol=1e-3)
        assert all(trie.is_valid(b.sid) for b in g)
    # Level 0: every row asks for the root's 150 children: two requests (128 + 22 ids).
    assert len(requests) == trie.levels and requests[0] == 2


@pytest.mark.slow
def test_remote_http_error_is_engine_error(server: str, model_dir: Path) -> None:
    engine = RemoteEngine(server, model_dir, timeout_s=30.0, model_name="no-such-model")
    with engine, pytest.raises(EngineError, match=r"HTTP 404.*no-such-model"):
        engine.open(_prompts()[:1]).logprobs([np.arange(20, 30)])


def test_server_down_fails_fast(model_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with RemoteEngine(url, model_dir, timeout_s=30.0) as engine:
        start = time.monotonic()
        assert not engine.ready()
        with pytest.raises(EngineError, match="cannot connect"):
            engine.open(_prompts()[:2]).logprobs([np.arange(20, 30), np.arange(20, 25)])
        assert time.monotonic() - start < 3.0


def _mock(engine: RemoteEngine, handler: Any) -> None:
    """Routes the engine's requests to `handler` instead of the network."""
    (replica,) = engine.replicas.replicas
    replica.client.close()
    replica.client = httpx.Client(base_url=replica.url, transport=httpx.MockTransport(handler))


def _reply(ids: list[int], n: int) -> dict[str, Any]:
    top = {f"token_id:{i}": -float(k + 1) for k, i in enumerate(ids)}
    choice = {"logprobs": {"top_logprobs": [top]}}
    return {"choices": [{"index": j, **choice} for j in range(n)]}


def _always(status: int, text: str, calls: list[int]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(status, text=text)

    return handler


def test_one_retry_on_503_then_error(model_dir: Path) -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json=_reply(list(range(20, 23)), 1))

    with RemoteEngine("http://remote", model_dir, timeout_s=5.0) as engine:
        _mock(engine, flaky)
        (got,) = engine.open(_prompts()[:1]).logprobs([np.arange(20, 23)])
        np.testing.assert_array_equal(got, [-1.0, -2.0, -3.0])
        assert len(calls) == 2

        calls.clear()
        _mock(engine, _always(503, "down", calls))
        with pytest.raises(EngineError, match="HTTP 503: down"):
            engine.open(_prompts()[:1]).logprobs([np.arange(20, 23)])
        assert len(calls) == 2  # at most one retry

        calls.clear()
        _mock(engine, _always(400, "bad", calls))
        with pytest.raises(EngineError, match="HTTP 400: bad"):
            engine.open(_prompts()[:1]).logprobs([np.arange(20, 23)])
        assert len(calls) == 1  # a bad request is not retried


def test_searches_of_one_step_are_in_flight_together(model_dir: Path) -> None:
    """`score_sessions` sends every search's level at once (the server batches them), not
    one search's round trip after another's: each request here waits for the other two."""
    together = threading.Barrier(3, timeout=5.0)

    def handler(request: httpx.Request) -> httpx.Response:
        together.wait()  # BrokenBarrierError when the others are not in flight
        n = len(json.loads(request.content)["prompt_embeds"])
        return httpx.Response(200, json=_reply(list(range(20, 23)), n))

    with RemoteEngine("http://remote", model_dir, timeout_s=10.0) as engine:
        _mock(engine, handler)
        sessions = [engine.open([p]) for p in _prompts()[:3]]
        answers = engine.score_sessions([(s, [np.arange(20, 23)]) for s in sessions])
    for (got,) in answers:
        np.testing.assert_array_equal(got, [-1.0, -2.0, -3.0])


def test_malformed_response_is_engine_error(model_dir: Path) -> None:
    with RemoteEngine("http://remote", model_dir, timeout_s=5.0) as engine:
        session = engine.open(_prompts()[:1])
        _mock(engine, lambda request: httpx.Response(200, text="<html>"))
        with pytest.raises(EngineError, match="not JSON"):
            session.logprobs([np.arange(20, 23)])
        _mock(engine, lambda request: httpx.Response(200, json={"choices": []}))
        with pytest.raises(EngineError, match="0 choices for 1 prompts"):
            session.logprobs([np.arange(20, 23)])
        _mock(engine, lambda request: httpx.Response(200, json=_reply([20, 21], 1)))
        with pytest.raises(EngineError, match=r"no log-prob for tokens \[22\]"):
            session.logprobs([np.arange(20, 23)])
        _mock(engine, lambda request: httpx.Response(200, json={"choices": [{"index": 0}]}))
        with pytest.raises(EngineError, match="malformed response"):
            session.logprobs([np.arange(20, 23)])
    with pytest.raises(EngineError, match="closed"):
        engine.open(_prompts()[:1])
    assert not engine.ready()
