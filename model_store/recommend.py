"""One recommendation core over a bundle: prompts, constrained generation, reranking, and
the non-generative paths (ANN over the user model, popularity).

The offline evaluation and the online gateway both call this object, so what is
measured is what is served.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from model_store.ann import ItemSearch
from model_store.bundle import Bundle
from model_store.generation import (
    Beam,
    BeamSearch,
    Engine,
    Prompt,
    SearchStats,
    beam_search,
)
from model_store.prompts import Mode, prompt_ids
from model_store.reranker import ItemTable, candidate_features, rerank
from model_store.user_model import retrieval_query
from model_store.vocab import USER


@dataclass(frozen=True)
class Scored:
    item: int
    score: float


def genre_matrix(genres: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    names = sorted({g for gs in genres for g in gs})
    column = {g: i for i, g in enumerate(names)}
    matrix = np.zeros((len(genres), len(names)), dtype=np.float32)
    for row, gs in enumerate(genres):
        matrix[row, [column[g] for g in gs]] = 1.0
    return matrix, names


def unseen(items: Iterable[int], seen: set[int], k: int) -> list[int]:
    """The first k items not in `seen` (the 'no repeats' rule and the protocol's exclusion)."""
    out = []
    for item in items:
        if item not in seen:
            out.append(item)
            if len(out) == k:
                break
    return out


PROMPT_ALIGN = 32
"""vLLM's KV-cache block on CPU: prompts of a whole number of blocks are fully prefix-cached."""


def aligned_history(head: int, items: int, sid_len: int, block: int) -> int:
    """How many of the `items` most recent history items to write so that the prompt
    (`head` tokens, then `sid_len` tokens per item) ends on a `block` boundary, or as
    close to one as dropping at most `block // sid_len - 1` of the oldest items allows.

    The engine caches whole blocks of the prompt once and every beam row then recomputes
    only the last partial block and its own new tokens: an aligned prompt makes each of the
    beam rows compute 1-3 tokens instead of up to `block` (about a quarter less search time
    on a CPU; the oldest items dropped cost ~2% HR@30, see BENCHMARKS.md).
    """
    if block <= 0 or items <= 0:
        return max(items, 0)
    lowest = items - max(1, block // sid_len) + 1
    # trimming only pays when at least one whole block remains to be cached
    choices = [n for n in range(max(lowest, 0), items + 1) if head + n * sid_len >= block]
    return min(choices or [items], key=lambda n: ((head + n * sid_len) % block, -n))


def item_table(bundle: Bundle) -> ItemTable:
    """The reranker's per-item arrays, mapped from the bundle (only log-popularity is
    computed, as float32 the way the features always had it: 4 bytes per item)."""
    return ItemTable(
        vectors=bundle.item_vectors,
        content=bundle.content_vectors,
        genres=bundle.item_array("genre_matrix"),
        log_popularity=np.log1p(bundle.item_array("popularity").astype(np.float64)).astype(
            np.float32
        ),
        year=bundle.item_array("year"),
        prior=bundle.retrieval_vectors[:, -1],
        graph=bundle.item_graph,
    )


class Recommender:
    def __init__(
        self, bundle: Bundle, with_reranker: bool = True, align: int = PROMPT_ALIGN
    ) -> None:
        """`align`: trim history so prompts end on this many tokens (0: never trim)."""
        self.bundle = bundle
        self.align = align
        self.genre_names = sorted(bundle.item_facet_names("genre"))
        self.table = item_table(bundle)
        self.popular_order = bundle.item_array("popular_order")
        self.search = ItemSearch.load(bundle.retrieval_vectors, bundle.dir)
        self.vocab = bundle.vocab
        self.layout = self.vocab.layout
        self.item_sid_ids = bundle.item_sid_ids
        self.sid_len = int(self.item_sid_ids.shape[1])
        self.projector = bundle.projector
        self.reranker = bundle.reranker if with_reranker else None
        self.n_items = len(self.popular_order)

    def prompt(
        self,
        mode: Mode,
        history: Sequence[int],
        user: np.ndarray | None,
        context: Sequence[str] | None,
        ask: str | Sequence[str] = (),
        less: Sequence[str] = (),
        newer: int = 0,
    ) -> Prompt:
        """The prompt for one request; the soft token only when the mode and a vector allow.
        `newer`: how many of the most recent history items the user vector has not seen
        (logged after it was computed); a bundle whose soft token stands "now" writes it
        before them."""
        soft = None
        if mode.soft and user is not None and np.any(user):
            soft = self.projector.project(user)
        recent = list(history)[-mode.history :] if mode.history else []

        def ids_of(items: Sequence[int]) -> list[int]:
            return prompt_ids(
                self.vocab,
                self.item_sid_ids,
                items,
                n_soft=0 if soft is None else len(soft),
                context=context if mode.context else None,
                ask=ask,
                less=less,
                soft_at=self.projector.soft_at,
                newer=newer,
            )

        kept = aligned_history(len(ids_of([])), len(recent), self.sid_len, self.align)
        ids = ids_of(recent[len(recent) - kept :])  # without the oldest items
        return Prompt(tuple(ids), soft, self.vocab.id(USER))

    def generate(
        self,
        engine: Engine,
        prompts: Sequence[Prompt],
        beam_width: int,
        stats: SearchStats | None = None,
        exclude: Sequence[Collection[int]] | None = None,
    ) -> list[list[Beam]]:
        """Top items per prompt; `exclude[i]` (e.g. consumed items) are never generated."""
        return beam_search(
            engine, prompts, self.bundle.trie, self.layout, beam_width, stats, exclude
        )

    def start_search(
        self,
        engine: Engine,
        prompts: Sequence[Prompt],
        beam_width: int,
        exclude: Sequence[Collection[int]],
    ) -> BeamSearch:
        """`generate` as a search the caller steps (with others, in one engine step)."""
        return BeamSearch(engine, prompts, self.bundle.trie, self.layout, beam_width, exclude)

    def rerank(
        self, user: np.ndarray | None, history: Sequence[int], beams: Sequence[Beam]
    ) -> list[Scored]:
        if not beams:
            return []
        if self.reranker is None:
            return [Scored(b.item, b.logprob) for b in beams]
        x = candidate_features(
            self.table, user, history, [b.item for b in beams], [b.logprob for b in beams]
        )
        order, scores = rerank(self.reranker, x)
        return [Scored(beams[i].item, float(scores[i])) for i in order]

    def popular(self, seen: set[int], k: int) -> list[int]:
        """The k most popular unseen items (reads only the head of the mapped order)."""
        head = self.popular_order[: k + len(seen)]
        return unseen((int(i) for i in head), seen, k)

    def nearest(self, user: np.ndarray, seen: set[int], k: int) -> list[Scored]:
        """Items closest to the user vector (the ANN fallback), unseen ones only."""
        query = retrieval_query(user)
        items, scores = self.search.search(query, min(self.n_items, k + len(seen)))
        pairs = zip(items.tolist(), scores.tolist(), strict=True)
        return [Scored(i, s) for i, s in pairs if i not in seen][:k]
