"""Ranking of one request's candidates: the reranker's order of the generated items (mixed
with prompt similarity for playlists), the non-generative backfill, and items the user asked
for more of. Pure reads of the bundle's tables; the rules come after."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_store.catalog import Catalog
from model_store.generation import Beam
from model_store.recommend import Recommender, Scored
from service.rules import Candidate, Taste
from service.schemas import ServedBy
from service.users import UserFacts


class Ranker:
    def __init__(self, core: Recommender, catalog: Catalog) -> None:
        self.core = core
        self.catalog = catalog

    def warm(self) -> None:
        """Loads the sentence encoder now (seconds), not on the first playlist request."""
        self.prompt_similarity("warm up")

    def prompt_similarity(self, words: str) -> np.ndarray | None:
        """Cosine similarity of every item's content vector to the user's words."""
        if not words.strip():
            return None
        from model_store.content import encode

        query = encode([words])[0]
        return np.asarray(self.core.table.content @ query, dtype=np.float64)

    def rank(
        self,
        facts: UserFacts,
        beams: list[Beam],
        path: ServedBy,
        words: str = "",
        prompt_weight: float = 0.0,
        k: int = 10,
        leave_out: frozenset[int] = frozenset(),
    ) -> list[Candidate]:
        """Reranker order of the generated items; with a prompt weight, the items closest to
        the user's words (`leave_out` aside) join the pool and the order mixes both
        (standardised scores)."""
        similarity = self.prompt_similarity(words) if prompt_weight else None
        pool = list(beams)
        if similarity is not None:
            have = {b.item for b in beams} | leave_out
            close = [int(i) for i in np.argsort(-similarity)[: 3 * k + len(have)]]
            pool += [Beam(i, (), float("nan")) for i in close if i not in have][: 2 * k]
        if not pool:
            return []
        ranked = self.core.rerank(facts.embedding, facts.history, pool)
        beam_rank = {b.item: r for r, b in enumerate(beams)}
        scores = np.array([s.score for s in ranked])
        if similarity is not None:
            sims = similarity[[s.item for s in ranked]]
            scores = _z(scores) + prompt_weight * _z(sims)
        out = []
        for r, j in enumerate(np.argsort(-scores, kind="stable")):
            s = ranked[int(j)]
            source = (
                f"{path}: beam #{beam_rank[s.item] + 1}" if s.item in beam_rank else "prompt match"
            )
            out.append(Candidate(s.item, float(scores[j]), f"{source}, ranked #{r + 1}"))
        return out

    def backfill(
        self, facts: UserFacts, seen: set[int], n: int
    ) -> tuple[ServedBy, list[Candidate]]:
        """The non-generative ranking: ANN over the user vector, else popularity."""
        if facts.embedding is not None:
            found: list[Scored] = self.core.nearest(facts.embedding, seen, n)
            return "ann", [Candidate(s.item, s.score, f"ann #{r + 1}") for r, s in enumerate(found)]
        items = self.core.popular(seen, n)
        return "popularity", [
            Candidate(i, float(-r), f"popularity #{r + 1}") for r, i in enumerate(items)
        ]

    def more_of(self, facts: UserFacts, t: Taste, seen: set[int], n: int) -> list[Candidate]:
        """Up to `n` items of the genres and creators the user asked for more of, best for
        the user first: asking for more of something the model rarely writes still shows it."""
        if not (t.more_genres or t.more_creators) or n < 1:
            return []
        groups = [self.catalog.items_by_genre.get(g) for g in t.more_genres]
        groups += [self.catalog.items_by_creator.get(c) for c in t.more_creators]
        found = [g for g in groups if g is not None]
        if not found:
            return []
        every = np.unique(np.concatenate(found))
        wanted = every[~np.isin(every, np.fromiter(seen, dtype=np.int64))].tolist()
        table = self.core.table
        if facts.embedding is not None:
            scores = table.vectors[wanted] @ facts.embedding + table.prior[wanted]
        else:
            scores = table.log_popularity[wanted]
        best = np.argsort(-scores, kind="stable")[:n]
        return [Candidate(wanted[j], float(scores[j]), "more of what you asked for") for j in best]


def first_of_each(cands: Sequence[Candidate]) -> list[Candidate]:
    """Each item once, where it first appears."""
    seen: set[int] = set()
    out = []
    for c in cands:
        if c.item not in seen:
            seen.add(c.item)
            out.append(c)
    return out


def _z(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / (spread if spread > 1e-9 else 1.0)
