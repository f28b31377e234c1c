"""Scoring engines: the KV-cached TorchEngine against plain full forwards, vLLM against Torch.

A random Qwen2 (peaked by a large init, fixed seed) stands in for a trained model: what is
tested is that the engines compute the model's own next-token log-probabilities for every
live row, whatever the padding, soft rows and beam reordering.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from loadtest.bench_engines import save_random_qwen2
from model_store.engines import open_engine, vllm_core
from model_store.engines.base import prompt_embeddings
from model_store.engines.torch_engine import TorchEngine
from model_store.engines.vllm_core import CoreDriver, PromptBlockHashes, through_front_end
from model_store.engines.vllm_engine import VLLMEngine, _fastest_path
from model_store.generation import (
    Beam,
    BeamSearch,
    Prompt,
    SearchStats,
    beam_search,
    search_in_chunks,
)
from model_store.trie import SIDTrie
from model_store.vocab import TokenLayout

VOCAB = 300
HIDDEN = 128
USER = 4
LEVEL_SIZES = (150, 40, 40)  # level 0 has more children than vLLM's 128 logprob_token_ids
LAYOUT = TokenLayout((20, 170, 210))
TEXT = (5, 20)  # token ids used for prompt words


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_qwen2(
        tmp_path_factory.mktemp("tiny-qwen2") / "llm",
        vocab_size=VOCAB,
        hidden=HIDDEN,
        heads=4,
        layers=2,
        intermediate=256,
        seed=0,
    )


@pytest.fixture(scope="session")
def torch_engine(model_dir: Path) -> TorchEngine:
    return TorchEngine.from_dir(model_dir)


@pytest.fixture(scope="session")
def vllm_engine(model_dir: Path) -> Iterator[VLLMEngine]:
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: ~11 s to start, not ~31
    try:
        with VLLMEngine(model_dir) as engine:
            yield engine
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


def _prompts(seed: int = 0) -> list[Prompt]:
    """Different lengths; soft rows at the start, in the middle, two of them, or none."""
    rng = np.random.default_rng(seed)

    def words(n: int) -> list[int]:
        return [int(w) for w in rng.integers(*TEXT, n)]

    def soft(n: int) -> np.ndarray:
        return rng.normal(0, 0.1, (n, HIDDEN)).astype(np.float32)

    return [
        Prompt((2, USER, *words(9)), soft(1), USER),
        Prompt((2, *words(3)), None, USER),
        Prompt((2, *words(5), USER, *words(17), USER, 1), soft(2), USER),
        Prompt((USER,), soft(1), USER),
        Prompt((2, *words(30))),
        Prompt((2, USER, *words(68)), soft(1), USER),  # two KV blocks, rows fill no third
        Prompt((USER, *words(62)), soft(1), USER),  # rows past the first level fill a second
    ]


def _reference(engine: TorchEngine, prompt: Prompt, tokens: list[int]) -> np.ndarray:
    """Full-vocabulary next-token log-probs from one unpadded, uncached forward."""
    with torch.inference_mode():
        embeds = prompt_embeddings(prompt, engine.table)
        if tokens:
            embeds = torch.cat([embeds, engine.table[torch.tensor(tokens)]])
        logits = engine.model(inputs_embeds=embeds[None]).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1).numpy()


def _candidates(rows: int, level: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A different, unsorted candidate set per row, some with a single candidate."""
    size = LEVEL_SIZES[level]
    out = []
    for r in range(rows):
        n = 1 if r % 4 == 3 else int(rng.integers(2, min(size, 40)))
        out.append(LAYOUT.token(level, rng.choice(size, n, replace=False)))
    return out


# Beam bookkeeping for three levels: rows expand, repeat a parent, and drop prompts.
PARENTS = (
    np.array([0, 0, 1, 2, 2, 2, 3, 4, 4]),
    np.array([8, 0, 1, 1, 2, 3, 5, 6, 7, 7, 4]),
)


def _walk(session: object, prompts: list[Prompt], seed: int) -> list[tuple[list[int], ...]]:
    """Drives a session through PARENTS, recording (row histories, candidates, log-probs)."""
    rng = np.random.default_rng(seed)
    owner = list(range(len(prompts)))
    history: list[list[int]] = [[] for _ in prompts]
    trace = []
    for level in range(len(PARENTS) + 1):
        cands = _candidates(len(owner), level, rng)
        got = session.logprobs(cands)  # type: ignore[attr-defined]
        trace.append((list(owner), [list(h) for h in history], cands, got))
        if level < len(PARENTS):
            parents = PARENTS[level]
            tokens = np.array([int(cands[p][j % len(cands[p])]) for j, p in enumerate(parents)])
            session.extend(parents, tokens)  # type: ignore[attr-defined]
            owner = [owner[p] for p in parents]
            history = [[*history[p], int(t)] for p, t in zip(parents, tokens, strict=True)]
    return trace


def test_torch_session_matches_full_forward(torch_engine: TorchEngine) -> None:
    prompts = _prompts()
    trace = _walk(torch_engine.open(prompts), prompts, seed=1)
    worst = 0.0
    for owner, history, cands, got in trace:
        assert len(got) == len(owner)
        for o, h, c, g in zip(owner, history, cands, got, strict=True):
            ref = _reference(torch_engine, prompts[o], h)[c]
            assert g.shape == c.shape
            worst = max(worst, float(np.abs(g - ref).max()))
    assert worst < 1e-4, worst


def test_torch_logprobs_are_raw_not_renormalised(torch_engine: TorchEngine) -> None:
    """Candidates' probabilities sum to less than one: the search renormalises, not the engine."""
    session = torch_engine.open(_prompts()[:1])
    (lp,) = session.logprobs([LAYOUT.token(1, np.arange(5))])
    assert 0 < np.exp(lp).sum() < 0.999


def test_soft_rows_must_match_placeholders(torch_engine: TorchEngine) -> None:
    bad = Prompt((2, USER, 7), np.zeros((2, HIDDEN), np.float32), USER)
    with pytest.raises(ValueError, match="soft has shape"):
        torch_engine.open([bad])
    with pytest.raises(ValueError, match="placeholder"):
        torch_engine.open([Prompt((2, -1, 7))])


def test_soft_rows_change_the_scores(torch_engine: TorchEngine) -> None:
    prompt = _prompts()[0]
    other = Prompt(prompt.token_ids, -prompt.soft, USER)  # type: ignore[operator]
    cands = [np.arange(20, 60)]
    a = torch_engine.open([prompt]).logprobs(cands)[0]
    b = torch_engine.open([other]).logprobs(cands)[0]
    assert np.abs(a - b).max() > 1e-3


def _trie(n_items: int = 400, seed: int = 0) -> SIDTrie:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, s, n_items) for s in LEVEL_SIZES], axis=1)
    return SIDTrie.build(np.unique(codes, axis=0))


def test_search_in_chunks_equals_one_search(torch_engine: TorchEngine) -> None:
    prompts = _prompts() * 2
    trie = _trie()
    whole = beam_search(torch_engine, prompts, trie, LAYOUT, 7)
    stats = SearchStats()
    chunked = search_in_chunks(torch_engine, prompts, trie, LAYOUT, 7, chunk=3, stats=stats)
    chunks = -(-len(prompts) // 3)
    assert 0 < stats.engine_calls <= chunks * trie.levels  # rows without a choice: not scored
    assert [[b.item for b in r] for r in chunked] == [[b.item for b in r] for r in whole]
    for r_chunk, r_whole in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(
            [b.logprob for b in r_chunk], [b.logprob for b in r_whole], atol=1e-4
        )
    twin = len(prompts) // 2
    assert [b.item for b in whole[0]] == [b.item for b in whole[twin]]  # padding-independent


def test_open_engine_rejects_unknown_kind(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown engine"), open_engine("tpu", model_dir):
        pass
    with open_engine("torch", model_dir) as engine:
        assert isinstance(engine, TorchEngine)


@pytest.mark.slow
def test_vllm_matches_torch_row_by_row(torch_engine: TorchEngine, vllm_engine: VLLMEngine) -> None:
    prompts = _prompts()
    torch_trace = _walk(torch_engine.open(prompts), prompts, seed=2)
    vllm_trace = _walk(vllm_engine.open(prompts), prompts, seed=2)
    worst = 0.0
    for (_, _, c_t, got_t), (_, _, c_v, got_v) in zip(torch_trace, vllm_trace, strict=True):
        for ct, cv, gt, gv in zip(c_t, c_v, got_t, got_v, strict=True):
            np.testing.assert_array_equal(ct, cv)
            worst = max(worst, float(np.abs(gt - gv).max()))
    assert worst < 1e-3, worst


@pytest.mark.slow
def test_vllm_more_candidates_than_logprob_token_ids_allows(
    torch_engine: TorchEngine, vllm_engine: VLLMEngine
) -> None:
    prompts = _prompts()[:2]
    cands = [np.arange(VOCAB - 1, 99, -1), np.array([7, 3])]  # 200 ids, then 2
    got = vllm_engine.open(prompts).logprobs(cands)
    ref = torch_engine.open(prompts).logprobs(cands)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-3)


@pytest.mark.slow
def test_vllm_beam_search_matches_torch(torch_engine: TorchEngine, vllm_engine: VLLMEngine) -> None:
    prompts = _prompts()
    trie = _trie()
    expected = beam_search(torch_engine, prompts, trie, LAYOUT, 10)
    got = search_in_chunks(vllm_engine, prompts, trie, LAYOUT, 10, chunk=4)
    for g, e in zip(got, expected, strict=True):
        assert [b.item for b in g] == [b.item for b in e]
        np.testing.assert_allclose([b.logprob for b in g], [b.logprob for b in e], atol=1e-3)
        assert all(trie.is_valid(b.sid) for b in g)


def _stepped_together(engine: TorchEngine | VLLMEngine, trie: SIDTrie) -> list[list[Beam]]:
    """Three searches started one step apart, every step scoring all live ones at once
    (`score_sessions`, as the gateway's batcher drives them): results per prompt."""
    prompts = _prompts()
    groups = [prompts[:2], prompts[2:3], prompts[3:]]
    live: list[BeamSearch] = []
    started: list[BeamSearch] = []
    while groups or live:
        if groups:
            search = BeamSearch(engine, groups.pop(0), trie, LAYOUT, 10)
            live.append(search)
            started.append(search)
        asking = [s for s in live if not s.done]
        answers = engine.score_sessions([(s.session, s.asked) for s in asking])
        for search, answer in zip(asking, answers, strict=True):
            search.tell(answer)
        live = [s for s in live if not s.done]
    return [beams for s in started for beams in s.results()]


@pytest.mark.slow
def test_searches_at_different_levels_share_steps_exactly(
    torch_engine: TorchEngine, vllm_engine: VLLMEngine
) -> None:
    trie = _trie()
    expected = beam_search(torch_engine, _prompts(), trie, LAYOUT, 10)
    for engine in (torch_engine, vllm_engine):
        got = _stepped_together(engine, trie)
        for g, e in zip(got, expected, strict=True):
            assert [b.item for b in g] == [b.item for b in e]
            np.testing.assert_allclose([b.logprob for b in g], [b.logprob for b in e], atol=1e-3)


def test_closed_vllm_engine_fails_loudly() -> None:
    """close() is idempotent and a closed engine refuses work (no vLLM start needed)."""
    handle = VLLMEngine.__new__(VLLMEngine)
    handle.llm = None
    handle.close()
    with pytest.raises(RuntimeError, match="closed"):
        handle.open(_prompts()[:1])


@pytest.mark.slow
def test_vllm_engine_core_driven_directly_equals_the_front_end(vllm_engine: VLLMEngine) -> None:
    """The rows skip `LLM.generate` (the parity tests above run on this path), and give
    the front end's own answers, one request or several hundred with padded candidates."""
    assert vllm_engine.direct
    assert vllm_engine.llm is not None
    front_end = through_front_end(vllm_engine.llm)
    table = vllm_engine.table
    rows = [(prompt_embeddings(p, table), table[:level]) for p in _prompts() for level in range(3)]
    rows = rows * 20
    rng = np.random.default_rng(3)
    cands = [rng.choice(VOCAB, int(rng.integers(1, 128)), replace=False) for _ in rows]
    for (ids_f, lp_f), (ids_d, lp_d), c in zip(
        front_end(rows, cands), vllm_engine._generate(rows, cands), cands, strict=True
    ):
        np.testing.assert_array_equal(ids_f[1:], c)
        np.testing.assert_array_equal(ids_d[1 : len(c) + 1], c)
        np.testing.assert_allclose(lp_d[1 : len(c) + 1], lp_f[1:], atol=1e-5)


@pytest.mark.slow
def test_rows_of_a_prompt_share_its_block_hashes(vllm_engine: VLLMEngine) -> None:
    """vLLM hashes a prompt's KV blocks once for all its rows (the first row's hashes
    serve the others), and only where a row's own tokens fill no block."""
    core = vllm_engine.llm.llm_engine.engine_core.engine_core  # type: ignore[union-attr]
    hashes = core.request_block_hasher
    assert isinstance(hashes, PromptBlockHashes)
    inner, fresh = hashes._inner, []

    def counted(request: Any) -> list[Any]:
        if not request.block_hashes:
            fresh.append(request.num_tokens)
        return inner(request)

    table = vllm_engine.table
    long, short = (prompt_embeddings(p, table) for p in _prompts()[-2:])  # 70 and 63 tokens
    rows = [(p, table[:level]) for p in (long, short) for level in range(3)] * 2
    cands = [np.arange(10, 20)] * len(rows)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(hashes, "_inner", counted)
        got = vllm_engine._generate(rows, cands)
    assert fresh == [70, 63, 64, 65, 64, 65]  # the long prompt's first row; every row past a block
    want = through_front_end(vllm_engine.llm)(rows, cands)
    for (_, lp_w), (_, lp_g) in zip(want, got, strict=True):
        np.testing.assert_allclose(lp_g[1:11], lp_w[1:11], atol=1e-5)


@pytest.mark.slow
def test_vllm_engine_core_failure_leaves_nothing_behind(
    vllm_engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A core that stops answering mid-call fails the call and its rows are aborted, so the
    next call answers its own rows only; an engine whose core cannot be read at the opening probe
    keeps `LLM.generate`."""
    assert vllm_engine.llm is not None
    driver = CoreDriver(vllm_engine.llm)
    table = vllm_engine.table
    prompts = [(prompt_embeddings(p, table), table[:0]) for p in _prompts()]
    cands = [np.arange(10, 20)] * len(prompts)
    want = driver.generate(prompts, cands)
    with monkeypatch.context() as m:  # the rows are added, the core never answers
        m.setattr(driver._core, "get_output", lambda: SimpleNamespace(outputs=[]))
        m.setattr(vllm_core, "MAX_IDLE_STEPS", 3)
        with pytest.raises(RuntimeError, match="stopped answering"):
            driver.generate(prompts, cands)
    scheduler = vllm_engine.llm.llm_engine.engine_core.engine_core.scheduler
    assert not scheduler.has_unfinished_requests()
    with monkeypatch.context() as m:
        m.setattr(vllm_core, "_first_position", lambda lists: [])
        engine_path, direct = _fastest_path(vllm_engine.llm, vllm_engine.table)
        assert not direct
    for (ids_w, lp_w), (ids_g, lp_g) in zip(want, driver.generate(prompts, cands), strict=True):
        np.testing.assert_array_equal(ids_w[1:11], ids_g[1:11])
        np.testing.assert_allclose(lp_w, lp_g, atol=1e-5)
    assert engine_path(prompts[:1], cands[:1])[0][0][1:11].tolist() == list(range(10, 20))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")
def test_compiled_vllm_engine_matches_torch(
    model_dir: Path, torch_engine: TorchEngine, vllm_engine: VLLMEngine
) -> None:
    """`GENREC_ENGINE_COMPILE`: the compiled model ranks the same items, beside an eager
    engine in the same process (which still answers after)."""
    prompts = _prompts()
    trie = _trie()
    expected = beam_search(torch_engine, prompts, trie, LAYOUT, 10)
    with VLLMEngine(model_dir, enforce_eager=False) as compiled:
        got = beam_search(compiled, prompts, trie, LAYOUT, 10)
    after = beam_search(vllm_engine, prompts, trie, LAYOUT, 10)
    for g, a, e in zip(got, after, expected, strict=True):
        assert [b.item for b in g] == [b.item for b in a] == [b.item for b in e]
        np.testing.assert_allclose([b.logprob for b in g], [b.logprob for b in e], atol=1e-3)


def test_only_the_tokenizer_warmup_warning_is_dropped(vllm_engine: VLLMEngine) -> None:
    """The engine loads no tokenizer on purpose: vLLM's warm-up complaint about it is not
    a fault and is not logged; anything else from the same logger still is."""
    import logging

    from model_store.engines.vllm_engine import VLLM_RENDERER_LOGGER

    logger = logging.getLogger(VLLM_RENDERER_LOGGER)

    def record(message: str, error: Exception | None) -> logging.LogRecord:
        info = (type(error), error, None) if error else None
        return logger.makeRecord(logger.name, logging.WARNING, "f", 1, message, (), info)

    missing = ValueError("Tokenizer not available when `skip_tokenizer_init=True`")
    assert not logger.filter(record("Chat template warmup failed", missing))
    assert logger.filter(record("Chat template warmup failed", RuntimeError("template bug")))
    assert logger.filter(record("something else", missing))
