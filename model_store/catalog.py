"""One catalog object per bundle: URI ↔ item index ↔ Semantic ID, titles, genres, creators,
the bundle's users, and the lookups built from them.

Built once when a bundle is loaded, so no request rebuilds an index and no caller reaches
into the bundle's tables for them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from model_store.bundle import Bundle


class UnknownItem(LookupError):
    """A request named an item URI the catalog does not hold."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"unknown item {uri!r}")
        self.uri = uri


@dataclass(frozen=True)
class Catalog:
    """Per-item columns (indexed by item) and per-user facts (indexed by bundle user)."""

    uris: list[str]
    titles: list[str]
    kinds: list[str]
    sids: list[str]  # codes per level, dash-separated
    genres: list[tuple[str, ...]]
    creators: list[str]
    first_code: np.ndarray  # (n,) first Semantic-ID code
    vectors: np.ndarray  # (n, d) user-model item vectors
    user_ids: list[str]
    user_rows: list[dict[str, Any]]  # the bundle's facts per user (age, gender, ...)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Catalog:
        items, users = bundle.catalog, bundle.users
        return cls(
            uris=items["uri"].tolist(),
            titles=items["title"].tolist(),
            kinds=items["kind"].tolist(),
            sids=["-".join(str(c) for c in sid) for sid in items["sid"]],
            genres=[tuple(g) for g in items["genres"]],
            creators=[str(c) for c in items["creator"]],
            first_code=np.asarray(bundle.sid_codes)[:, 0],
            vectors=bundle.item_vectors,
            user_ids=[str(u) for u in users["user_id"]],
            user_rows=[{str(k): v for k, v in row.items()} for row in users.to_dict("records")],
        )

    def __len__(self) -> int:
        return len(self.uris)

    @cached_property
    def uri_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.uris)}

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}

    @cached_property
    def genre_names(self) -> frozenset[str]:
        return frozenset(g for gs in self.genres for g in gs)

    @cached_property
    def items_by_genre(self) -> dict[str, np.ndarray]:
        return _index(self.genres)

    @cached_property
    def items_by_creator(self) -> dict[str, np.ndarray]:
        return _index([(c,) if c else () for c in self.creators])

    @cached_property
    def prefix_genre(self) -> dict[int, str]:
        """Each first-level code named by the dominant genre of its catalog items."""
        names: dict[int, str] = {}
        for code in np.unique(self.first_code):
            members = np.flatnonzero(self.first_code == code)
            counts = Counter(g for i in members for g in self.genres[i])
            names[int(code)] = counts.most_common(1)[0][0] if counts else "mixed"
        return names

    def item_index(self, uri: str) -> int:
        """The index of `uri`; :class:`UnknownItem` when the catalog lacks it."""
        item = self.uri_index.get(uri)
        if item is None:
            raise UnknownItem(uri)
        return item

    def indices(self, uris: Iterable[str]) -> list[int]:
        """Indices of the URIs the catalog holds (edits may name items of older bundles)."""
        return [i for u in uris if (i := self.uri_index.get(u)) is not None]

    def known_genres(self, names: Iterable[str]) -> frozenset[str]:
        return frozenset(n for n in names if n in self.genre_names)


def _index(keys_per_item: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Key (a genre, a creator) → the items that have it, ascending."""
    items: dict[str, list[int]] = {}
    for item, keys in enumerate(keys_per_item):
        for key in keys:
            items.setdefault(key, []).append(item)
    return {key: np.asarray(v, dtype=np.int64) for key, v in items.items()}
