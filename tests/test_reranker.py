"""The reranker's base: the user model's logit plus the LLM and item-graph weights that rank
the training groups' positives best; the trees add to it, a missing user score counts 0,
and trees trained before the item graph still score the wider feature rows."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from model_store.bundle import load_bundle
from model_store.reranker import (
    FEATURES,
    Reranker,
    base_score,
    fit_base,
    load_reranker,
    save_reranker,
    train_reranker,
)

TEMPERATURE = 0.05
UMS, LOGPROB = FEATURES.index("user_model_score"), FEATURES.index("beam_logprob")
GRAPH = [FEATURES.index("transition_score"), FEATURES.index("cooccurrence_sim")]


def _groups(
    llm_weight: float,
    n: int = 300,
    size: int = 20,
    seed: int = 0,
    graph: tuple[float, float] = (0.0, 0.0),
):
    """Groups whose positive is the best candidate under logit + llm_weight × log-prob +
    the graph weights × the item graph's two experts."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        x = rng.normal(size=(size, len(FEATURES))).astype(np.float32)
        x[:, UMS] *= TEMPERATURE  # the user model's score is its logit times the temperature
        x[:, GRAPH[1]] *= 0.1  # cosines are small: their weights are large
        truth = x[:, UMS] / TEMPERATURE + llm_weight * x[:, LOGPROB] + x[:, GRAPH] @ graph
        groups.append((x, (truth == truth.max()).astype(np.float32)))
    return groups


@pytest.mark.parametrize(
    ("weight", "graph"),
    [(0.0, (0.0, 0.0)), (0.3, (0.0, 0.0)), (1.5, (1.0, 0.0)), (0.6, (0.5, 10.0))],
)
def test_the_base_finds_the_weights_that_explain_the_positives(
    weight: float, graph: tuple[float, float]
) -> None:
    base = fit_base(_groups(weight, graph=graph), TEMPERATURE)
    expected = {"user_model_score": 1 / TEMPERATURE, "beam_logprob": weight}
    expected |= {FEATURES[c]: w for c, w in zip(GRAPH, graph, strict=True) if w}
    assert base == expected


def test_a_bundle_without_the_item_graph_weighs_its_experts_nothing() -> None:
    groups = _groups(0.3, graph=(1.0, 10.0))
    for x, _ in groups:
        x[:, GRAPH] = np.nan  # as features come from a bundle built before the graph
    assert set(fit_base(groups, TEMPERATURE)) == {"user_model_score", "beam_logprob"}


def test_trees_trained_before_the_item_graph_score_the_wider_rows() -> None:
    older = [(x[:, : GRAPH[0]], y) for x, y in _groups(1.0, n=60)]
    lgb_data = lgb.Dataset(
        np.concatenate([x for x, _ in older]),
        np.concatenate([y for _, y in older]),
        group=[len(y) for _, y in older],
    )
    booster = lgb.train({"objective": "lambdarank", "verbosity": -1}, lgb_data, 3)
    x = _groups(1.0, n=1, seed=1)[0][0]
    scores = Reranker(booster, {"beam_logprob": 1.0}).scores(x)
    assert np.allclose(scores, booster.predict(x[:, : GRAPH[0]], raw_score=True) + x[:, LOGPROB])


def test_a_request_without_a_user_vector_is_ranked_by_the_llm_term() -> None:
    reranker = train_reranker(_groups(1.0, n=60), TEMPERATURE, rounds=5)
    x = _groups(1.0, n=1, seed=1)[0][0]
    with_user = reranker.scores(x)
    x[:, UMS] = np.nan
    trees = reranker.booster.predict(x, raw_score=True)
    assert np.allclose(reranker.scores(x), trees + x[:, LOGPROB] * reranker.base["beam_logprob"])
    assert not np.allclose(with_user, reranker.scores(x))


@pytest.mark.slow
def test_a_bundle_carries_its_base_and_refuses_an_unknown_feature(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.reranker.base == bundle.manifest["reranker"]["base"]
    assert bundle.reranker.base["user_model_score"] > 0
    with pytest.raises(ValueError, match="unknown features"):
        load_reranker(tiny_bundle / "reranker.txt", {"beam_prob": 1.0})


def test_trees_that_cannot_beat_the_base_are_left_out(tmp_path: Path) -> None:
    exact = train_reranker(_groups(0.3), TEMPERATURE, rounds=20)  # the base explains all
    assert exact.booster.num_trees() == 0
    save_reranker(exact, tmp_path / "reranker.txt")
    loaded = load_reranker(tmp_path / "reranker.txt", exact.base)
    x = _groups(0.3, n=1, seed=1)[0][0]
    assert np.allclose(loaded.scores(x), base_score(exact.base, x))
    noisy = [(x, y) for (x, _), (_, y) in zip(_groups(0.3), _groups(0.3, seed=7), strict=True)]
    for x, y in noisy:  # positives the base cannot see, which a feature marks
        x[y == 1, FEATURES.index("genre_share")] = 5.0
    assert train_reranker(noisy, TEMPERATURE, rounds=20).booster.num_trees() > 0
