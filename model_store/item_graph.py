"""Item-to-item evidence for the reranker: which items follow which, which share users.

Two classic collaborative experts beside the user model and the LLM. `transitions` holds,
for every item, how likely each other item is to come within the next three items of a
training sequence (row-normalised, smoothed); `cooccurrence` the cosine between items over
the users who have them. Each keeps only an item's `neighbours` strongest entries, so the
tables grow with the catalog (about 6 bytes per entry), not with its square, and the
weakest, noisiest pairs are left out. Built from the same sequences as the user model and
the LLM, so the reranker's training targets never appear in them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

GRAPH_DIR = "item_graph"
FOLLOW_WEIGHTS = (1.0, 0.5, 0.25)
"""Weight of the item 1, 2 and 3 steps after another in a training sequence."""
SMOOTHING = 5.0
"""Added to each item's outgoing total: an item seen once says little about its successor."""
RECENT_WEIGHTS = (1.0, 0.6, 0.4, 0.3, 0.2)
"""Weight of the last, second-last, ... history item when scoring transitions."""
COOCCURRENCE_HISTORY = 20
"""History items a candidate's co-occurrence is averaged over."""
BLOCK = 4096
"""Most items whose co-occurrence rows are computed (and cut) at once ..."""
ENTRY_BUDGET = 2e7
"""... and most products they may hold (~16 bytes each before the cut): heavy users make
popular items' rows long."""
FLOOR = 1e-4
"""Added before the log of the transition score (a pair never seen is not impossible)."""


@dataclass(frozen=True)
class ItemGraph:
    transitions: sp.csr_matrix  # (n, n) float32
    cooccurrence: sp.csr_matrix  # (n, n) float32

    def transition_score(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """log(recency-weighted chance that each candidate follows the history's last items)."""
        recent = history[::-1][: len(RECENT_WEIGHTS)]
        weights = np.array(RECENT_WEIGHTS[: len(recent)])
        return np.log(_lookup(self.transitions, recent, weights, candidates) + FLOOR)

    def cooccurrence_score(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Mean cosine between each candidate and the history's last items."""
        recent = history[-COOCCURRENCE_HISTORY:]
        weights = np.full(len(recent), 1.0 / max(len(recent), 1))
        return _lookup(self.cooccurrence, recent, weights, candidates)


def _lookup(
    table: sp.csr_matrix, rows: np.ndarray, weights: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Σ_r weights[r] · table[rows[r], candidates], reading only the rows' stored entries
    (a dense row would cost the catalog's size per request)."""
    if not len(rows) or not len(candidates):
        return np.zeros(len(candidates), dtype=np.float64)
    starts = table.indptr[rows].astype(np.int64)
    lengths = table.indptr[rows + 1] - starts
    # every stored entry of the rows, as one index array (row r's run starts at starts[r])
    entries = np.arange(lengths.sum()) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    neighbours = table.indices[entries]
    order = np.argsort(candidates, kind="stable")
    ranked = candidates[order]
    pos = np.minimum(np.searchsorted(ranked, neighbours), len(ranked) - 1)
    hit = ranked[pos] == neighbours
    found = np.repeat(weights, lengths)[hit] * table.data[entries[hit]]
    return np.bincount(order[pos[hit]], weights=found, minlength=len(candidates))


def build_item_graph(seqs: Sequence[np.ndarray], n_items: int, neighbours: int) -> ItemGraph:
    """Both tables from the training sequences, each row cut to its `neighbours` largest."""
    return ItemGraph(
        _top_per_row(_transitions(seqs, n_items), neighbours),
        _cooccurrence(seqs, n_items, neighbours),
    )


def _transitions(seqs: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    sources, targets, weights = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for seq in seqs:
        for step, weight in enumerate(FOLLOW_WEIGHTS, start=1):
            if len(seq) > step:
                sources.append(seq[:-step])
                targets.append(seq[step:])
                weights.append(np.full(len(seq) - step, weight))
    counts = sp.csr_matrix(
        (np.concatenate(weights), (np.concatenate(sources), np.concatenate(targets))),
        shape=(n_items, n_items),
    )
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / (totals + SMOOTHING)) @ counts)


def _cooccurrence(seqs: Sequence[np.ndarray], n_items: int, k: int) -> sp.csr_matrix:
    """Top-`k` cosine rows, a block of items at a time: the full item × item product of a
    large catalog would not fit in memory before it is cut."""
    users = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    items = np.concatenate([np.asarray(s, np.int64) for s in seqs]) if seqs else users
    has = sp.csr_matrix((np.ones(len(items)), (users, items)), shape=(len(seqs), n_items))
    has.data[:] = 1.0  # an item twice in one history still counts once
    norms = np.sqrt(np.asarray(has.sum(axis=0)).ravel())
    scale = 1.0 / np.where(norms > 0, norms, 1.0)
    inverse = sp.diags(scale)
    by_item = sp.csr_matrix(has.T)
    # at most this many products per item's row: what its users have between them
    cost = by_item @ np.diff(has.indptr).astype(np.float64)
    blocks = []
    for start, stop in _blocks(cost, ENTRY_BUDGET, BLOCK):
        block = (sp.diags(scale[start:stop]) @ by_item[start:stop] @ has @ inverse).tocoo()
        other = block.col != block.row + start  # an item is not its own neighbour
        cosine = sp.csr_matrix(
            (block.data[other], (block.row[other], block.col[other])), shape=block.shape
        )
        blocks.append(_top_per_row(cosine, k))
    return sp.csr_matrix(sp.vstack(blocks)) if blocks else sp.csr_matrix((n_items, n_items))


def _blocks(cost: np.ndarray, budget: float, most: int) -> Iterator[tuple[int, int]]:
    """Consecutive item ranges of at most `most` items whose summed cost stays within
    `budget` (an item over it alone gets a range of its own)."""
    total = np.concatenate([[0.0], np.cumsum(cost)])
    start = 0
    while start < len(cost):
        stop = int(np.searchsorted(total, total[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), start + most)
        yield start, stop
        start = stop


def _top_per_row(table: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Each row's `k` largest entries (ties: the lower item id), as float32."""
    coo = table.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows = coo.row[order]
    first = np.searchsorted(rows, rows, side="left")
    keep = order[np.arange(len(order)) - first < k]
    out = sp.csr_matrix(
        (coo.data[keep].astype(np.float32), (coo.row[keep], coo.col[keep])), shape=table.shape
    )
    out.sort_indices()
    return out


def save_item_graph(graph: ItemGraph, bundle_dir: Path) -> None:
    directory = bundle_dir / GRAPH_DIR
    directory.mkdir(exist_ok=True)
    for name in ("transitions", "cooccurrence"):
        table: sp.csr_matrix = getattr(graph, name)
        # one index type for both arrays, the narrowest that holds them: scipy then maps
        # them as they are (mixed types would be converted into the heap)
        index = np.int32 if table.nnz < 2**31 and table.shape[0] < 2**31 else np.int64
        np.save(directory / f"{name}.indptr.npy", table.indptr.astype(index))
        np.save(directory / f"{name}.indices.npy", table.indices.astype(index))
        np.save(directory / f"{name}.data.npy", table.data.astype(np.float32))


def load_item_graph(bundle_dir: Path) -> ItemGraph | None:
    """The bundle's graph, mapped read-only; None for a bundle built before it existed."""
    directory = bundle_dir / GRAPH_DIR
    if not directory.is_dir():
        return None

    def table(name: str) -> sp.csr_matrix:
        parts = [
            np.load(directory / f"{name}.{part}.npy", mmap_mode="r")
            for part in ("data", "indices", "indptr")
        ]
        n_items = len(parts[2]) - 1  # one row pointer per item, and one past the last
        return sp.csr_matrix(tuple(parts), shape=(n_items, n_items), copy=False)

    return ItemGraph(table("transitions"), table("cooccurrence"))
