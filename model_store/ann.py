"""Nearest items to a user vector (the fallback path): exact for small catalogs, IVF-PQ
(faiss) for large ones, both scoring the final answer exactly.

A flat faiss index copies every vector into each gateway (~260 bytes per item at 65
dimensions) and scans them all per request: fine for ML-100K, not for 10M items. Above
`FLAT_MAX` items the builder writes an IVF-PQ index (`ann.faiss`) whose inverted lists the
gateway maps from the file (`IO_FLAG_MMAP`), so resident memory is the coarse centroids
and PQ tables only. The index proposes `POOL_FACTOR` times as many items as asked (at
least `POOL_MIN`, and one in `POOL_SHARE` of the catalog); those are rescored exactly
against the (memory-mapped) vectors, so scores are true inner products and recall is the
index's recall at the pool size, measured in BENCHMARKS.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

FLAT_MAX = 200_000
"""Catalogs up to this many items are searched exactly (ML-100K stays exact)."""
INDEX_FILE = "ann.faiss"
POOL_FACTOR = 10
POOL_MIN = 500
POOL_SHARE = 5000
"""Candidates rescored: at least one item in POOL_SHARE. PQ's coarse order is what limits
recall at 10M items (2,000 candidates: recall@50 0.98; 500: 0.91), not the cells probed."""
PROBE_SHARE = 8
"""Cells searched: one in PROBE_SHARE (512 of 4096). Clustered catalogs spread a user's
nearest items over many cells: 32 cells gave recall@50 0.52 at 1M items, 512 gave 0.96."""
CHUNK = 1 << 16  # rows per block of an exact scan: bounded temporaries for any catalog


def padded_dim(d: int) -> int:
    """Dimensions padded with zero columns to a multiple of 4 (4 per PQ sub-quantizer)."""
    return 4 * math.ceil(d / 4)


def _pad(x: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros((len(x), d), dtype=np.float32)
    out[:, : x.shape[1]] = x
    return out


def n_lists(n: int) -> int:
    """Coarse cells: ~4 sqrt(n) as a power of two, at most 4096 (the assignment of 10M items
    to more cells does not fit a build on two cores)."""
    return int(min(4096, 2 ** round(math.log2(max(4 * math.sqrt(n), 64)))))


def build_index(vectors: np.ndarray, seed: int = 0, train_max: int = 200_000) -> faiss.Index:
    """IVF-PQ over `vectors` (inner product): PQ with one byte per 4 dimensions."""
    n, d = vectors.shape
    dp = padded_dim(d)
    nlist = n_lists(n)
    quantizer = faiss.IndexFlatIP(dp)
    index = faiss.IndexIVFPQ(quantizer, dp, nlist, dp // 4, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, train_max), replace=False))
    index.train(_pad(np.asarray(vectors[sample], dtype=np.float32), dp))
    for start in range(0, n, 1 << 18):
        block = np.asarray(vectors[start : start + (1 << 18)], dtype=np.float32)
        index.add(_pad(block, dp))
    return index


def write_index(vectors: np.ndarray, directory: Path, seed: int = 0) -> list[str]:
    """Writes `ann.faiss` when the catalog is large enough to need one; the files written."""
    if len(vectors) <= FLAT_MAX:
        return []
    faiss.write_index(build_index(vectors, seed), str(directory / INDEX_FILE))
    return [INDEX_FILE]


def top_k(scores: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (items, scores), best first; ties by ascending item."""
    if k < len(scores):
        keep = np.argpartition(-scores, k - 1)[:k]
        scores, items = scores[keep], items[keep]
    order = np.lexsort((items, -scores))
    return items[order], scores[order]


def exact(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k by inner product, block by block (float16 blocks widen one at a time)."""
    best_items, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
    q = np.asarray(query, dtype=np.float32)
    for start in range(0, len(vectors), CHUNK):
        block = np.asarray(vectors[start : start + CHUNK], dtype=np.float32)
        items, scores = top_k(block @ q, np.arange(start, start + len(block)), k)
        best_items, best_scores = top_k(
            np.concatenate([best_scores, scores]), np.concatenate([best_items, items]), k
        )
    return best_items, best_scores


class ItemSearch:
    """Top items for a query vector: exact scan, or IVF-PQ candidates rescored exactly."""

    def __init__(self, vectors: np.ndarray, index: faiss.Index | None = None) -> None:
        self.vectors = vectors
        self.index = index
        if index is not None:
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = max(1, ivf.nlist // PROBE_SHARE)

    @classmethod
    def load(cls, vectors: np.ndarray, directory: Path) -> ItemSearch:
        """The bundle's index mapped from its file (none: exact search)."""
        path = directory / INDEX_FILE
        if not path.is_file():
            return cls(vectors)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        return cls(vectors, faiss.read_index(str(path), flags))

    @property
    def exact(self) -> bool:
        return self.index is None

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, scores) of the k best, best first; scores are exact inner products."""
        k = min(k, len(self.vectors))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.index is None:
            return exact(self.vectors, query, k)
        q = _pad(np.asarray(query, dtype=np.float32)[None], self.index.d)
        pool = max(POOL_FACTOR * k, POOL_MIN, len(self.vectors) // POOL_SHARE)
        pool = min(len(self.vectors), pool)
        _, found = self.index.search(q, pool)
        items = np.unique(found[0][found[0] >= 0])  # ascending: mapped pages in file order
        scores = np.asarray(self.vectors[items], dtype=np.float32) @ query.astype(np.float32)
        return top_k(scores, items, k)
