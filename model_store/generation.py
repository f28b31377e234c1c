"""SID-constrained beam search, shared by the offline evaluation and the online gateway.

The search walks the Semantic-ID prefix trie: at each of the L levels every live beam
asks the engine for the log-probabilities of its *valid* children only, the scores are
renormalised over those children, and the best B (prompt, prefix) rows survive. Every
finished beam is a leaf of the trie, so every result is a real item and the B results of
one prompt are distinct items by construction. (Like any beam search it is exact only
when no prefix is cut; with B at least the number of nodes per level it ranks all items.)

Engines differ only in how they compute next-token log-probabilities; they implement
:class:`Engine` (open a :class:`Session` over a batch of prompts), and the search never
looks inside them.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from model_store.trie import SIDTrie
from model_store.vocab import TokenLayout


@dataclass(frozen=True)
class Prompt:
    """A prompt in token ids; positions holding the `<user>` placeholder take `soft` rows.

    `soft` has shape (n_placeholders, hidden) and is None when the prompt has no soft token.
    """

    token_ids: tuple[int, ...]
    soft: np.ndarray | None = None
    placeholder_id: int = -1

    def soft_positions(self) -> list[int]:
        return [i for i, t in enumerate(self.token_ids) if t == self.placeholder_id]


class Session(Protocol):
    """Live rows of one search: each row is (prompt index, SID tokens generated so far)."""

    def logprobs(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Next-token log-probabilities of `candidates[r]` (token ids) for every live row r."""
        ...

    def extend(self, parents: np.ndarray, tokens: np.ndarray) -> None:
        """Replace the live rows by `row parents[j]` followed by token `tokens[j]`."""
        ...


class Engine(Protocol):
    """The one engine interface (implementations in `model_store.engines`)."""

    def open(self, prompts: Sequence[Prompt]) -> Session:
        """A search session over `prompts`: one live row per prompt to start with."""
        ...

    def score_sessions(
        self, asks: Sequence[tuple[Session, Sequence[np.ndarray]]]
    ) -> list[list[np.ndarray]]:
        """`session.logprobs(candidates)` for each (session, candidates) pair: the rows of
        several searches, possibly at different levels, in one engine step where the engine
        can (its fixed cost per step is then paid once)."""
        ...

    def warm(self) -> None:
        """Makes the first real search fast (the first generation compiles kernels)."""
        ...

    def ready(self) -> bool:
        """Whether it answers now (a remote server's health check; in-process: not closed)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@dataclass
class Beam:
    """A finished beam: the item it names, its Semantic ID, and its log-probability."""

    item: int
    sid: tuple[int, ...]
    logprob: float


@dataclass
class SearchStats:
    engine_calls: int = 0
    rows_scored: list[int] = field(default_factory=list)  # one entry per engine call
    level_seconds: list[float] = field(default_factory=list)  # one entry per SID level


class BeamSearch:
    """One batched beam search as a state machine: the caller scores `asked` (one array of
    candidate tokens per live row) with the engine and hands the answers to `tell`, level
    by level, until `done`. `beam_search` drives one search alone; a scheduler can drive
    several at different levels and score all their rows in one engine step.

    Top-`beam_width` distinct items per prompt, best first, only ever valid Semantic IDs.
    `exclude[i]` (e.g. what user i already consumed) are items prompt i must not return:
    their branches are cut from the trie for that prompt, so scores renormalise over the
    remaining items and no beam is spent on them. A row with one candidate is not asked:
    its renormalised log-prob is 0 whatever the model says (the uniqueness level is mostly
    such rows), and a level where no row has a choice costs no engine call at all.
    """

    def __init__(
        self,
        engine: Engine,
        prompts: Sequence[Prompt],
        trie: SIDTrie,
        layout: TokenLayout,
        beam_width: int,
        exclude: Sequence[Collection[int]] | None = None,
        stats: SearchStats | None = None,
    ) -> None:
        if beam_width < 1:
            raise ValueError("beam_width must be at least 1")
        if not prompts:
            raise ValueError("no prompts")
        if exclude is not None and len(exclude) != len(prompts):
            raise ValueError("exclude needs one collection per prompt")
        self.trie, self.layout, self.beam_width = trie, layout, beam_width
        self.stats = stats if stats is not None else SearchStats()
        self.n_prompts = len(prompts)
        self._blocked = _blocked_keys(trie, exclude or [()] * len(prompts))
        self.session = engine.open(prompts)
        self.level = 0
        self._owner = np.arange(len(prompts))  # prompt index of each live row
        self._nodes = np.zeros(len(prompts), dtype=np.int64)  # trie node of each live row
        self._scores = np.zeros(len(prompts), dtype=np.float64)
        self._paths = np.zeros((len(prompts), 0), dtype=np.int64)  # codes so far, per beam
        self.asked: list[np.ndarray] = []
        self._advance()

    @property
    def done(self) -> bool:
        return self.level >= self.trie.levels

    def _advance(self) -> None:
        """Expands the live rows' children; levels where no row has a choice pass at once."""
        while not self.done:
            self._cands = _allowed_children(self.trie, self._nodes, self._owner, self._blocked)
            rows, codes, _ = self._cands
            if not len(rows):  # every item of every prompt is excluded: no beams at all
                self._owner, self._nodes = self._owner[:0], self._nodes[:0]
                self._scores, self._paths = self._scores[:0], self._paths[:0]
                self.level = self.trie.levels
                return
            bounds = np.searchsorted(rows, np.arange(1, len(self._nodes)))
            self._tokens = np.split(self.layout.token(self.level, codes), bounds)
            self.asked = [t if len(t) > 1 else t[:0] for t in self._tokens]
            if any(len(t) for t in self.asked):
                return
            self._finish_level([np.zeros(len(t)) for t in self._tokens], 0.0)

    def tell(self, answers: Sequence[np.ndarray], seconds: float = 0.0) -> None:
        """The engine's raw log-probs of `asked` (one array per row); `seconds` it took."""
        n_asked = sum(1 for t in self.asked if len(t))
        self.stats.engine_calls += 1
        self.stats.rows_scored.append(n_asked)
        raw = [
            a if len(t) > 1 else np.zeros(len(t))
            for a, t in zip(answers, self._tokens, strict=True)
        ]
        self._finish_level(raw, seconds)
        self._advance()

    def _finish_level(self, raw: Sequence[np.ndarray], seconds: float) -> None:
        rows, codes, nodes = self._cands
        score = self._scores[rows] + _log_normalise(np.concatenate(raw), rows)
        keep = _top_per_owner(self._owner[rows], score, self.beam_width)
        parents = rows[keep]
        self._owner, self._nodes, self._scores = self._owner[parents], nodes[keep], score[keep]
        self._paths = np.concatenate([self._paths[parents], codes[keep, None]], axis=1)
        self.stats.level_seconds.append(seconds)
        if self.level + 1 < self.trie.levels:
            self.session.extend(parents, self.layout.token(self.level, codes[keep]))
        self.level += 1
        self.asked = []

    def results(self) -> list[list[Beam]]:
        """Per prompt, its beams best first (empty when every item was excluded)."""
        if not self.done:
            raise RuntimeError("the search has not finished")
        results: list[list[Beam]] = [[] for _ in range(self.n_prompts)]
        for o, n, s, p in zip(self._owner, self._nodes, self._scores, self._paths, strict=True):
            beam = Beam(
                item=self.trie.item_of(int(n)), sid=tuple(int(c) for c in p), logprob=float(s)
            )
            results[o].append(beam)
        return results


def beam_search(
    engine: Engine,
    prompts: Sequence[Prompt],
    trie: SIDTrie,
    layout: TokenLayout,
    beam_width: int,
    stats: SearchStats | None = None,
    exclude: Sequence[Collection[int]] | None = None,
) -> list[list[Beam]]:
    """One :class:`BeamSearch` over `prompts`, driven to the end on its own."""
    if beam_width < 1:
        raise ValueError("beam_width must be at least 1")
    if not prompts:
        return []
    search = BeamSearch(engine, prompts, trie, layout, beam_width, exclude, stats)
    while not search.done:
        started = time.perf_counter()
        answers = search.session.logprobs(search.asked)
        search.tell(answers, time.perf_counter() - started)
    return search.results()


def search_in_chunks(
    engine: Engine,
    prompts: Sequence[Prompt],
    trie: SIDTrie,
    layout: TokenLayout,
    beam_width: int,
    chunk: int = 256,
    stats: SearchStats | None = None,
) -> list[list[Beam]]:
    """`beam_search` over `chunk` prompts at a time: bounds the KV cache (chunk × beam rows)."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    results: list[list[Beam]] = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        results.extend(beam_search(engine, part, trie, layout, beam_width, stats))
    return results


def _blocked_keys(trie: SIDTrie, exclude: Sequence[Collection[int]]) -> np.ndarray:
    """Sorted `prompt * n_nodes + node` of every node each prompt must not expand: one
    lookup per level for all rows, however many prompts exclude how many items."""
    keys = [p * trie.n_nodes + trie.blocked_nodes(e) for p, e in enumerate(exclude) if e]
    return np.sort(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)


def _allowed_children(
    trie: SIDTrie, nodes: np.ndarray, owner: np.ndarray, blocked: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, code, node id) of every live row's children, grouped by row, minus the nodes
    its prompt may not expand."""
    rows, codes, children = trie.children_batch(nodes)
    if len(blocked) and len(rows):
        keys = owner[rows] * trie.n_nodes + children
        at = np.minimum(np.searchsorted(blocked, keys), len(blocked) - 1)
        keep = blocked[at] != keys
        rows, codes, children = rows[keep], codes[keep], children[keep]
    return rows, codes.astype(np.int64), children


def _log_normalise(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`values` minus the log-sum-exp of its row's values (`rows` grouped, ascending)."""
    if not len(values):
        return values.astype(np.float64)
    values = values.astype(np.float64)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    counts = np.diff(np.r_[starts, len(values)])
    top = np.repeat(np.maximum.reduceat(values, starts), counts)
    total = np.add.reduceat(np.exp(values - top), starts)
    return values - top - np.repeat(np.log(total), counts)


def _top_per_owner(owner: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores within each owner, grouped by owner, best first."""
    order = np.lexsort((-score, owner))
    sorted_owner = owner[order]
    starts = np.searchsorted(sorted_owner, sorted_owner, side="left")
    rank = np.arange(len(order)) - starts
    return order[rank < k]
