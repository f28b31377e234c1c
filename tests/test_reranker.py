"""The reranker's base: the user model's logit plus the one LLM weight that ranks the
training groups' positives best; the trees add to it, and a missing user score counts 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_store.bundle import load_bundle
from model_store.reranker import FEATURES, fit_base, load_reranker, train_reranker

TEMPERATURE = 0.05
UMS, LOGPROB = FEATURES.index("user_model_score"), FEATURES.index("beam_logprob")


def _groups(llm_weight: float, n: int = 300, size: int = 20, seed: int = 0):
    """Groups whose positive is the best candidate under logit + llm_weight × log-prob."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        x = rng.normal(size=(size, len(FEATURES))).astype(np.float32)
        x[:, UMS] *= TEMPERATURE  # the user model's score is its logit times the temperature
        truth = x[:, UMS] / TEMPERATURE + llm_weight * x[:, LOGPROB]
        groups.append((x, (truth == truth.max()).astype(np.float32)))
    return groups


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.5])
def test_the_base_finds_the_llm_weight_that_explains_the_positives(weight: float) -> None:
    base = fit_base(_groups(weight), TEMPERATURE)
    assert base == {"user_model_score": 1 / TEMPERATURE, "beam_logprob": weight}


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
