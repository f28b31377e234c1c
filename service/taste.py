"""Taste profiles: what the system believes about a user, and the user's edits to it.

The profile is derived, never written by hand: facets come from the user's history, their
embedding and the bundle's catalog and Semantic IDs; the summary is composed from the
facets. Edits (`more`, `less`, `forget`) are stored in Redis by URI and genre name, so
they survive new bundles, and carry a revision for optimistic concurrency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_store.catalog import Catalog
from service.rules import Taste
from service.schemas import ItemUri

GENRE = r"^[a-z][a-z0-9'\- ]{0,31}$"


class TasteSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    genres: list[str] = Field(default_factory=list, max_length=50)
    creators: list[str] = Field(default_factory=list, max_length=50)
    items: list[ItemUri] = Field(default_factory=list, max_length=200)

    def merged(self, other: TasteSet) -> TasteSet:
        return TasteSet(
            genres=_union(self.genres, other.genres),
            creators=_union(self.creators, other.creators),
            items=_union(self.items, other.items),
        )

    def without(self, other: TasteSet) -> TasteSet:
        return TasteSet(
            genres=[g for g in self.genres if g not in other.genres],
            creators=[c for c in self.creators if c not in other.creators],
            items=[i for i in self.items if i not in other.items],
        )

    def empty(self) -> bool:
        return not (self.genres or self.creators or self.items)


class TasteEdits(BaseModel):
    """`more`: boost and ask for; `less`: demote and ask against; `forget`: ignore entirely
    (history items are dropped from the prompt and the profile, genres are never shown)."""

    model_config = ConfigDict(extra="forbid")

    more: TasteSet = Field(default_factory=TasteSet)
    less: TasteSet = Field(default_factory=TasteSet)
    forget: TasteSet = Field(default_factory=TasteSet)

    def apply(self, patch: TasteEdits) -> TasteEdits:
        """Adds the patch; a thing named in one list leaves the other two."""
        more = self.more.without(patch.less).without(patch.forget).merged(patch.more)
        less = self.less.without(patch.more).without(patch.forget).merged(patch.less)
        forget = self.forget.without(patch.more).without(patch.less).merged(patch.forget)
        return TasteEdits(more=more, less=less, forget=forget)


class TastePatch(TasteEdits):
    """Edits as a client sends them: a thing named in two lists asks for opposites (more and
    less of it, or more of it and never), so it is refused by name, never stored in both."""

    @model_validator(mode="after")
    def _one_list_per_thing(self) -> TastePatch:
        lists = [(name, getattr(self, name)) for name in TasteEdits.model_fields]
        clashes = [
            f"{kind} {sorted(both)} in both {a} and {b}"
            for (a, one), (b, other) in combinations(lists, 2)
            for kind in TasteSet.model_fields
            if (both := set(getattr(one, kind)) & set(getattr(other, kind)))
        ]
        if clashes:
            raise ValueError(f"contradictory edits: {'; '.join(clashes)}")
        return self


def _union(a: Sequence[str], b: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*a, *b]))


def parse_edits(raw: str | None) -> TasteEdits | None:
    """Stored edits (JSON); None when there are none, or they cannot be read."""
    if not raw:
        return TasteEdits()
    try:
        return TasteEdits.model_validate_json(raw)
    except ValueError:
        return None


def resolve(edits: TasteEdits, catalog: Catalog) -> Taste:
    """The edits as the rules read them: item indices, and genres the catalog knows."""
    return Taste(
        more_genres=catalog.known_genres(edits.more.genres),
        more_creators=frozenset(edits.more.creators),
        more_items=frozenset(catalog.indices(edits.more.items)),
        less_genres=catalog.known_genres(edits.less.genres),
        less_creators=frozenset(edits.less.creators),
        less_items=frozenset(catalog.indices(edits.less.items)),
        forget_genres=catalog.known_genres(edits.forget.genres),
        forget_items=frozenset(catalog.indices(edits.forget.items)),
    )


def prompt_history(history: Sequence[int], edits: TasteEdits, catalog: Catalog) -> list[int]:
    """What the prompt shows of a history: forgotten items and genres out, `more` items in
    (after the history, as if most recent)."""
    shown = _shown(history, edits, catalog)
    more = [i for i in catalog.indices(edits.more.items) if i not in shown]
    return shown + more


def unseen_by_embedding(
    shown: Sequence[int], embedded: Sequence[int], edits: TasteEdits, catalog: Catalog
) -> int:
    """How many of `shown` (a history's `prompt_history`) most recent items the user's
    embedding has not seen, when it was computed from `embedded` (the history's first
    items): the later items shown and the `more` items (where a bundle places the soft
    token, see `model_store.prompts`)."""
    return len(shown) - len(_shown(embedded, edits, catalog))


def _shown(history: Sequence[int], edits: TasteEdits, catalog: Catalog) -> list[int]:
    """The history without forgotten items and genres, in order (a prefix of the history
    gives a prefix of the prompt's)."""
    forgotten = set(catalog.indices(edits.forget.items))
    shown = [int(i) for i in history if int(i) not in forgotten]
    forgotten_genres = set(edits.forget.genres)
    if not forgotten_genres:  # most users: no genre to look up for each item of a long history
        return shown
    return [i for i in shown if not forgotten_genres & set(catalog.genres[i])]


# ---------------------------------------------------------------------------- facets


class Share(BaseModel):
    name: str
    share: float


class ProfileItem(BaseModel):
    uri: str
    title: str


class Neighbourhood(BaseModel):
    prefix: str = Field(description="First Semantic-ID code shared by these items.")
    genre: str = Field(description="The dominant genre of the catalog items with this prefix.")
    share: float = Field(description="Share of the user's items in this neighbourhood.")


class TasteProfile(BaseModel):
    user_id: str
    revision: int
    summary: str
    top_genres: list[Share]
    top_kinds: list[Share]
    top_creators: list[Share]
    representative_items: list[ProfileItem]
    neighbourhoods: list[Neighbourhood]
    recent_items: list[ProfileItem]
    edits: TasteEdits
    degraded: list[str] = Field(default_factory=list, description="Why edits may be missing.")


def _item(catalog: Catalog, i: int) -> ProfileItem:
    return ProfileItem(uri=catalog.uris[i], title=catalog.titles[i])


def _shares(counts: Counter[str], total: int, n: int) -> list[Share]:
    return [Share(name=k, share=round(v / max(total, 1), 3)) for k, v in counts.most_common(n)]


def build_profile(
    user_id: str,
    catalog: Catalog,
    history: Sequence[int],
    embedding: np.ndarray | None,
    edits: TasteEdits,
    revision: int,
) -> TasteProfile:
    """Facets from the history (forgotten items and genres left out) and the embedding."""
    forgot_items = set(edits.forget.items)
    forgot_genres = set(edits.forget.genres)
    items = [int(i) for i in history if catalog.uris[int(i)] not in forgot_items]
    genre_counts: Counter[str] = Counter(
        g for i in items for g in catalog.genres[i] if g not in forgot_genres
    )
    kinds: Counter[str] = Counter(catalog.kinds[i] for i in items)
    creators: Counter[str] = Counter(catalog.creators[i] for i in items if catalog.creators[i])
    codes: Counter[int] = Counter(int(catalog.first_code[i]) for i in items)

    def share(n: int) -> float:
        return round(n / max(len(items), 1), 3)

    newest = list(dict.fromkeys(reversed(items)))  # each item once (a rewatch is one title)
    if embedding is not None and newest:
        scores = catalog.vectors[newest] @ embedding
        representative = [newest[j] for j in np.argsort(-scores, kind="stable")[:5]]
    else:
        representative = newest[:5]
    profile = TasteProfile(
        user_id=user_id,
        revision=revision,
        summary="",
        top_genres=_shares(genre_counts, len(items), 5),
        top_kinds=_shares(kinds, len(items), 3),
        top_creators=_shares(creators, len(items), 5),
        representative_items=[_item(catalog, i) for i in representative],
        neighbourhoods=[
            Neighbourhood(prefix=str(code), genre=catalog.prefix_genre[code], share=share(n))
            for code, n in codes.most_common(5)
        ],
        recent_items=[_item(catalog, i) for i in newest[:5]],
        edits=edits,
    )
    profile.summary = summarise(profile, len(items))
    return profile


def summarise(profile: TasteProfile, n_items: int) -> str:
    """A few sentences composed from the facets (and the edits), for people to read."""
    if not n_items:
        return "No history yet: recommendations follow context and popularity."
    genres = [s.name for s in profile.top_genres[:3]]
    kinds = profile.top_kinds[0].name if profile.top_kinds else "item"
    parts = [f"{n_items} {kinds}s so far, mostly {_listing(genres)}."]
    if profile.representative_items:
        titles = [i.title for i in profile.representative_items[:2]]
        parts.append(f"Most typical: {_listing(titles)}.")
    if profile.recent_items:
        parts.append(f"Lately: {profile.recent_items[0].title}.")
    edits = profile.edits
    if edits.more.genres:
        parts.append(f"Asked for more {_listing(edits.more.genres)}.")
    if edits.less.genres:
        parts.append(f"Asked for less {_listing(edits.less.genres)}.")
    if edits.forget.genres:
        parts.append(f"Never {_listing(edits.forget.genres)}.")
    return " ".join(parts)


def _listing(words: Sequence[str]) -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words) or "nothing in particular"
    return ", ".join(words[:-1]) + " and " + words[-1]
