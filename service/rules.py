"""Business rules applied after reranking: each one a small pure function.

A rule takes the ranked candidates and the request's facts and returns the candidates it
keeps, in order. Filters drop items; the diversity rule demotes (moves behind the others)
items that would exceed a per-genre or per-creator cap, and says so in `why`.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Candidate:
    item: int
    score: float
    why: str


@dataclass(frozen=True)
class ItemFacts:
    """Per-item facts the rules read, indexed by item."""

    genres: Sequence[tuple[str, ...]]
    creators: Sequence[str]
    markets: list[frozenset[str] | None]  # None: available everywhere
    min_age: np.ndarray  # (n,) int


@dataclass(frozen=True)
class Taste:
    """A user's taste-profile edits, resolved to item indices."""

    more_genres: frozenset[str] = frozenset()
    more_creators: frozenset[str] = frozenset()
    more_items: frozenset[int] = frozenset()
    less_genres: frozenset[str] = frozenset()
    less_creators: frozenset[str] = frozenset()
    less_items: frozenset[int] = frozenset()
    forget_genres: frozenset[str] = frozenset()
    forget_items: frozenset[int] = frozenset()


@dataclass(frozen=True)
class RuleInput:
    """What the rules know about one request."""

    seen: frozenset[int] = frozenset()
    excluded: frozenset[int] = frozenset()
    market: str | None = None
    age: int | None = None
    k: int = 10
    genre_cap: int = 4
    creator_cap: int = 2
    taste: Taste = Taste()
    asked_genres: frozenset[str] = frozenset()  # named by the user: exempt from the genre cap
    disliked: frozenset[int] = frozenset()  # listening events: never again
    skipped: frozenset[int] = frozenset()  # listening events: demoted


Rule = Callable[[Sequence[Candidate], RuleInput, ItemFacts], list[Candidate]]


def no_repeats(cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts) -> list[Candidate]:
    """Nothing the user already consumed."""
    return [c for c in cands if c.item not in req.seen]


def exclude(cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts) -> list[Candidate]:
    """Nothing the caller asked to leave out."""
    return [c for c in cands if c.item not in req.excluded]


def availability(cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts) -> list[Candidate]:
    """Only items licensed in the request's market (items without a list: everywhere)."""
    if req.market is None:
        return [c for c in cands if facts.markets[c.item] is None]
    market = req.market.upper()
    return [c for c in cands if (m := facts.markets[c.item]) is None or market in m]


def age(cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts) -> list[Candidate]:
    """Only items rated for the user's age; an unknown age counts as a minor's."""
    user_age = req.age if req.age is not None and req.age > 0 else 0
    return [c for c in cands if int(facts.min_age[c.item]) <= user_age]


def _matches(item: int, facts: ItemFacts, genres: frozenset[str], creators: frozenset[str],
             items: frozenset[int]) -> str | None:  # fmt: skip
    """What in the sets `item` matches (for `why`), or None."""
    if item in items:
        return "this item"
    if genres:  # an empty set needs no lookup (most users edit nothing)
        hit = next((g for g in facts.genres[item] if g in genres), None)
        if hit is not None:
            return hit
    if not creators:
        return None
    creator = facts.creators[item]
    return creator if creator and creator in creators else None


def taste(cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts) -> list[Candidate]:
    """The user's edits: `forget` drops, `more` moves ahead, `less` moves behind."""
    t = req.taste
    ahead: list[Candidate] = []
    middle: list[Candidate] = []
    behind: list[Candidate] = []
    for c in cands:
        if c.item in t.forget_items or (
            t.forget_genres and any(g in t.forget_genres for g in facts.genres[c.item])
        ):
            continue
        if why := _matches(c.item, facts, t.less_genres, t.less_creators, t.less_items):
            behind.append(replace(c, why=f"{c.why}; demoted: less {why}"))
        elif why := _matches(c.item, facts, t.more_genres, t.more_creators, t.more_items):
            ahead.append(replace(c, why=f"{c.why}; boosted: more {why}"))
        else:
            middle.append(c)
    return ahead + middle + behind


def feedback(cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts) -> list[Candidate]:
    """Listening events: a disliked item never comes back, a skipped one moves behind."""
    kept = [c for c in cands if c.item not in req.disliked]
    ahead = [c for c in kept if c.item not in req.skipped]
    behind = [replace(c, why=f"{c.why}; demoted: skipped") for c in kept if c.item in req.skipped]
    return ahead + behind


def diversity(cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts) -> list[Candidate]:
    """At most `genre_cap` items per genre and `creator_cap` per creator in the top k;
    items over a cap move behind the others instead of disappearing. Genres the user asked
    for (in their words or their `more` edits) are not capped."""
    genre_count: Counter[str] = Counter()
    creator_count: Counter[str] = Counter()
    kept: list[Candidate] = []
    demoted: list[Candidate] = []
    uncapped = req.asked_genres | req.taste.more_genres
    for c in cands:
        genres = [g for g in facts.genres[c.item] if g not in uncapped]
        creator = facts.creators[c.item]
        over_genre = [g for g in genres if genre_count[g] >= req.genre_cap]
        over_creator = bool(creator) and creator_count[creator] >= req.creator_cap
        if len(kept) < req.k and (over_genre or over_creator):
            reason = f"genre cap ({over_genre[0]})" if over_genre else f"creator cap ({creator})"
            demoted.append(replace(c, why=f"{c.why}; demoted by {reason}"))
            continue
        kept.append(c)
        genre_count.update(genres)
        if creator:
            creator_count[creator] += 1
    return kept + demoted


@dataclass(frozen=True)
class RuleSpec:
    """A rule and, for filters, the items it would drop whatever the ranking: those are cut
    from the search itself, so no beam is spent on an item the rule would drop."""

    name: str
    apply: Rule
    cuts: Callable[[RuleInput], frozenset[int]] | None = None


REGISTRY: dict[str, RuleSpec] = {
    spec.name: spec
    for spec in (
        RuleSpec("no_repeats", no_repeats, cuts=lambda req: req.seen),
        RuleSpec("exclude", exclude, cuts=lambda req: req.excluded),
        RuleSpec("availability", availability),
        RuleSpec("age", age),
        RuleSpec("taste", taste, cuts=lambda req: req.taste.forget_items),
        RuleSpec("feedback", feedback, cuts=lambda req: req.disliked),
        RuleSpec("diversity", diversity),
    )
}
RULE_NAMES = tuple(REGISTRY)
"""Every rule, in the order they run by default; `GENREC_RULES` may list a subset."""


class Rules:
    """The configured rules, in order."""

    def __init__(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {list(REGISTRY)}")
        self.specs = [REGISTRY[n] for n in names]

    def cut_from_search(self, req: RuleInput) -> frozenset[int]:
        """Items no answer may hold, known before the search."""
        cut: set[int] = set()
        for spec in self.specs:
            if spec.cuts is not None:
                cut |= spec.cuts(req)
        return frozenset(cut)

    def apply(
        self, cands: Sequence[Candidate], req: RuleInput, facts: ItemFacts
    ) -> list[Candidate]:
        out = list(cands)
        for spec in self.specs:
            out = spec.apply(out, req, facts)
        return out


def load_availability(
    path: Path | None, uri_index: Mapping[str, int], n_items: int
) -> tuple[list[frozenset[str] | None], np.ndarray]:
    """Markets and minimum ages from a CSV with columns `uri,markets,min_age`.

    `markets` is `|`-separated country codes or `*`; items not in the file are available
    everywhere to everyone. Unknown URIs are an error: a licensing file that names items the
    bundle lacks is probably for another catalog.
    """
    markets: list[frozenset[str] | None] = [None] * n_items
    min_age = np.zeros(n_items, dtype=np.int64)
    if path is None:
        return markets, min_age
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"uri", "markets", "min_age"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            item = uri_index.get(row["uri"])
            if item is None:
                raise ValueError(f"{path}:{line}: unknown item {row['uri']!r}")
            spec = row["markets"].strip()
            markets[item] = (
                None
                if spec in ("", "*")
                else frozenset(m.strip().upper() for m in spec.split("|") if m.strip())
            )
            try:
                min_age[item] = int(row["min_age"] or 0)
            except ValueError as e:
                raise ValueError(
                    f"{path}:{line}: min_age {row['min_age']!r} is not a number"
                ) from e
    return markets, min_age
