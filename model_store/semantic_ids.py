"""Semantic IDs: residual quantisation of item content vectors into short code tuples.

Level 0 clusters the vectors, each further level clusters what the previous levels left
unexplained (the residual), so items that share a prefix are close in content space and the
language model can learn coarse-to-fine. RQ codes alone may collide, so a final
"uniqueness" level numbers the items that share the same RQ codes (0, 1, 2, ... in item
order), which makes every Semantic ID name exactly one item (the trie requires it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np


@dataclass(frozen=True)
class SIDConfig:
    levels: int = 3  # residual-quantisation levels
    codebook_size: int = 32  # codes per level
    kmeans_iters: int = 25
    seed: int = 0
    # k-means++ seeding rather than faiss's default uniform sampling: with random seeding
    # two centroids often start in one natural cluster and another cluster gets none, which
    # Lloyd iterations do not repair; the first level would then mix unrelated items.
    kmeans_plus_plus: bool = True
    # Independent k-means runs per level (faiss nredo), keeping the lowest-error one: a cheap
    # insurance against an unlucky seeding that merges two clusters.
    kmeans_redo: int = 1


@dataclass
class SemanticIDs:
    """Codes (n_items, levels + 1), codebooks (levels, codebook_size, dim) and JSON stats."""

    codes: np.ndarray
    codebooks: np.ndarray
    stats: dict[str, Any]


def _kmeans(x: np.ndarray, k: int, cfg: SIDConfig, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, d), assignment per row) of one deterministic faiss k-means."""
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=cfg.kmeans_iters,
        nredo=cfg.kmeans_redo,
        seed=cfg.seed + level,  # distinct, reproducible streams per level
        spherical=False,
        verbose=False,
        min_points_per_centroid=1,  # small catalogues are fine; silence faiss's warning
        init_method=(
            faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
            if cfg.kmeans_plus_plus
            else faiss.ClusteringInitMethod_RANDOM
        ),
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return np.asarray(km.centroids, dtype=np.float32), labels[:, 0].astype(np.int64)


def _group_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id per row, size per group) where a group is a distinct row of `codes`."""
    n, width = codes.shape
    radix = int(codes.max()) + 1 if n else 1
    if width == 0:
        return np.zeros(n, dtype=np.int64), np.array([n] if n else [], dtype=np.int64)
    if radix**width < 2**63:
        key = np.zeros(n, dtype=np.int64)
        for col in range(width):
            key = key * radix + codes[:, col]
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1).astype(np.int64), counts.astype(np.int64)


def _rank_within_group(group: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... among rows of the same group, in row order."""
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    start = np.searchsorted(sorted_group, sorted_group, side="left")
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(group), dtype=np.int64) - start
    return rank


def _perplexity(codes: np.ndarray) -> float:
    """exp(entropy) of code usage: the effective number of codes a level really uses."""
    counts = np.unique(codes, return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def assign_semantic_ids(vectors: np.ndarray, cfg: SIDConfig) -> SemanticIDs:
    """Residual-quantise `vectors` (n_items, dim) into unique Semantic IDs.

    Deterministic for a given seed and faiss thread count (recorded in the stats).
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"vectors must have shape (n_items >= 1, dim >= 1), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinity")
    if min(cfg.levels, cfg.codebook_size, cfg.kmeans_iters, cfg.kmeans_redo) < 1:
        raise ValueError("levels, codebook_size, kmeans_iters and kmeans_redo must be >= 1")
    n, dim = x.shape
    # Guard against a degenerate codebook: k-means cannot place more centroids than points.
    k = min(cfg.codebook_size, n)

    codes = np.zeros((n, cfg.levels + 1), dtype=np.int64)
    codebooks = np.zeros((cfg.levels, cfg.codebook_size, dim), dtype=np.float32)
    residual = x.copy()
    mse_per_level: list[float] = []
    for level in range(cfg.levels):
        centroids, labels = _kmeans(residual, k, cfg, level)
        codebooks[level, :k] = centroids
        codes[:, level] = labels
        residual -= centroids[labels]
        mse_per_level.append(float(np.mean(residual.astype(np.float64) ** 2)))

    group, sizes = _group_ids(codes[:, : cfg.levels])
    codes[:, cfg.levels] = _rank_within_group(group)

    x64 = x.astype(np.float64)
    stats: dict[str, Any] = {
        "n_items": n,
        "dim": dim,
        "levels": cfg.levels,
        "codebook_size": cfg.codebook_size,
        "effective_codebook_size": k,
        "collision_rate": float(sizes[sizes >= 2].sum() / n),
        "max_collision": int(sizes.max()),
        "distinct_rq_codes": len(sizes),
        "codes_used": [len(np.unique(codes[:, lv])) for lv in range(cfg.levels)],
        "perplexity": [_perplexity(codes[:, lv]) for lv in range(cfg.levels)],
        "uniqueness_level_size": int(codes[:, cfg.levels].max()) + 1,
        "reconstruction_mse": mse_per_level[-1],
        "reconstruction_mse_level0": mse_per_level[0],
        "reconstruction_mse_per_level": mse_per_level,
        # MSE of the best constant vector: the scale against which the RQ errors read.
        "mse_of_mean": float(np.mean((x64 - x64.mean(axis=0)) ** 2)),
        "faiss_threads": int(faiss.omp_get_max_threads()),
        "seed": cfg.seed,
    }
    return SemanticIDs(codes=codes, codebooks=codebooks, stats=stats)


def _pairs_sharing(counts: np.ndarray, share: np.ndarray, nonempty: np.ndarray) -> int:
    """Unordered pairs of distinct items, within each group, whose genre sets intersect.

    counts: (groups, sets) items per (group, exact genre set); share: (sets, sets) 1 where two
    genre sets intersect; nonempty: (sets,) 1 where a set has a genre (it meets itself).
    All entries are integers below 2^53, so float64 BLAS products are exact.
    """
    c = counts.astype(np.float64)
    ordered = float(((c @ share) * c).sum()) - float((c @ nonempty).sum())
    return round(ordered) // 2


def purity_report(codes: np.ndarray, genres: Sequence[Sequence[str]]) -> dict[str, float]:
    """How much more often items sharing a first code share a genre than random item pairs.

    Items are grouped by their exact genre set, so the cost is O(n + sets^2 * first codes)
    rather than O(n^2) pairs. Values are NaN when there is no pair to measure.
    """
    arr = np.asarray(codes)
    first = arr if arr.ndim == 1 else arr[:, 0]
    if arr.ndim not in (1, 2) or len(first) != len(genres):
        raise ValueError("codes must have one row per item of genres")
    n = len(first)

    set_ids: dict[frozenset[str], int] = {}
    item_set = np.fromiter(
        (set_ids.setdefault(frozenset(g), len(set_ids)) for g in genres), dtype=np.int64, count=n
    )
    vocab = sorted({g for s in set_ids for g in s})
    genre_col = {g: j for j, g in enumerate(vocab)}
    membership = np.zeros((len(set_ids), len(vocab)), dtype=np.float64)
    for s, i in set_ids.items():
        membership[i, [genre_col[g] for g in s]] = 1.0
    share = (membership @ membership.T > 0).astype(np.float64)
    nonempty = np.diag(share).copy()

    _, code_group = np.unique(first, return_inverse=True)
    code_group = code_group.reshape(-1)
    by_code = np.zeros((int(code_group.max()) + 1 if n else 0, len(set_ids)), dtype=np.int64)
    np.add.at(by_code, (code_group, item_set), 1)
    overall = by_code.sum(axis=0, keepdims=True)

    group_sizes = by_code.sum(axis=1)
    pairs_first = int((group_sizes * (group_sizes - 1) // 2).sum())
    pairs_all = n * (n - 1) // 2
    shared_first = _pairs_sharing(by_code, share, nonempty)
    shared_all = _pairs_sharing(overall, share, nonempty)

    purity = shared_first / pairs_first if pairs_first else float("nan")
    base = shared_all / pairs_all if pairs_all else float("nan")
    lift = purity / base if base > 0 else float("nan")
    return {"purity_first_code": float(purity), "base_rate": float(base), "lift": float(lift)}
