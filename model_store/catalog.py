"""One catalog object per bundle: URI ↔ item index ↔ Semantic ID, titles, genres, creators,
the bundle's users, and the lookups built from them.

Built once when a bundle is loaded, so no request rebuilds an index and no caller reaches
into the bundle's tables for them. From a bundle, every per-item column is a view of
memory-mapped files (`model_store.columns`): a gateway holds no Python object per item,
so a 10M-item catalog costs its pages in the page cache, shared by every process, not
gigabytes of heap per process. Hand-built catalogs (tests) pass plain lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, overload

import numpy as np
import pandas as pd

from model_store.bundle import ITEMS_DIR, Bundle
from model_store.columns import (
    Facet,
    FacetValue,
    FacetValues,
    StringIndex,
    Strings,
    write_facet_codes,
    write_strings,
)


class UnknownItem(LookupError):
    """A request named an item URI the catalog does not hold."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"unknown item {uri!r}")
        self.uri = uri


class ItemColumns:
    """The bundle's per-item files (`items/`), mapped; see `write_items` for the layout."""

    def __init__(self, directory: Path) -> None:
        self.uris = Strings(directory, "uri")
        self.titles = Strings(directory, "title")
        self.kind = Facet(directory, "kind")
        self.creator = Facet(directory, "creator")
        self.genre = Facet(directory, "genre")


@dataclass(frozen=True)
class Catalog:
    """Per-item columns (indexed by item) and per-user facts (indexed by bundle user)."""

    uris: Sequence[str]
    titles: Sequence[str]
    kinds: Sequence[str]
    sids: Sequence[str]  # codes per level, dash-separated
    genres: Sequence[tuple[str, ...]]
    creators: Sequence[str]
    first_code: np.ndarray  # (n,) first Semantic-ID code
    vectors: np.ndarray  # (n, d) user-model item vectors
    user_ids: list[str]
    user_rows: list[dict[str, Any]]  # the bundle's facts per user (age, gender, ...)
    columns: ItemColumns | None = None  # the mapped files behind the columns, if any

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Catalog:
        columns = ItemColumns(bundle.dir / ITEMS_DIR)
        users = bundle.users
        return cls(
            uris=columns.uris,
            titles=columns.titles,
            kinds=FacetValue(columns.kind),
            sids=SidText(bundle.sid_codes),
            genres=FacetValues(columns.genre),
            creators=FacetValue(columns.creator),
            first_code=bundle.sid_codes[:, 0],
            vectors=bundle.item_vectors,
            user_ids=[str(u) for u in users["user_id"]],
            user_rows=[{str(k): v for k, v in row.items()} for row in users.to_dict("records")],
            columns=columns,
        )

    def __len__(self) -> int:
        return len(self.uris)

    @cached_property
    def uri_index(self) -> Mapping[str, int]:
        """URI → item: a binary search over the mapped hash index (a dict for lists)."""
        if self.columns is not None:
            return StringIndex(self.columns.uris)
        return {u: i for i, u in enumerate(self.uris)}

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}

    @cached_property
    def genre_names(self) -> frozenset[str]:
        if self.columns is not None:
            return frozenset(self.columns.genre.names)
        return frozenset(g for gs in self.genres for g in gs)

    @cached_property
    def kind_names(self) -> frozenset[str]:
        """The item kinds present (from the facet's names: no pass over the items)."""
        if self.columns is not None:
            return frozenset(self.columns.kind.names)
        return frozenset(self.kinds)

    @cached_property
    def creator_names(self) -> frozenset[str]:
        """Every creator named by some item ("" aside); ~1 per 8 items on music catalogs."""
        if self.columns is not None:
            return frozenset(self.columns.creator.names)
        return frozenset(c for c in self.creators if c)

    @cached_property
    def items_by_genre(self) -> Mapping[str, np.ndarray]:
        if self.columns is not None:
            return FacetItems(self.columns.genre)
        return _index(self.genres)

    @cached_property
    def items_by_creator(self) -> Mapping[str, np.ndarray]:
        if self.columns is not None:
            return FacetItems(self.columns.creator, skip_empty=True)
        return _index([(c,) if c else () for c in self.creators])

    @cached_property
    def prefix_genre(self) -> dict[int, str]:
        """Each first-level code named by the dominant genre of its catalog items (ties: the
        genre met first, in item order); vectorised over the genre codes of all items."""
        if self.columns is not None:
            facet = self.columns.genre
            codes = np.asarray(facet.codes, dtype=np.int64)
            counts = np.diff(np.asarray(facet.code_offsets, dtype=np.int64))
            names = list(facet.names)
        else:
            lookup: dict[str, int] = {}
            codes = np.array(
                [lookup.setdefault(g, len(lookup)) for gs in self.genres for g in gs],
                dtype=np.int64,
            )
            counts = np.array([len(gs) for gs in self.genres], dtype=np.int64)
            names = list(lookup)
        first = np.asarray(self.first_code, dtype=np.int64)
        return dominant(first, np.repeat(first, counts), codes, names)

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


def dominant(
    first_code: np.ndarray, entry_code: np.ndarray, entry_genre: np.ndarray, names: Sequence[str]
) -> dict[int, str]:
    """Per first-level code, the genre most of its entries carry (ties: the earliest entry);
    codes whose items have no genre are "mixed"."""
    out = {int(c): "mixed" for c in np.unique(first_code)}
    if not len(entry_genre):
        return out
    pair = entry_code * len(names) + entry_genre
    uniq, first_at, count = np.unique(pair, return_index=True, return_counts=True)
    order = np.lexsort((first_at, -count, uniq // len(names)))  # per code: most, then earliest
    code_of = uniq[order] // len(names)
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = code_of[1:] != code_of[:-1]
    for c, g in zip(code_of[keep], uniq[order][keep] % len(names), strict=True):
        out[int(c)] = names[int(g)]
    return out


class FacetItems(Mapping[str, np.ndarray]):
    """name → its items (ascending), read from a facet's inverted files."""

    def __init__(self, facet: Facet, skip_empty: bool = False) -> None:
        self._facet = facet
        self._skip_empty = skip_empty

    def __getitem__(self, name: str) -> np.ndarray:
        items = None if self._skip_empty and not name else self._facet.items_of(name)
        if items is None:
            raise KeyError(name)
        return items

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._facet.names if n or not self._skip_empty)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SidText(Sequence[str]):
    """`sids[i]`: item i's Semantic ID as dash-separated codes, formatted when asked."""

    def __init__(self, codes: np.ndarray) -> None:
        self._codes = codes

    def __len__(self) -> int:
        return len(self._codes)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return "-".join(str(int(c)) for c in self._codes[i])


def _index(keys_per_item: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Key (a genre, a creator) → the items that have it, ascending."""
    items: dict[str, list[int]] = {}
    for item, keys in enumerate(keys_per_item):
        for key in keys:
            items.setdefault(key, []).append(item)
    return {key: np.asarray(v, dtype=np.int64) for key, v in items.items()}


# ------------------------------------------------------------------------------ writing


def facet_codes(per_item: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names in order of first appearance, codes of every item concatenated, codes per item)."""
    counts = np.fromiter((len(v) for v in per_item), dtype=np.int64, count=len(per_item))
    flat = [v for vs in per_item for v in vs]
    codes, names = pd.factorize(pd.Series(flat, dtype=object), sort=False)
    return [str(n) for n in names], np.asarray(codes, dtype=np.int64), counts


def single_codes(values: pd.Series) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One name per item (empty: none), vectorised for catalogs of millions of items."""
    raw_codes, uniques = pd.factorize(values.fillna("").astype(str), sort=False)
    names = [str(n) for n in uniques]
    codes = np.asarray(raw_codes, dtype=np.int64)
    counts = np.ones(len(codes), dtype=np.int64)
    if "" in names:  # "no creator" is no code at all
        empty = names.index("")
        counts[codes == empty] = 0
        codes = codes[codes != empty]
        codes = np.where(codes > empty, codes - 1, codes)
        names.pop(empty)
    return names, codes, counts


Codes = tuple[list[str], np.ndarray, np.ndarray]


def write_items(
    directory: Path,
    *,
    uris: Any,
    titles: Any,
    kinds: Codes,
    creators: Codes,
    genres: Codes,
    year: np.ndarray,
    popularity: np.ndarray,
    sid_tokens: np.ndarray,
) -> None:
    """Writes the per-item files the gateway maps (`items/`). Strings: `uris`, `titles`
    (lists or arrow arrays); facets as `Codes` (see `facet_codes`, `single_codes`)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_strings(directory, "uri", uris, lookup=True)
    write_strings(directory, "title", titles)
    for name, (names, flat, counts) in (("kind", kinds), ("creator", creators), ("genre", genres)):
        write_facet_codes(directory, name, names, flat, counts)
    n = len(popularity)
    popularity = np.asarray(popularity, dtype=np.int64)
    index_dtype = np.int32 if n < 2**31 else np.int64
    np.save(directory / "popularity.npy", popularity)
    order = np.argsort(-popularity, kind="stable").astype(index_dtype)
    np.save(directory / "popular_order.npy", order)
    np.save(directory / "year.npy", np.asarray(year, dtype=np.float32))
    np.save(directory / "sid_tokens.npy", np.asarray(sid_tokens, dtype=np.int32))
    names, flat, counts = genres
    column = np.argsort(np.argsort(np.array(names, dtype=object)))  # code → sorted position
    matrix = np.lib.format.open_memmap(
        directory / "genre_matrix.npy", mode="w+", dtype=np.uint8, shape=(n, len(names))
    )
    item = np.repeat(np.arange(n, dtype=np.int64), counts)
    for start in range(0, len(flat), 1 << 22):
        stop = start + (1 << 22)
        matrix[item[start:stop], column[flat[start:stop]]] = 1
    matrix.flush()
    del matrix
