import math

import numpy as np
import pytest

from model_store import metrics


def test_hand_computed_ranks_and_metrics() -> None:
    ranked = [[5, 3, 9], [1, 2, 3], list(range(40)), [7]]
    targets = [9, 4, 35, 7]
    ranks = metrics.target_ranks(ranked, targets)
    assert ranks.tolist() == [2, -1, 35, 0]
    assert metrics.hit_rate(ranks, 10) == pytest.approx(2 / 4)
    assert metrics.hit_rate(ranks, 30) == pytest.approx(2 / 4)
    # rank 2 → 1/log2(4) = 0.5; rank 0 → 1; the miss and the rank-35 hit add nothing at 30.
    assert metrics.ndcg(ranks, 10) == pytest.approx((0.5 + 1.0) / 4)
    summary = metrics.summary(ranked, targets)
    assert set(summary) == {"HR@10", "NDCG@10", "HR@30", "NDCG@30"}
    assert summary["NDCG@30"] == pytest.approx(1.5 / 4)


def test_ndcg_position_discount() -> None:
    ranks = np.array([0, 1, 9, 10])
    expected = (1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4
    assert metrics.ndcg(ranks, 10) == pytest.approx(expected)
    assert metrics.hit_rate(ranks, 10) == pytest.approx(3 / 4)


def test_empty_input_scores_zero() -> None:
    assert metrics.summary([], []) == {"HR@10": 0.0, "NDCG@10": 0.0, "HR@30": 0.0, "NDCG@30": 0.0}
