"""Top-K ranking metrics for leave-one-out evaluation (one held-out item per user)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CUTOFFS = (10, 30)


def target_ranks(ranked: Sequence[Sequence[int]], targets: Sequence[int]) -> np.ndarray:
    """0-based position of each user's target in their ranked list; -1 when absent."""
    ranks = np.full(len(targets), -1, dtype=np.int64)
    for user, (items, target) in enumerate(zip(ranked, targets, strict=True)):
        hits = np.flatnonzero(np.asarray(items) == target)
        if hits.size:
            ranks[user] = hits[0]
    return ranks


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean((ranks >= 0) & (ranks < k))) if len(ranks) else 0.0


def ndcg(ranks: np.ndarray, k: int) -> float:
    """With one relevant item the ideal DCG is 1, so NDCG@k = 1 / log2(rank + 2) on a hit."""
    if not len(ranks):
        return 0.0
    hit = (ranks >= 0) & (ranks < k)
    gains = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    return float(np.mean(gains))


def summary(ranked: Sequence[Sequence[int]], targets: Sequence[int]) -> dict[str, float]:
    """HR@k and NDCG@k for k in CUTOFFS, as `{"HR@10": ..., "NDCG@10": ..., ...}`."""
    ranks = target_ranks(ranked, targets)
    out: dict[str, float] = {}
    for k in CUTOFFS:
        out[f"HR@{k}"] = hit_rate(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
    return out
