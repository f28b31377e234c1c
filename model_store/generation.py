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


def beam_search(
    engine: Engine,
    prompts: Sequence[Prompt],
    trie: SIDTrie,
    layout: TokenLayout,
    beam_width: int,
    stats: SearchStats | None = None,
    exclude: Sequence[Collection[int]] | None = None,
) -> list[list[Beam]]:
    """Top-`beam_width` distinct items per prompt, best first, only ever valid Semantic IDs.

    `exclude[i]` (e.g. what user i already consumed) are items prompt i must not return:
    their branches are cut from the trie for that prompt, so scores renormalise over the
    remaining items and no beam is spent on them.
    """
    if beam_width < 1:
        raise ValueError("beam_width must be at least 1")
    if not prompts:
        return []
    if exclude is not None and len(exclude) != len(prompts):
        raise ValueError("exclude needs one collection per prompt")
    blocked = _blocked_keys(trie, exclude or [()] * len(prompts))
    session = engine.open(prompts)
    owner = np.arange(len(prompts))  # prompt index of each live row
    nodes = np.zeros(len(prompts), dtype=np.int64)  # trie node of each live row
    scores = np.zeros(len(prompts), dtype=np.float64)
    paths = np.zeros((len(prompts), 0), dtype=np.int64)  # codes so far, one row per beam
    for level in range(trie.levels):
        cand_row, cand_code, cand_node = _allowed_children(trie, nodes, owner, blocked)
        bounds = np.searchsorted(cand_row, np.arange(1, len(nodes)))
        tokens = np.split(layout.token(level, cand_code), bounds)
        started = time.perf_counter()
        raw = _score(session, tokens, stats)
        if stats is not None:
            stats.level_seconds.append(time.perf_counter() - started)
        if not len(cand_row):
            return [[] for _ in prompts]  # every item of every prompt is excluded
        cand_score = scores[cand_row] + _log_normalise(np.concatenate(raw), cand_row)
        keep = _top_per_owner(owner[cand_row], cand_score, beam_width)
        parents = cand_row[keep]
        owner, nodes, scores = owner[parents], cand_node[keep], cand_score[keep]
        paths = np.concatenate([paths[parents], cand_code[keep, None]], axis=1)
        if level + 1 < trie.levels:
            session.extend(parents, layout.token(level, cand_code[keep]))
    results: list[list[Beam]] = [[] for _ in prompts]
    for o, n, s, p in zip(owner, nodes, scores, paths, strict=True):
        results[o].append(
            Beam(item=trie.item_of(int(n)), sid=tuple(int(c) for c in p), logprob=float(s))
        )
    return results


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


def _score(
    session: Session, tokens: list[np.ndarray], stats: SearchStats | None
) -> list[np.ndarray]:
    """Raw log-probs of each row's candidates. A row with one candidate is not scored: its
    renormalised log-prob is 0 whatever the model says (the uniqueness level is mostly such
    rows), and a level where no row has a choice costs no engine call at all."""
    asked = [t if len(t) > 1 else t[:0] for t in tokens]
    n_asked = sum(1 for t in asked if len(t))
    answers = session.logprobs(asked) if n_asked else asked
    if stats is not None and n_asked:
        stats.engine_calls += 1
        stats.rows_scored.append(n_asked)
    return [a if len(t) > 1 else np.zeros(len(t)) for a, t in zip(answers, tokens, strict=True)]


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
