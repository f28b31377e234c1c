"""Per-item columns on disk, read through memory maps: strings, their lookup, and facets.

A catalog of 10M+ items cannot hold a Python object per item in every gateway process
(a `str` alone costs ~60 bytes, a dict entry ~100 more). Each column here is a few flat
files that `np.load(..., mmap_mode="r")` maps without reading:

* a **string column** is one UTF-8 byte blob (`<name>.bin`) and the offsets of each string
  in it (`<name>.offsets.npy`, n + 1 entries);
* its optional **lookup** (`<name>.hash.npy`, `<name>.order.npy`) holds the 64-bit FNV-1a
  hashes of the strings, sorted, and the row of each; a lookup is a binary search whose
  hits are checked against the blob, so a hash collision never returns a wrong row;
* a **facet** (genres, kinds, creators) is a string column of distinct names (with a
  lookup), the name codes of each item (`<name>.codes.npy` and `<name>.code_offsets.npy`,
  several per item allowed) and, inverted, the items of each code (`<name>.items.npy`,
  `<name>.item_offsets.npy`), ascending.

The files are written once by the builder; readers never copy them into memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MASK = (1 << 64) - 1


def fnv1a(data: bytes) -> int:
    """64-bit FNV-1a of one string's bytes: the same value `fnv1a_many` gives it."""
    h = int(_FNV_OFFSET)
    for byte in data:
        h = ((h ^ byte) * int(_FNV_PRIME)) & _MASK
    return h


def fnv1a_many(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """FNV-1a of every string of a column at once: one vectorised pass per byte position
    (strings are short), so hashing 10M URIs takes seconds, not a Python loop per item."""
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    hashes = np.full(len(starts), _FNV_OFFSET, dtype=np.uint64)
    live = np.arange(len(starts))
    for position in range(int(lengths.max()) if len(lengths) else 0):
        live = live[lengths[live] > position]
        byte = blob[starts[live] + position].astype(np.uint64)
        with np.errstate(over="ignore"):
            hashes[live] = (hashes[live] ^ byte) * _FNV_PRIME
    return hashes


def _load(path: Path) -> np.ndarray:
    return mapped(np.load(path, mmap_mode="r", allow_pickle=False))


def mapped(array: np.ndarray) -> np.ndarray:
    """A memory map as a plain read-only ndarray over the same pages. Indexing a
    ``np.memmap`` makes a new memmap object each time (``__array_finalize__`` in Python):
    a third of the gateway's own time under load went there."""
    return array.view(np.ndarray)


def _blob(path: Path) -> np.ndarray:
    """The bytes of `path` mapped read-only (an empty file cannot be mapped)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return mapped(np.memmap(path, dtype=np.uint8, mode="r"))


def _offsets_dtype(total: int) -> type[np.integer]:
    return np.uint32 if total <= np.iinfo(np.uint32).max else np.int64


def write_strings(
    directory: Path, name: str, values: Iterable[str] | pa.Array, lookup: bool = False
) -> None:
    """Writes a string column (and, with `lookup`, its hash index) as `name`.* files.

    `values` may be an arrow string array: its buffers are written as they are, with no
    Python string per row (how a 10M-item catalog is written in seconds)."""
    arr = _large_strings(values)
    raw = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    blob = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    blob = blob[int(raw[0]) : int(raw[-1])]
    offsets = (raw - raw[0]).astype(_offsets_dtype(int(raw[-1] - raw[0])))
    blob.tofile(directory / f"{name}.bin")
    np.save(directory / f"{name}.offsets.npy", offsets)
    if lookup:
        write_lookup(directory, name, fnv1a_many(blob, offsets))


def _large_strings(values: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(list(values), type=pa.large_string())
    return pc.fill_null(values.cast(pa.large_string()), "")


def write_lookup(directory: Path, name: str, hashes: np.ndarray) -> None:
    order = np.argsort(hashes, kind="stable")
    np.save(directory / f"{name}.hash.npy", hashes[order])
    np.save(directory / f"{name}.order.npy", order.astype(_offsets_dtype(len(order))))


def lookup_files(name: str) -> list[str]:
    return [f"{name}.hash.npy", f"{name}.order.npy"]


def string_files(name: str, lookup: bool = False) -> list[str]:
    return [f"{name}.bin", f"{name}.offsets.npy", *(lookup_files(name) if lookup else [])]


class Strings(Sequence[str]):
    """A read-only string column: `column[i]` decodes one string from the mapped blob."""

    def __init__(self, directory: Path, name: str) -> None:
        self._blob = _blob(directory / f"{name}.bin")
        self._offsets = _load(directory / f"{name}.offsets.npy")
        self._n = len(self._offsets) - 1
        hashes = directory / f"{name}.hash.npy"
        self._hashes = _load(hashes) if hashes.is_file() else None
        self._order = _load(directory / f"{name}.order.npy") if hashes.is_file() else None

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} out of range [0, {self._n})")
        return self.raw(i).decode("utf-8")

    def raw(self, i: int) -> bytes:
        return self._blob[int(self._offsets[i]) : int(self._offsets[i + 1])].tobytes()

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(self._n))

    def find(self, value: str) -> int | None:
        """The row holding `value` (the first, if repeated), or None; needs the lookup."""
        if self._hashes is None or self._order is None:
            raise ValueError("this column was written without a lookup")
        data = value.encode("utf-8")
        h = np.uint64(fnv1a(data))
        lo = int(np.searchsorted(self._hashes, h, side="left"))
        hi = int(np.searchsorted(self._hashes, h, side="right"))
        rows = sorted(int(r) for r in self._order[lo:hi])  # several only on a collision
        return next((r for r in rows if self.raw(r) == data), None)


class StringIndex(Mapping[str, int]):
    """`uri → row` as a mapping over a string column's lookup: no dict in memory."""

    def __init__(self, column: Strings) -> None:
        self._column = column

    def __getitem__(self, key: str) -> int:
        row = self._column.find(key) if isinstance(key, str) else None
        if row is None:
            raise KeyError(key)
        return row

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._column.find(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._column)

    def __len__(self) -> int:
        return len(self._column)


def write_facet(directory: Path, name: str, per_item: Sequence[Sequence[str]]) -> None:
    """Writes a facet: names in order of first appearance, codes per item, items per code."""
    codes_of: dict[str, int] = {}
    counts = np.fromiter((len(v) for v in per_item), dtype=np.int64, count=len(per_item))
    flat = np.fromiter(
        (codes_of.setdefault(v, len(codes_of)) for vs in per_item for v in vs),
        dtype=np.int64,
        count=int(counts.sum()),
    )
    write_facet_codes(directory, name, list(codes_of), flat, counts)


def write_facet_codes(
    directory: Path, name: str, names: Sequence[str], flat: np.ndarray, counts: np.ndarray
) -> None:
    """Writes a facet from its names and the codes of each item (`counts[i]` codes of item
    i, concatenated in `flat`): the vectorised form for catalogs of millions of items."""
    write_strings(directory, f"{name}.names", names, lookup=True)
    code_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=code_offsets[1:])
    code_dtype = _offsets_dtype(max(len(names), 1))
    np.save(directory / f"{name}.codes.npy", flat.astype(code_dtype))
    np.save(directory / f"{name}.code_offsets.npy", code_offsets.astype(_offsets_dtype(len(flat))))
    item = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    order = np.argsort(flat, kind="stable")  # items ascending within each code
    item_offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=len(names)), out=item_offsets[1:])
    np.save(directory / f"{name}.items.npy", item[order].astype(_offsets_dtype(len(counts))))
    np.save(directory / f"{name}.item_offsets.npy", item_offsets.astype(_offsets_dtype(len(flat))))


def facet_files(name: str) -> list[str]:
    return [
        *string_files(f"{name}.names", lookup=True),
        f"{name}.codes.npy",
        f"{name}.code_offsets.npy",
        f"{name}.items.npy",
        f"{name}.item_offsets.npy",
    ]


class Facet:
    """A categorical column read from its files: codes per item and items per name."""

    def __init__(self, directory: Path, name: str) -> None:
        self.names = Strings(directory, f"{name}.names")
        self.codes = _load(directory / f"{name}.codes.npy")
        self.code_offsets = _load(directory / f"{name}.code_offsets.npy")
        self._items = _load(directory / f"{name}.items.npy")
        self._item_offsets = _load(directory / f"{name}.item_offsets.npy")
        self._name_list = list(self.names) if len(self.names) <= 4096 else None

    def __len__(self) -> int:
        return len(self.code_offsets) - 1

    def codes_of(self, item: int) -> np.ndarray:
        return self.codes[int(self.code_offsets[item]) : int(self.code_offsets[item + 1])]

    def names_of(self, item: int) -> tuple[str, ...]:
        name = self.name
        return tuple(name(c) for c in self.codes_of(item).tolist())

    def name(self, code: int) -> str:
        return self._name_list[code] if self._name_list is not None else self.names[code]

    def items_of(self, name: str) -> np.ndarray | None:
        """Items that have `name`, ascending (a view of the mapped file), or None."""
        code = self.names.find(name)
        if code is None:
            return None
        lo, hi = int(self._item_offsets[code]), int(self._item_offsets[code + 1])
        return np.asarray(self._items[lo:hi], dtype=np.int64)


class FacetValues(Sequence[tuple[str, ...]]):
    """`values[i]`: the names item i has, as a tuple (genres)."""

    def __init__(self, facet: Facet) -> None:
        self._facet = facet

    def __len__(self) -> int:
        return len(self._facet)

    @overload
    def __getitem__(self, i: int) -> tuple[str, ...]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[str, ...]]: ...
    def __getitem__(self, i: int | slice) -> tuple[str, ...] | list[tuple[str, ...]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._facet.names_of(_row(i, len(self)))


class FacetValue(Sequence[str]):
    """`values[i]`: the one name item i has, or "" when it has none (creators, kinds)."""

    def __init__(self, facet: Facet) -> None:
        self._facet = facet

    def __len__(self) -> int:
        return len(self._facet)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        codes = self._facet.codes_of(_row(i, len(self)))
        return self._facet.name(int(codes[0])) if len(codes) else ""


def _row(i: int, n: int) -> int:
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"row {i} out of range [0, {n})")
    return int(i)
