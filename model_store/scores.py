"""The per-user score file and the per-user metrics behind it.

Per-user score file (`per_user.json`): one format, written by `genrec eval` and by `genrec
build` (in the bundle), by `loadtest/score_api.py` (the REST API scored from outside) and by
`loadtest/peer_recbole_sasrec.py --per-user` (a peer), and read by `genrec eval --peer`:

    {
      "format": "genrec-per-user/1",
      "name": "RecBole 1.2.1 SASRec",           # how reports name this system
      "user_id": ["1", "2", ...],               # the dataset's raw user ids, as strings
      "rows": {                                 # one or more systems over those users
        "served": {"HR@10": [1.0, 0.0, ...], "NDCG@10": [0.63, 0.0, ...],
                   "HR@30": [...], "NDCG@30": [...]}
      },
      "meta": {...}                             # optional, free-form (seeds, target, ...)
    }

Columnar (each list aligned with `user_id`) because it is 4 numbers per user and row: a
row of 943 users is ~100 KB of JSON, readable by any tool without genrec installed. Values
are the user's own HR@k (0 or 1) and NDCG@k (1 / log2(rank + 2) on a hit, else 0) under the
protocol; the mean of a column is the row's figure. A peer compares by its row `served` if
it has one, else by its only row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_store import metrics

METRICS = tuple(f"{name}@{k}" for k in metrics.CUTOFFS for name in ("HR", "NDCG"))
PER_USER_FORMAT = "genrec-per-user/1"
PER_USER_FILE = "per_user.json"

Scores = dict[str, np.ndarray]
"""metric → one value per user."""
Table = dict[str, dict[str, float]]
"""row → metric → value."""


@dataclass(frozen=True)
class PerUserScores:
    """Per-user metrics of one or more rows over the same users (the file format above)."""

    name: str
    user_ids: list[str]
    rows: dict[str, Scores]
    meta: dict[str, Any] = field(default_factory=dict)

    def comparison_row(self) -> str:
        """The row a peer is compared by: `served` if present, else its only row."""
        if "served" in self.rows:
            return "served"
        if len(self.rows) == 1:
            return next(iter(self.rows))
        raise ValueError(f"{self.name}: rows {sorted(self.rows)}, none of them 'served'")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PER_USER_FORMAT,
            "name": self.name,
            "user_id": self.user_ids,
            "rows": {
                row: {m: values.tolist() for m, values in scores.items()}
                for row, scores in self.rows.items()
            },
            "meta": self.meta,
        }


def write_per_user(path: Path, scores: PerUserScores) -> None:
    path.write_text(json.dumps(scores.to_json()))


def read_per_user(path: Path) -> PerUserScores:
    """A per-user score file, checked here so a malformed peer file fails with its name and
    the problem, not as a shape error inside the bootstrap."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a per-user score file ({e})") from e
    if not isinstance(data, dict) or data.get("format") != PER_USER_FORMAT:
        raise ValueError(f"{path}: not a per-user score file (format {PER_USER_FORMAT!r})")
    ids = [str(u) for u in data.get("user_id") or []]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: a user id appears twice")
    rows = {str(row): _columns(path, str(row), cols, len(ids)) for row, cols in _rows(data)}
    if not rows:
        raise ValueError(f"{path}: no rows")
    return PerUserScores(
        str(data.get("name") or Path(path).stem), ids, rows, data.get("meta") or {}
    )


def _rows(data: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = data.get("rows")
    return list(rows.items()) if isinstance(rows, dict) else []


def _columns(path: Path, row: str, columns: Any, users: int) -> Scores:
    missing = [m for m in METRICS if not isinstance(columns, dict) or m not in columns]
    if missing:
        raise ValueError(f"{path}: row {row!r} lacks {missing}")
    scores = {m: np.asarray(columns[m], dtype=np.float64) for m in METRICS}
    if any(values.shape != (users,) for values in scores.values()):
        raise ValueError(f"{path}: row {row!r} does not have one value per user_id")
    return scores


def per_user_metrics(ranked: Sequence[Sequence[int]], targets: Sequence[int]) -> Scores:
    """Each user's own HR@k and NDCG@k: the `metrics` functions applied to one user at a
    time, so the definitions live in one place and each column's mean is `metrics.summary`."""
    ranks = metrics.target_ranks(ranked, targets)
    one_each = [ranks[u : u + 1] for u in range(len(ranks))]
    scores: Scores = {}
    for k in metrics.CUTOFFS:
        scores[f"HR@{k}"] = np.array([metrics.hit_rate(r, k) for r in one_each], np.float64)
        scores[f"NDCG@{k}"] = np.array([metrics.ndcg(r, k) for r in one_each], np.float64)
    return scores
