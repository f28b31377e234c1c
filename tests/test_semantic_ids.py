"""Residual-quantisation Semantic IDs and the genre purity report."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from model_store import llm
from model_store.semantic_ids import SIDConfig, assign_semantic_ids, purity_report
from model_store.trie import SIDTrie
from model_store.vocab import Vocab


def _clusters(
    n: int = 800, k: int = 8, dim: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """k well separated Gaussian blobs (centre spacing ~50x the blob radius)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 10
    labels = rng.integers(0, k, size=n)
    return centres[labels] + 0.2 * rng.normal(size=(n, dim)), labels


def test_first_code_recovers_clusters_and_ids_are_unique() -> None:
    x, labels = _clusters()
    sids = assign_semantic_ids(x, SIDConfig(levels=3, codebook_size=8, seed=1))
    assert sids.codes.shape == (len(x), 4)
    assert sids.codes.dtype == np.int64
    assert sids.codebooks.shape == (3, 8, x.shape[1])
    assert sids.codebooks.dtype == np.float32
    table = np.zeros((8, 8), dtype=np.int64)
    np.add.at(table, (sids.codes[:, 0], labels), 1)
    # one-to-one: every first code holds one cluster and every cluster one first code
    assert (table > 0).sum(axis=0).tolist() == [1] * 8
    assert (table > 0).sum(axis=1).tolist() == [1] * 8
    assert len(np.unique(sids.codes, axis=0)) == len(x)
    SIDTrie.build(sids.codes)  # raises on duplicates
    stats = sids.stats
    json.dumps(stats)  # JSON-serialisable
    assert stats["codes_used"][0] == 8
    assert stats["perplexity"][0] == pytest.approx(
        np.exp(-sum(p * np.log(p) for p in np.bincount(labels) / len(labels)))
    )
    # residual levels explain what level 0 left over
    assert stats["reconstruction_mse"] < stats["reconstruction_mse_level0"] < stats["mse_of_mean"]
    assert stats["uniqueness_level_size"] == int(sids.codes[:, -1].max()) + 1


def test_deterministic_for_a_seed() -> None:
    x, _ = _clusters(n=600, dim=24, seed=5)
    cfg = SIDConfig(levels=3, codebook_size=16, seed=7)
    a, b = assign_semantic_ids(x, cfg), assign_semantic_ids(x, cfg)
    assert np.array_equal(a.codes, b.codes)
    assert np.array_equal(a.codebooks, b.codebooks)
    assert a.stats == b.stats


def test_collision_stats_on_hand_made_case() -> None:
    # Two distinct points, the first repeated 3 times: with k=2 the RQ codes of items
    # 0, 2, 3 coincide (group of 3), item 1 is alone.
    a, b = [0.0, 0.0], [5.0, 5.0]
    x = np.array([a, b, a, a])
    sids = assign_semantic_ids(x, SIDConfig(levels=1, codebook_size=2, seed=0))
    codes = sids.codes
    assert codes[0, 0] == codes[2, 0] == codes[3, 0] != codes[1, 0]
    assert codes[:, 1].tolist() == [0, 0, 1, 2]  # uniqueness level, in item order
    assert sids.stats["collision_rate"] == pytest.approx(3 / 4)
    assert sids.stats["max_collision"] == 3
    assert sids.stats["uniqueness_level_size"] == 3
    assert sids.stats["codes_used"] == [2]
    assert sids.stats["reconstruction_mse"] == pytest.approx(0.0, abs=1e-9)


def test_codebook_is_clamped_for_tiny_catalogues() -> None:
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    sids = assign_semantic_ids(x, SIDConfig(levels=2, codebook_size=32))
    assert sids.stats["effective_codebook_size"] == 3
    assert sids.codebooks.shape == (2, 32, 3)
    assert len(np.unique(sids.codes, axis=0)) == 3


def test_rejects_bad_vectors() -> None:
    with pytest.raises(ValueError):
        assign_semantic_ids(np.zeros((0, 4)), SIDConfig())
    with pytest.raises(ValueError):
        assign_semantic_ids(np.array([[np.nan, 1.0]]), SIDConfig())


def test_purity_report_hand_computed() -> None:
    codes = np.array([[0, 9], [0, 9], [0, 9], [1, 9], [1, 9], [1, 9]])
    genres = [["a"], ["a", "b"], ["c"], ["b"], [], ["a"]]
    # first code 0: pairs (0,1) share "a"; (0,2), (1,2) do not      -> 1 of 3
    # first code 1: (3,4), (3,5), (4,5) share nothing                -> 0 of 3
    # all 15 pairs: (0,1) a, (1,3) b, (0,5) a, (1,5) a               -> 4 of 15
    report = purity_report(codes, genres)
    assert report["purity_first_code"] == pytest.approx(1 / 6)
    assert report["base_rate"] == pytest.approx(4 / 15)
    assert report["lift"] == pytest.approx((1 / 6) / (4 / 15))


def test_purity_report_matches_brute_force() -> None:
    rng = np.random.default_rng(11)
    vocab = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
    n = 300
    genres = [list(rng.choice(vocab, size=rng.integers(0, 4), replace=False)) for _ in range(n)]
    first = rng.integers(0, 7, size=n)
    same = share_same = share_all = 0
    for i, j in itertools.combinations(range(n), 2):
        share = bool(set(genres[i]) & set(genres[j]))
        share_all += share
        if first[i] == first[j]:
            same += 1
            share_same += share
    report = purity_report(first[:, None], genres)
    assert report["purity_first_code"] == pytest.approx(share_same / same)
    assert report["base_rate"] == pytest.approx(share_all / (n * (n - 1) // 2))


def test_purity_report_is_fast_at_movielens_scale() -> None:
    import time

    rng = np.random.default_rng(0)
    vocab = [f"g{i}" for i in range(19)]
    genres = [list(rng.choice(vocab, size=rng.integers(1, 4), replace=False)) for _ in range(1682)]
    codes = rng.integers(0, 32, size=(1682, 4))
    t0 = time.perf_counter()
    report = purity_report(codes, genres)
    assert time.perf_counter() - t0 < 1.0
    assert 0 < report["base_rate"] < 1


def _distances(rows: np.ndarray) -> np.ndarray:
    upper = np.triu_indices(len(rows), 1)
    return np.linalg.norm(rows[:, None] - rows[None], axis=-1)[upper]


def test_sid_tokens_can_start_from_the_codebooks() -> None:
    """`llm.sid_init=codebooks`: each level's SID tokens keep its codebook's geometry
    (distances in proportion) at the embedding's own spread; no other token moves."""
    codebooks = np.random.default_rng(0).normal(size=(2, 8, 40)).astype(np.float32)
    vocab = Vocab.build(["hello", "world"], [8, 8, 3])
    model = llm.new_model(vocab, llm.LLMConfig(hidden=128, heads=4, layers=1, intermediate=64))
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    llm.init_sid_embeddings(model, vocab, codebooks, seed=0)
    after = weight.detach()
    levels = [vocab.layout.token(level, np.arange(8)) for level in range(2)]
    moved = np.zeros(len(vocab), dtype=bool)
    moved[np.concatenate(levels)] = True  # the uniqueness level and the words stay
    np.testing.assert_array_equal((after != before).any(dim=1).numpy(), moved)
    for level, tokens in enumerate(levels):
        rows = after[torch.from_numpy(tokens)].numpy()
        ratio = _distances(rows) / _distances(codebooks[level])
        assert ratio.std() / ratio.mean() < 0.25
        assert rows.std() == pytest.approx(float(before.std()), rel=1e-3)
