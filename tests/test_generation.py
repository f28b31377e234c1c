"""SID-constrained beam search against brute-force enumeration of every leaf of the trie."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store.generation import Prompt, SearchStats, beam_search
from model_store.trie import SIDTrie
from model_store.vocab import TokenLayout

# score(prompt index, tokens generated so far, candidate token) -> raw log-probability
ScoreFn = Callable[[int, tuple[int, ...], int], float]


def by_token(prompt: int, history: tuple[int, ...], token: int) -> float:
    """Fixed score per token, the same for every prompt and history."""
    return -token / 10


def by_history(prompt: int, history: tuple[int, ...], token: int) -> float:
    """Depends on prompt and history, so wrong `extend` bookkeeping changes the result."""
    return -(((token * 7 + sum(history) * 3 + prompt * 5) % 13) / 4) - 0.01 * token


class FakeSession:
    """Deterministic session that replays `extend` to know each live row's history."""

    def __init__(self, n_prompts: int, score: ScoreFn) -> None:
        self.owner = list(range(n_prompts))
        self.history: list[tuple[int, ...]] = [() for _ in range(n_prompts)]
        self.score = score

    def logprobs(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        assert len(candidates) == len(self.owner)
        return [
            np.array([self.score(o, h, int(t)) for t in cand], dtype=np.float32)
            for o, h, cand in zip(self.owner, self.history, candidates, strict=True)
        ]

    def extend(self, parents: np.ndarray, tokens: np.ndarray) -> None:
        assert len(parents) == len(tokens)
        self.owner = [self.owner[int(p)] for p in parents]
        self.history = [
            (*self.history[int(p)], int(t)) for p, t in zip(parents, tokens, strict=True)
        ]


class FakeEngine:
    def __init__(self, score: ScoreFn) -> None:
        self.score = score

    def open(self, prompts: Sequence[Prompt]) -> FakeSession:
        return FakeSession(len(prompts), self.score)


def brute_force(
    codes: np.ndarray, layout: TokenLayout, score: ScoreFn, prompt: int
) -> dict[int, float]:
    """Item -> sum over levels of the raw score renormalised over that node's valid children."""
    out: dict[int, float] = {}
    for item, sid in enumerate(codes.tolist()):
        total = 0.0
        history: tuple[int, ...] = ()
        for level, code in enumerate(sid):
            siblings = sorted({s[level] for s in codes.tolist() if s[:level] == sid[:level]})
            tokens = [int(layout.token(level, c)) for c in siblings]
            raw = np.array([score(prompt, history, t) for t in tokens], dtype=np.float32)
            raw = raw.astype(np.float64)
            lse = raw.max() + np.log(np.exp(raw - raw.max()).sum())
            total += float(raw[siblings.index(code)] - lse)
            history = (*history, int(layout.token(level, code)))
        out[item] = total
    return out


def _layout(levels: int) -> TokenLayout:
    return TokenLayout(level_offsets=tuple(100 + 1000 * lv for lv in range(levels)))


def _check_valid(results: list, codes: np.ndarray, trie: SIDTrie, beam: int) -> None:
    for beams in results:
        assert len(beams) == min(beam, len(codes))
        assert len({b.item for b in beams}) == len(beams)  # distinct items
        for b in beams:
            assert trie.is_valid(b.sid)
            assert b.sid == tuple(codes[b.item].tolist())
        logps = [b.logprob for b in beams]
        assert logps == sorted(logps, reverse=True)


def test_exact_top_k_on_complete_trie() -> None:
    """Fixed per-token scores on a complete trie: every prefix has the same continuations,
    so a pruned prefix can never beat the kept ones and beam search is exactly top-k."""
    codes = np.array(list(itertools.product(range(4), range(3), range(5))), dtype=np.int64)
    codes = codes[np.random.default_rng(0).permutation(len(codes))]
    trie = SIDTrie.build(codes)
    layout = _layout(3)
    prompts = [Prompt(token_ids=(1, 2, 3)), Prompt(token_ids=(4,))]
    stats = SearchStats()
    results = beam_search(FakeEngine(by_token), prompts, trie, layout, beam_width=6, stats=stats)
    _check_valid(results, codes, trie, 6)
    assert stats.engine_calls == 3
    assert stats.rows_scored == [2, 8, 12]  # 2 prompts; 2 x 4 level-0 codes; 2 x 6
    truth = brute_force(codes, layout, by_token, 0)
    best = sorted(truth.values(), reverse=True)[:6]
    for beams in results:
        assert [b.logprob for b in beams] == pytest.approx(best)
        for b in beams:
            assert b.logprob == pytest.approx(truth[b.item])
    assert results[0][0].sid == (0, 0, 0)


@st.composite
def sid_sets(draw: st.DrawFn) -> np.ndarray:
    levels = draw(st.integers(1, 4))
    sids = draw(
        st.lists(st.tuples(*[st.integers(0, 4)] * levels), min_size=1, max_size=30, unique=True)
    )
    return np.array(sids, dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(sid_sets(), st.integers(1, 3))
def test_wide_beam_is_exact_for_any_trie(codes: np.ndarray, n_prompts: int) -> None:
    """With beam_width >= items nothing is pruned: the result is the full brute-force ranking
    (history-dependent scores, so this also checks the session's row bookkeeping)."""
    trie = SIDTrie.build(codes)
    layout = _layout(codes.shape[1])
    prompts = [Prompt(token_ids=(p,)) for p in range(n_prompts)]
    beam = len(codes)
    results = beam_search(FakeEngine(by_history), prompts, trie, layout, beam_width=beam)
    _check_valid(results, codes, trie, beam)
    for p, beams in enumerate(results):
        truth = brute_force(codes, layout, by_history, p)
        assert [b.logprob for b in beams] == pytest.approx(sorted(truth.values(), reverse=True))
        for b in beams:
            assert b.logprob == pytest.approx(truth[b.item])


@settings(max_examples=60, deadline=None)
@given(sid_sets(), st.integers(1, 4))
def test_narrow_beam_returns_valid_distinct_scored_items(codes: np.ndarray, beam: int) -> None:
    trie = SIDTrie.build(codes)
    layout = _layout(codes.shape[1])
    results = beam_search(FakeEngine(by_history), [Prompt(token_ids=(0,))], trie, layout, beam)
    _check_valid(results, codes, trie, beam)
    truth = brute_force(codes, layout, by_history, 0)
    for b in results[0]:
        assert b.logprob == pytest.approx(truth[b.item])
    assert results[0][0].logprob <= max(truth.values()) + 1e-9


def test_narrow_beam_is_approximate() -> None:
    """Documents a property, not a bug: beam search is not exact top-k on a general trie.

    Prefix (0,) is preferred at level 0 but splits its mass over 10 children, while (1,) has
    a single child (renormalised log-prob 0); with width 1 the search commits to (0,).
    """
    codes = np.array([[0, c] for c in range(10)] + [[1, 0]], dtype=np.int64)
    trie = SIDTrie.build(codes)
    layout = TokenLayout(level_offsets=(0, 0))
    results = beam_search(FakeEngine(by_token), [Prompt(token_ids=(0,))], trie, layout, 1)
    truth = brute_force(codes, layout, by_token, 0)
    assert results[0][0].sid == (0, 0)
    assert max(truth, key=lambda i: truth[i]) == 10  # the item (1, 0)
    assert results[0][0].logprob < truth[10]


def test_beam_width_must_be_positive_and_empty_prompts() -> None:
    trie = SIDTrie.build(np.array([[0, 1]]))
    with pytest.raises(ValueError):
        beam_search(FakeEngine(by_token), [Prompt(token_ids=(0,))], trie, _layout(2), 0)
    assert beam_search(FakeEngine(by_token), [], trie, _layout(2), 3) == []


@settings(max_examples=60, deadline=None)
@given(sid_sets(), st.data())
def test_excluded_items_are_cut_from_the_search(codes: np.ndarray, data: st.DataObject) -> None:
    """Searching with `exclude` is searching the trie of the other items: same items, same
    renormalised scores, and no excluded item ever comes out."""
    excluded = data.draw(st.sets(st.integers(0, len(codes) - 1)))
    beam = data.draw(st.integers(1, len(codes)))
    layout = _layout(codes.shape[1])
    prompts = [Prompt(token_ids=(0,)), Prompt(token_ids=(1,))]
    got = beam_search(
        FakeEngine(by_history), prompts, SIDTrie.build(codes), layout, beam,
        exclude=[excluded, set()],
    )  # fmt: skip
    kept = np.array([i for i in range(len(codes)) if i not in excluded], dtype=np.int64)
    if len(kept):
        sub = beam_search(
            FakeEngine(by_history), prompts[:1], SIDTrie.build(codes[kept]), layout, beam
        )[0]
        want = [(int(kept[b.item]), b.sid) for b in sub]
        assert [(b.item, b.sid) for b in got[0]] == want
        assert [b.logprob for b in got[0]] == pytest.approx([b.logprob for b in sub])
    else:
        assert got[0] == []
    assert not {b.item for b in got[0]} & excluded
    plain = beam_search(FakeEngine(by_history), prompts, SIDTrie.build(codes), layout, beam)
    assert [(b.item, b.logprob) for b in got[1]] == [(b.item, b.logprob) for b in plain[1]]


def test_rows_without_a_choice_cost_no_engine_call() -> None:
    """A level where every prefix has one child (the usual uniqueness level) is free, and the
    scores are those of a search that asked the engine anyway."""
    codes = np.array([[a, b, 0] for a in range(3) for b in range(4)] + [[0, 0, 1]])
    layout = _layout(3)
    stats = SearchStats()
    results = beam_search(
        FakeEngine(by_history), [Prompt((0,))], SIDTrie.build(codes), layout, 13, stats
    )
    assert stats.engine_calls == 3 and stats.rows_scored[-1] == 1  # only (0, 0) has a choice
    truth = brute_force(codes, layout, by_history, 0)
    for b in results[0]:
        assert b.logprob == pytest.approx(truth[b.item])


def test_a_search_with_every_item_excluded_returns_nothing() -> None:
    codes = np.array([[a, b] for a in range(2) for b in range(3)])
    got = beam_search(
        FakeEngine(by_token), [Prompt((0,))], SIDTrie.build(codes), _layout(2), 4,
        exclude=[set(range(len(codes)))],
    )  # fmt: skip
    assert got == [[]]
