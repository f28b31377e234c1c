"""Traditional reranker: LightGBM lambdarank over the LLM's candidates, on top of a base score.

The base is a product of experts: the user model's logit for the candidate plus a weight
times the LLM's log-probability of it, the one weight fitted by NDCG@10 on the training
groups. The trees then learn only what the other features add to that base, for as many
rounds as cross-validation supports. Trees alone, fitted to ~500 groups, ranked below
their own user-model feature (see BENCHMARKS.md).

Trained on the validation split only (candidates generated from histories that end
before each user's validation item), so the test split stays untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import lightgbm as lgb
import numpy as np

from model_store import metrics
from model_store.item_graph import ItemGraph

FEATURES = (
    "beam_logprob",
    "beam_rank",
    "user_model_score",
    "last_item_sim",
    "content_history_sim",
    "genre_share",
    "log_popularity",
    "year_gap",
    "transition_score",
    "cooccurrence_sim",
)

LLM_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0, 1.5, 2.0, 4.0)
"""The base's candidate weights for the LLM's log-probability, per unit of user-model logit."""
GRAPH_WEIGHTS = {
    "transition_score": (0.0, 0.5, 1.0, 2.0),
    "cooccurrence_sim": (0.0, 2.0, 5.0, 10.0, 20.0),
}
"""The base's candidate weights for the item graph's two experts (`item_graph.py`)."""


@dataclass(frozen=True)
class ItemTable:
    """Per-item arrays the features read; all rows indexed by item."""

    vectors: np.ndarray  # (n, d) user-model item vectors, L2-normalised (float16 or 32)
    content: np.ndarray  # (n, 384) content vectors, L2-normalised (float16 or 32)
    genres: np.ndarray  # (n, g) multi-hot (uint8 or float32)
    log_popularity: np.ndarray  # (n,)
    year: np.ndarray  # (n,) float, NaN unknown
    prior: np.ndarray  # (n,) the user model's item prior, on the scale of user·item
    graph: ItemGraph | None = None  # item-to-item experts (None: a bundle built before them)


def candidate_features(
    table: ItemTable,
    user: np.ndarray | None,
    history: Sequence[int],
    candidates: Sequence[int],
    logprobs: Sequence[float],
) -> np.ndarray:
    """(len(candidates), len(FEATURES)) float32 matrix for one request."""
    cand = np.asarray(candidates, dtype=np.int64)
    hist = np.asarray(history, dtype=np.int64)
    n = len(cand)
    out = np.zeros((n, len(FEATURES)), dtype=np.float32)
    out[:, 0] = logprobs
    out[:, 1] = np.arange(n)
    has_user = user is not None and np.any(user)
    vectors = _rows(table.vectors, cand)
    out[:, 2] = vectors @ user + table.prior[cand] if has_user else np.nan
    if len(hist):
        out[:, 3] = vectors @ _rows(table.vectors, hist[-1:])[0]
        out[:, 4] = _rows(table.content, cand) @ _rows(table.content, hist[-5:]).mean(axis=0)
        share = _rows(table.genres, hist[-20:]).mean(axis=0)
        out[:, 5] = _rows(table.genres, cand) @ share
        hist_year = table.year[hist[-10:]]
        mean_year = np.nanmean(hist_year) if np.isfinite(hist_year).any() else np.nan
        out[:, 7] = np.abs(table.year[cand] - mean_year)
    else:
        out[:, [3, 4, 5, 7]] = np.nan
    if table.graph is not None and len(hist):
        out[:, 8] = table.graph.transition_score(hist, cand)
        out[:, 9] = table.graph.cooccurrence_score(hist, cand)
    else:
        out[:, [8, 9]] = np.nan
    out[:, 6] = table.log_popularity[cand]
    return out


def _rows(table: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Rows of a (possibly float16 or uint8, memory-mapped) table, widened to float32 so
    sums and products are computed as with a float32 table."""
    return np.asarray(table[items], dtype=np.float32)


@dataclass(frozen=True)
class Reranker:
    """Trees plus a linear base over named features (NaN counts as 0: a request without a
    user vector is ranked by the LLM's term alone). Bundles from before the base have none."""

    booster: lgb.Booster
    base: Mapping[str, float] = field(default_factory=dict)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Trees read the features they were trained on: FEATURES only ever grows at its end."""
        trained = features[:, : self.booster.num_feature()]
        out = np.asarray(self.booster.predict(trained, raw_score=True), dtype=np.float64)
        return out + base_score(self.base, features)


def base_score(base: Mapping[str, float], features: np.ndarray) -> np.ndarray:
    out = np.zeros(len(features), dtype=np.float64)
    for name, weight in base.items():
        out += weight * np.nan_to_num(features[:, FEATURES.index(name)].astype(np.float64))
    return out


class _Stacked(NamedTuple):
    """Training groups as one matrix: rows (as given), their 0/1 labels, each row's group,
    and the row of its group's positive (found once: the base's grid ranks many scores)."""

    x: np.ndarray
    labels: np.ndarray
    group: np.ndarray
    sizes: list[int]
    positive_row: np.ndarray

    @classmethod
    def of(cls, groups: Sequence[tuple[np.ndarray, np.ndarray]]) -> _Stacked:
        sizes = [len(labels) for _, labels in groups]
        labels = np.concatenate([labels for _, labels in groups])
        group = np.repeat(np.arange(len(groups)), sizes)
        positive = labels.astype(bool)
        where = np.empty(len(groups), dtype=np.int64)
        where[group[positive]] = np.flatnonzero(positive)
        x = np.concatenate([x for x, _ in groups])
        return cls(x, labels, group, sizes, where[group])

    def ndcg(self, scores: np.ndarray) -> float:
        """Mean NDCG@10 over the groups, each with exactly one positive (candidates are
        distinct items); a candidate tied with the positive ranks ahead when it comes first."""
        target = scores[self.positive_row]
        ahead = (scores > target) | (
            (scores == target) & (np.arange(len(scores)) < self.positive_row)
        )
        ranks = np.bincount(self.group, weights=ahead, minlength=len(self.sizes))
        return metrics.ndcg(ranks.astype(np.int64), 10)


def fit_base(
    groups: Sequence[tuple[np.ndarray, np.ndarray]], temperature: float
) -> dict[str, float]:
    """The user model's logit (its score over the temperature) plus the weights of the
    LLM's log-probability and the item graph's experts that rank the groups' positives best
    by mean NDCG@10 (a grid; ties: the earlier, smaller weights). Experts a bundle lacks
    (NaN) weigh nothing, and their weight stays 0."""
    return _fit_base(_Stacked.of(groups), temperature)


def _fit_base(stacked: _Stacked, temperature: float) -> dict[str, float]:
    x = np.nan_to_num(stacked.x.astype(np.float64))
    column = {name: x[:, FEATURES.index(name)] for name in ("user_model_score", *GRAPH_WEIGHTS)}
    logprob = x[:, FEATURES.index("beam_logprob")]
    best: tuple[float, dict[str, float]] = (-1.0, {})
    for graph_weights in itertools.product(*GRAPH_WEIGHTS.values()):
        graph = dict(zip(GRAPH_WEIGHTS, graph_weights, strict=True))
        if any(w and not column[name].any() for name, w in graph.items()):
            continue
        fixed = column["user_model_score"] / temperature
        fixed = fixed + sum(w * column[name] for name, w in graph.items())
        for weight in LLM_WEIGHTS:
            quality = stacked.ndcg(fixed + weight * logprob)
            if quality > best[0]:
                base = {"user_model_score": 1.0 / temperature, "beam_logprob": weight}
                best = (quality, {**base, **{k: w for k, w in graph.items() if w}})
    return best[1]


def train_reranker(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
    temperature: float | None,
    seed: int = 0,
    rounds: int = 200,
) -> Reranker:
    """`groups`: one (features, 0/1 labels) pair per user; groups without a positive are
    skipped. `temperature`: the user model's, which puts its score on the logit scale
    (None: trees alone, as bundles were trained before the base)."""
    kept = [(x, y) for x, y in groups if y.any()]
    if not kept:
        raise ValueError("no validation user has their item among the candidates")
    stacked = _Stacked.of(kept)
    base = _fit_base(stacked, temperature) if temperature is not None else {}
    init_score = base_score(base, stacked.x)
    data = lgb.Dataset(
        stacked.x,
        stacked.labels,
        group=stacked.sizes,
        init_score=init_score,
        feature_name=list(FEATURES),
        free_raw_data=False,
    )
    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_data_in_leaf": 20,
        "feature_fraction": 0.9,
        "lambdarank_truncation_level": 30,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "verbosity": -1,
    }
    chosen = cv_rounds(params, data, rounds, seed, stacked.ndcg(init_score))
    # no round beats the base: a booster without trees (it saves, loads and adds 0)
    booster = (
        lgb.train(params, data, num_boost_round=chosen) if chosen else lgb.Booster(params, data)
    )
    return Reranker(booster, base)


def cv_rounds(
    params: dict[str, object],
    data: lgb.Dataset,
    rounds: int,
    seed: int,
    base_quality: float,
) -> int:
    """Boosting rounds chosen by 5-fold cross-validation over the validation users (folds
    keep each user's candidates together), stopping when NDCG@10 stops improving: a few
    hundred groups overfit a fixed, generous number of rounds. 0 when no round's mean
    beats `base_quality`, the NDCG@10 of the base alone: lambdarank's leaves, fitted to
    the small gradients of groups the base already ranks well, can be large enough for
    one tree to undo a good base."""
    group = data.get_group()
    if group is None or len(np.asarray(group)) < 10:
        return rounds
    history = lgb.cv(
        params,
        data,
        num_boost_round=rounds,
        nfold=5,
        stratified=False,
        seed=seed,
        callbacks=[lgb.early_stopping(20, first_metric_only=True, verbose=False)],
    )
    scores = np.asarray(history["valid ndcg@10-mean"])
    return len(scores) if scores.max() > base_quality else 0


def rerank(reranker: Reranker, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, scores): candidates by reranker score, best first (ties keep beam order)."""
    scores = reranker.scores(features)
    return np.lexsort((np.arange(len(scores)), -scores)), scores


def save_reranker(reranker: Reranker, path: Path) -> None:
    """The trees; the base goes in the bundle's manifest (`reranker.base`)."""
    reranker.booster.save_model(str(path))


def load_reranker(path: Path, base: Mapping[str, float] | None = None) -> Reranker:
    unknown = set(base or {}) - set(FEATURES)
    if unknown:
        raise ValueError(f"the reranker's base names unknown features {sorted(unknown)}")
    return Reranker(lgb.Booster(model_file=str(path)), dict(base or {}))
