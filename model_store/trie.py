"""Semantic-ID prefix trie stored as a handful of flat numpy arrays.

The constrained decoder asks "which codes may follow this prefix?" once per beam row and
level, for catalogues of up to ~100M items, so the trie holds no per-node Python objects.
Nodes are numbered breadth first over the lexicographically sorted Semantic IDs:

* node 0 is the root; the nodes of depth d occupy ``level_start[d]:level_start[d + 1]``;
* within a depth, nodes are in lexicographic order of their prefixes, so the children of
  an internal node ``n`` are the contiguous ids ``offsets[n]:offsets[n + 1]`` and their
  codes ``child_code[offsets[n]:offsets[n + 1]]`` are sorted ascending;
* the nodes of depth L are the leaves, one per item, and ``leaf_item[n - level_start[L]]``
  is the item a leaf names.

Memory is one ``child_code`` entry per node (uint8 for codes < 256), one ``offsets`` entry
per internal node (uint32 below 2^32 nodes) and one ``leaf_item`` entry per item (int32
below 2^31 items): about 5 + 5 * (nodes at depth L-1) / items bytes per item.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

_FORMAT_VERSION = 1


def _code_dtype(max_code: int) -> np.dtype:
    """Smallest unsigned dtype for the codes: uint8 for the usual 256-code codebooks."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_code <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"code {max_code} does not fit in 64 bits")


def _index_dtype(limit: int, small: type[np.integer]) -> np.dtype:
    """`small` when every value below `limit` fits in it, else int64."""
    return np.dtype(small) if limit <= np.iinfo(small).max else np.dtype(np.int64)


def _frozen(a: np.ndarray) -> np.ndarray:
    """Contiguous read-only copy-if-needed, so views handed to callers cannot corrupt the trie."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _lex_order(codes: np.ndarray) -> np.ndarray:
    """Row order sorting `codes` lexicographically; packs rows into one uint64 key if possible.

    One argsort of a packed key is ~3x faster than `np.lexsort` over L columns.
    """
    n, levels = codes.shape
    maxima = codes.max(axis=0) if n else np.zeros(levels, dtype=np.int64)
    bits = [max(1, int(m).bit_length()) for m in maxima]
    if sum(bits) <= 64:
        key = np.zeros(n, dtype=np.uint64)
        for level in range(levels):
            key <<= np.uint64(bits[level])
            key |= codes[:, level].astype(np.uint64)
        return np.argsort(key, kind="stable")
    return np.lexsort(codes.T[::-1])


class SIDTrie:
    """Prefix trie over the distinct Semantic IDs of a catalogue; row i of `build` is item i."""

    levels: int

    def __init__(
        self,
        levels: int,
        level_start: np.ndarray,
        offsets: np.ndarray,
        child_code: np.ndarray,
        leaf_item: np.ndarray,
    ) -> None:
        if levels < 1:
            raise ValueError("levels must be at least 1")
        if level_start.shape != (levels + 2,):
            raise ValueError("level_start must have levels + 2 entries")
        n_nodes = int(level_start[-1])
        n_internal = int(level_start[levels])
        if offsets.shape != (n_internal + 1,) or child_code.shape != (n_nodes,):
            raise ValueError("inconsistent trie arrays")
        if leaf_item.shape != (n_nodes - n_internal,):
            raise ValueError("inconsistent trie arrays")
        self.levels = levels
        self._level_start = _frozen(level_start.astype(np.int64))
        self._offsets = _frozen(offsets)
        self._child_code = _frozen(child_code)
        self._leaf_item = _frozen(leaf_item)
        self._n_nodes = n_nodes
        self._n_internal = n_internal
        # memoryviews index to plain Python ints several times faster than numpy scalars,
        # which is what the per-row hot path (children, lookup) needs.
        self._offsets_mv = self._offsets.data
        self._code_mv = self._child_code.data
        self._max_code = int(np.iinfo(self._child_code.dtype).max)
        self._empty_codes = _frozen(np.zeros(0, dtype=self._child_code.dtype))
        self._empty_nodes = _frozen(np.zeros(0, dtype=np.int64))

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, codes: np.ndarray) -> SIDTrie:
        """Trie of the rows of `codes` (n_items, L); vectorised, no per-item Python work."""
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[1] < 1:
            raise ValueError(f"codes must have shape (n_items, levels >= 1), got {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {arr.dtype}")
        n, levels = arr.shape
        if n and int(arr.min()) < 0:
            raise ValueError("codes must be non-negative")
        if n >= np.iinfo(np.int64).max // 2:
            raise ValueError("too many items")
        max_code = int(arr.max()) if n else 0

        order = _lex_order(arr)
        # new[i]: sorted row i starts a new prefix of the current length.
        new = np.zeros(n, dtype=bool)
        if n:
            new[0] = True
        level_sizes: list[int] = []
        level_codes: list[np.ndarray] = []
        first_child: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # root's first child
        prev_starts = np.zeros(min(n, 1), dtype=np.int64)  # row starts of depth-d nodes
        for level in range(levels):
            col = arr[order, level]
            new[1:] |= col[1:] != col[:-1]
            starts = np.flatnonzero(new)
            level_sizes.append(len(starts))
            level_codes.append(col[starts].astype(_code_dtype(max_code)))
            if level > 0:
                # prev_starts is a subset of starts, so searchsorted gives the exact rank
                # of each depth-`level` node's first child among the depth-`level+1` nodes.
                first_child.append(np.searchsorted(starts, prev_starts))
            prev_starts = starts
            del col
        if level_sizes[-1] != n:
            raise ValueError(f"duplicate Semantic IDs: {n - level_sizes[-1]} repeated rows")

        level_start = np.zeros(levels + 2, dtype=np.int64)
        level_start[1:] = 1 + np.cumsum([0, *level_sizes])
        n_nodes = int(level_start[-1])
        n_internal = int(level_start[levels])
        off_dtype = _index_dtype(n_nodes, np.uint32)
        offsets = np.empty(n_internal + 1, dtype=off_dtype)
        # first_child[d] ranks are relative to depth d+1, whose ids start at level_start[d+1].
        for depth, ranks in enumerate(first_child):
            lo = int(level_start[depth])
            offsets[lo : lo + len(ranks)] = ranks + level_start[depth + 1]
        offsets[n_internal] = n_nodes
        child_code = np.zeros(n_nodes, dtype=_code_dtype(max_code))
        for depth, node_codes in enumerate(level_codes, start=1):
            child_code[level_start[depth] : level_start[depth + 1]] = node_codes
        leaf_item = order.astype(_index_dtype(max(n - 1, 0), np.int32))
        return cls(levels, level_start, offsets, child_code, leaf_item)

    # ------------------------------------------------------------------ queries
    @property
    def n_nodes(self) -> int:
        return self._n_nodes

    @property
    def n_items(self) -> int:
        return self._n_nodes - self._n_internal

    @property
    def nbytes(self) -> int:
        """Bytes held by the trie's arrays (what a 100M-item catalogue costs in RAM)."""
        arrays = (self._level_start, self._offsets, self._child_code, self._leaf_item)
        return int(sum(a.nbytes for a in arrays))

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes ascending, node ids) of `node`'s children; views, O(1) apart from slicing."""
        if 0 <= node < self._n_internal:
            lo = self._offsets_mv[node]
            hi = self._offsets_mv[node + 1]
            return self._child_code[lo:hi], np.arange(lo, hi)  # int64 (numpy 2 default)
        if 0 <= node < self._n_nodes:
            return self._empty_codes, self._empty_nodes
        raise IndexError(f"node {node} out of range [0, {self._n_nodes})")

    def children_batch(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row of `nodes` each child belongs to, child codes, child node ids), all children.

        Children come grouped by row in row order, codes ascending within a row: the layout a
        batched beam step scores in one go.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        if nodes.ndim != 1:
            raise ValueError("nodes must be one-dimensional")
        if nodes.size and (int(nodes.min()) < 0 or int(nodes.max()) >= self._n_nodes):
            raise IndexError(f"node ids must lie in [0, {self._n_nodes})")
        internal = nodes < self._n_internal
        safe = np.where(internal, nodes, 0)
        lo = self._offsets[safe].astype(np.int64)
        counts = np.where(internal, self._offsets[safe + 1].astype(np.int64) - lo, 0)
        rows = np.repeat(np.arange(len(nodes), dtype=np.int64), counts)
        total = int(counts.sum())
        # child j of the flat output sits at offset (j - start of its row) from its row's lo.
        shift = lo - (np.cumsum(counts) - counts)
        child = np.arange(total, dtype=np.int64) + np.repeat(shift, counts)
        return rows, self._child_code[child], child

    @cached_property
    def _parent(self) -> np.ndarray:
        """Parent of every non-root node (root: -1); built on first use of `blocked_nodes`."""
        parent = np.full(self._n_nodes, -1, dtype=np.int64)
        counts = np.diff(self._offsets.astype(np.int64))
        parent[1:] = np.repeat(np.arange(self._n_internal, dtype=np.int64), counts)
        return parent

    @cached_property
    def _leaf_of_item(self) -> np.ndarray:
        leaf = np.empty(len(self._leaf_item), dtype=np.int64)
        leaf[self._leaf_item.astype(np.int64)] = np.arange(len(self._leaf_item)) + self._n_internal
        return leaf

    def blocked_nodes(self, items: Iterable[int]) -> np.ndarray:
        """Sorted ids of the nodes all of whose items are in `items` (the root excepted).

        A beam that reaches such a node can only end on one of `items`, so a search that
        must not return them (items already consumed) never expands it.
        """
        wanted = np.unique(np.fromiter(items, dtype=np.int64))
        if not len(wanted):
            return np.zeros(0, dtype=np.int64)
        if int(wanted[0]) < 0 or int(wanted[-1]) >= len(self._leaf_item):
            raise IndexError(f"item ids must lie in [0, {len(self._leaf_item)})")
        current = self._leaf_of_item[wanted]
        blocked = [current]
        offsets = self._offsets.astype(np.int64)
        for _ in range(self.levels - 1):
            parents, counts = np.unique(self._parent[current], return_counts=True)
            current = parents[counts == offsets[parents + 1] - offsets[parents]]
            if not len(current):
                break
            blocked.append(current)
        return np.sort(np.concatenate(blocked))

    def level_of(self, node: int) -> int:
        """Depth of `node` (0 for the root, L for leaves)."""
        if not 0 <= node < self._n_nodes:
            raise IndexError(f"node {node} out of range [0, {self._n_nodes})")
        return int(np.searchsorted(self._level_start, node, side="right")) - 1

    def item_of(self, node: int) -> int:
        """Item index named by leaf `node`."""
        j = node - self._n_internal
        if not 0 <= j < len(self._leaf_item) or node >= self._n_nodes:
            raise ValueError(f"node {node} is not a leaf")
        return int(self._leaf_item[j])

    def lookup(self, prefix: Sequence[int]) -> int | None:
        """Node id of `prefix` (length 0..L), or None when no item starts with it."""
        if len(prefix) > self.levels:
            return None
        node = 0
        for c in prefix:
            code = int(c)
            if code < 0 or code > self._max_code or node >= self._n_internal:
                return None
            lo = self._offsets_mv[node]
            hi = self._offsets_mv[node + 1]
            i = bisect.bisect_left(self._code_mv, code, lo, hi)
            if i == hi or self._code_mv[i] != code:
                return None
            node = i
        return node

    def is_valid(self, sid: Sequence[int]) -> bool:
        """True when `sid` is the full Semantic ID of some item."""
        return len(sid) == self.levels and self.lookup(sid) is not None

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        """Write an uncompressed .npz at exactly `path` (np.savez would append '.npz')."""
        with Path(path).open("wb") as f:
            np.savez(
                f,
                format_version=np.int64(_FORMAT_VERSION),
                levels=np.int64(self.levels),
                level_start=self._level_start,
                offsets=self._offsets,
                child_code=self._child_code,
                leaf_item=self._leaf_item,
            )

    @classmethod
    def load(cls, path: Path) -> SIDTrie:
        """Read a trie written by `save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            version = int(data["format_version"])
            if version != _FORMAT_VERSION:
                raise ValueError(f"unsupported trie format version {version}")
            return cls(
                int(data["levels"]),
                data["level_start"],
                data["offsets"],
                data["child_code"],
                data["leaf_item"],
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SIDTrie):
            return NotImplemented
        return (
            self.levels == other.levels
            and np.array_equal(self._level_start, other._level_start)
            and np.array_equal(self._offsets, other._offsets)
            and np.array_equal(self._child_code, other._child_code)
            and np.array_equal(self._leaf_item, other._leaf_item)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SIDTrie(levels={self.levels}, items={self.n_items}, nodes={self.n_nodes})"
