"""Ranking of one request's candidates: the reranker's order of the generated items (mixed
with prompt similarity for playlists, led by what the user's words ask for), the
non-generative backfill, and items the user asked for more of. Pure reads of the bundle's
tables; the rules come after."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from model_store.ann import CHUNK
from model_store.catalog import Catalog
from model_store.generation import Beam
from model_store.intent import Intent, IntentReader
from model_store.recommend import Recommender, Scored
from service.rules import Candidate, Taste
from service.schemas import ServedBy
from service.users import UserFacts

ENCODED_WORDS = 4096
"""Distinct texts whose encoder vectors the gateway keeps (1.5 KiB each)."""

INTENT_WEIGHT = 3.0
"""Standardised score added to a candidate with everything the words ask for (a share of it
for part): asked-for items lead the list unless the model thinks little of them."""


@dataclass(frozen=True)
class Words:
    """The user's words, read once per request: their encoder vector and what they ask for."""

    text: str = ""
    query: np.ndarray | None = None
    intent: Intent = field(default_factory=Intent)


class Ranker:
    def __init__(self, core: Recommender, catalog: Catalog) -> None:
        self.core = core
        self.catalog = catalog
        # The same words come back (a surface's suggestion chips, a popular phrase): each
        # encoder pass is ~10 ms of the event loop's time, held against the engine's GIL.
        self._encode = lru_cache(maxsize=ENCODED_WORDS)(self._encode_text)

    def warm(self) -> None:
        """Loads the sentence encoder, the genre prototypes and the release-year order now
        (seconds), not on the first request with words."""
        self.read_words("warm up")
        _ = self._by_year

    @cached_property
    def intents(self) -> IntentReader:
        return IntentReader.from_catalog(
            self.catalog.items_by_genre,
            self.core.table.content,
            creators=self.catalog.creator_names,
            kinds=self.catalog.kind_names,
        )

    def read_words(self, text: str) -> Words:
        """Encodes the words once; the intent comes from them and their vector (the genres
        from the vector of the words that can name one, encoded apart when they differ)."""
        if not text.strip():
            return Words()
        query = self._encode(text)
        rest = self.intents.genre_text(text)
        about = query if rest == " ".join(text.split()) else self._encode(rest) if rest else None
        return Words(text, query, self.intents.read(text, about))

    @staticmethod
    def _encode_text(text: str) -> np.ndarray:
        from model_store.content import encode

        query = np.asarray(encode([text])[0], dtype=np.float32)
        query.flags.writeable = False  # shared by every request with these words
        return query

    def similarity(self, query: np.ndarray) -> np.ndarray:
        """Cosine similarity of every item's content vector to the words' vector."""
        content = self.core.table.content
        out = np.empty(len(content), dtype=np.float64)
        for start in range(0, len(content), CHUNK):  # float16 rows widened a block at a time
            block = np.asarray(content[start : start + CHUNK], dtype=np.float32)
            out[start : start + len(block)] = block @ query
        return out

    def rank(
        self,
        facts: UserFacts,
        beams: list[Beam],
        path: ServedBy,
        words: Words = Words(),
        prompt_weight: float = 0.0,
        k: int = 10,
        leave_out: frozenset[int] = frozenset(),
    ) -> list[Candidate]:
        """Reranker order of the generated items. With a prompt weight, the items closest to
        the user's words (`leave_out` aside) join the pool and the order mixes both; with an
        intent, the best asked-for items join too and lead (standardised scores)."""
        similarity = (
            self.similarity(words.query) if prompt_weight and words.query is not None else None
        )
        have = {b.item for b in beams} | leave_out
        pool = list(beams)
        if similarity is not None:
            close = [int(i) for i in _best(similarity, 3 * k + len(have))]
            pool += [Beam(i, (), float("nan")) for i in close if i not in have][: 2 * k]
        asked = self._asked(facts, words.intent, have | {b.item for b in pool}, 2 * k)
        pool += [Beam(c.item, (), float("nan")) for c in asked]
        if not pool:
            return []
        ranked = self.core.rerank(facts.embedding, facts.history, pool)
        items = [s.item for s in ranked]
        scores = np.array([s.score for s in ranked])
        if similarity is not None or words.intent:
            scores = _z(scores) + INTENT_WEIGHT * self._matches(words.intent, items)
        if similarity is not None:
            scores += prompt_weight * _z(similarity[items])
        beam_rank = {b.item: r for r, b in enumerate(beams)}
        asked_items = {c.item for c in asked}
        out = []
        for r, j in enumerate(np.argsort(-scores, kind="stable")):
            item = items[int(j)]
            if item in beam_rank:
                source = f"{path}: beam #{beam_rank[item] + 1}"
            else:
                source = "asked for" if item in asked_items else "prompt match"
            out.append(Candidate(item, float(scores[j]), f"{source}, ranked #{r + 1}"))
        return out

    def _matches(self, intent: Intent, items: Sequence[int]) -> np.ndarray:
        """Per item, the share of the intent it has (zeros for no intent)."""
        if not intent:
            return np.zeros(len(items))
        c, year = self.catalog, self.core.table.year
        return np.array(
            [intent.match(c.genres[i], float(year[i]), c.creators[i], c.kinds[i]) for i in items]
        )

    def _asked(self, facts: UserFacts, intent: Intent, seen: set[int], n: int) -> list[Candidate]:
        """The best `n` items for the user with everything the intent asks for (drawn from its
        genres and creators, else from its era; a kind alone only reorders)."""
        groups = [self.catalog.items_by_genre.get(g) for g in intent.genres]
        groups += [self.catalog.items_by_creator.get(c) for c in intent.creators]
        if not groups and intent.years:
            groups = [self._released_in(*intent.years)]
        best = self._best_for(facts, self._unseen(groups, seen), 10 * n, "asked for")
        return [c for c in best if self._matches(intent, [c.item])[0] == 1.0][:n]

    @cached_property
    def _by_year(self) -> tuple[np.ndarray, np.ndarray]:
        """Items in release-year order, and their years (unknown years last)."""
        year = np.asarray(self.core.table.year, dtype=np.float32)
        order = np.argsort(year, kind="stable")
        return order, year[order]

    def _released_in(self, first: int, last: int) -> np.ndarray:
        """Items released from `first` to `last` (inclusive): two binary searches, not a
        scan of the catalog."""
        order, years = self._by_year
        lo = int(np.searchsorted(years, first, side="left"))
        hi = int(np.searchsorted(years, last, side="right"))
        return order[lo:hi]

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
        return self._best_for(facts, self._unseen(groups, seen), n, "more of what you asked for")

    @staticmethod
    def _unseen(groups: Sequence[np.ndarray | None], seen: set[int]) -> list[int]:
        """The items of any of `groups` (None: an unknown name) not in `seen`, ascending."""
        found = [g for g in groups if g is not None]
        if not found:
            return []
        every = np.unique(np.concatenate(found))
        return list(every[~np.isin(every, np.fromiter(seen, dtype=np.int64))].tolist())

    def _best_for(self, facts: UserFacts, items: list[int], n: int, why: str) -> list[Candidate]:
        """The `n` of `items` best for the user (by popularity without a user vector)."""
        if not items or n < 1:
            return []
        table = self.core.table
        if facts.embedding is not None:
            vectors = np.asarray(table.vectors[items], dtype=np.float32)
            scores = vectors @ facts.embedding + table.prior[items]
        else:
            scores = table.log_popularity[items]
        best = np.argsort(-scores, kind="stable")[:n]
        return [Candidate(items[j], float(scores[j]), why) for j in best]


def first_of_each(cands: Sequence[Candidate]) -> list[Candidate]:
    """Each item once, where it first appears."""
    seen: set[int] = set()
    out = []
    for c in cands:
        if c.item not in seen:
            seen.add(c.item)
            out.append(c)
    return out


def _best(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores, best first (ties by index), without sorting them all."""
    if n < len(scores):
        head = np.argpartition(-scores, n - 1)[:n]
        return head[np.lexsort((head, -scores[head]))]
    return np.argsort(-scores, kind="stable")


def _z(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / (spread if spread > 1e-9 else 1.0)
