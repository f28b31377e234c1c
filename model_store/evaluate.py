"""The evaluation protocol (leave-one-out, full ranking, history excluded) over a bundle.

Every row goes through `Recommender`, the object the gateway serves with: the generative
ablations (baseline / prompt / soft / soft+prompt / random-context control), the served
pipeline (generation → reranker → no-repeats rule), and the non-generative baselines.

`genrec eval` reports each row as mean ± std over build seeds (sibling bundles
`BUNDLE-seed<K>` that differ only in `--seed`, built when missing) and, given peers'
per-user scores, a paired bootstrap interval of `served − peer` (see `model_store.stats`).

The per-user score file's format is in `model_store.scores`; the report over seeds and
peers (eval.json, eval.md, eval.png) in `model_store.eval_report`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model_store import metrics
from model_store.bundle import Bundle
from model_store.config import PRESETS, BuildConfig
from model_store.generation import Beam, Engine, Prompt
from model_store.progress import progress_bar
from model_store.prompts import MODES
from model_store.recommend import Recommender, unseen
from model_store.scores import (
    METRICS,
    PER_USER_FILE,
    PerUserScores,
    Table,
    per_user_metrics,
    read_per_user,
)

ROWS = (
    "popularity",
    "ann",
    "baseline",
    "prompt",
    "soft",
    "soft+prompt",
    "random-context",
    "served",
)
TOP_K = max(metrics.CUTOFFS)
SEARCH_CHUNK = 128
"""Prompts per beam-search call in a batch evaluation: memory bounded, the engine kept busy."""
PROTOCOL = "leave-one-out, full ranking over all items, the user's history excluded"


# ---------------------------------------------------------------------------- one bundle


@dataclass(frozen=True)
class Evaluation:
    """One bundle's evaluation: the summary the manifest stores, and the per-user scores
    behind it (what seed averaging and paired comparisons need)."""

    summary: Table
    per_user: PerUserScores


@dataclass(frozen=True)
class HeldOut:
    """The users the protocol scores: those with a held-out test item, in user order."""

    users: np.ndarray  # user indices
    user_ids: list[str]  # the dataset's raw ids
    targets: list[int]  # the held-out item of each
    histories: list[list[int]]  # what each has consumed before it (published history)

    @property
    def seen(self) -> list[set[int]]:
        """Items excluded from each user's ranking (the protocol's history exclusion)."""
        return [set(h) for h in self.histories]


def held_out(bundle: Bundle, max_users: int | None = None) -> HeldOut:
    """The first `max_users` test users of a bundle; shared by the offline evaluation and
    the outside scoring of the API (`loadtest/score_api.py`), so both score the same users."""
    if bundle.holdout is None:
        raise ValueError(f"{bundle.dir}: built with --holdout none, nothing to evaluate on")
    users = np.flatnonzero(bundle.holdout >= 0)[:max_users]
    return HeldOut(
        users,
        bundle.users["user_id"].iloc[users].astype(str).tolist(),
        bundle.holdout[users].tolist(),
        [bundle.histories[int(u)].tolist() for u in users],
    )


def search_prompts(
    rec: Recommender,
    engine: Engine,
    prompts: Sequence[Prompt],
    beam_width: int,
    chunk: int,
    show_progress: bool,
    label: str,
    seen: Sequence[set[int]],
) -> list[list[Beam]]:
    beams: list[list[Beam]] = []
    bar = progress_bar((len(prompts) + chunk - 1) // chunk, label, show_progress)
    for start in range(0, len(prompts), chunk):
        part = slice(start, start + chunk)
        beams += rec.generate(engine, prompts[part], beam_width, exclude=seen[part])
        bar.advance()
    bar.close()
    return beams


def ranked_by_ann(
    rec: Recommender, vectors: np.ndarray, seen: Sequence[set[int]]
) -> list[list[int]]:
    """The `ann` row: each user's nearest items to their vector, their history excluded."""
    return [[x.item for x in rec.nearest(v, s, TOP_K)] for v, s in zip(vectors, seen, strict=True)]


def ranked_beams(beams: Sequence[Sequence[Beam]], seen: Sequence[set[int]]) -> list[list[int]]:
    """A generative row: each user's beams as items, their history excluded."""
    return [unseen((b.item for b in bs), s, TOP_K) for bs, s in zip(beams, seen, strict=True)]


def evaluate(
    bundle: Bundle,
    engine: Engine,
    *,
    beam_width: int = 50,
    chunk: int = SEARCH_CHUNK,
    seed: int = 0,
    max_users: int | None = None,
    show_progress: bool = True,
) -> Evaluation:
    """Metrics per row (`summary["served"] == {"HR@10": ..., ...}`) and per user."""
    held = held_out(bundle, max_users)
    users, targets, histories, seen = held.users, held.targets, held.histories, held.seen
    rec = Recommender(bundle)
    vectors = bundle.user_embeddings[users]
    contexts = [list(c) for c in bundle.users["context"].iloc[users]]
    rng = np.random.default_rng(seed)
    other = (np.arange(len(users)) + rng.integers(1, max(2, len(users)), len(users))) % len(users)

    ranked: dict[str, list[list[int]]] = {
        "popularity": [rec.popular(s, TOP_K) for s in seen],
        "ann": ranked_by_ann(rec, vectors, seen),
    }
    beams_by_row: dict[str, list[list[Beam]]] = {}
    plans = {name: (mode, np.arange(len(users))) for name, mode in MODES.items()}
    plans["random-context"] = (MODES["soft+prompt"], other)
    for name, (mode, donor) in plans.items():
        prompts = [
            rec.prompt(mode, h, vectors[d], contexts[d])
            for h, d in zip(histories, donor, strict=True)
        ]
        beams_by_row[name] = search_prompts(
            rec, engine, prompts, beam_width, chunk, show_progress, name, seen
        )
        ranked[name] = ranked_beams(beams_by_row[name], seen)
    ranked["served"] = [
        unseen((x.item for x in rec.rerank(v, h, bs)), s, TOP_K)
        for v, h, bs, s in zip(vectors, histories, beams_by_row["soft+prompt"], seen, strict=True)
    ]
    per_user = PerUserScores(
        f"genrec (seed {seed})",
        held.user_ids,
        {row: per_user_metrics(ranked[row], targets) for row in ROWS},
        {"dataset": bundle.manifest.get("dataset"), "seed": seed, "beam_width": beam_width},
    )
    return Evaluation({row: metrics.summary(ranked[row], targets) for row in ROWS}, per_user)


# ---------------------------------------------------------------------------- seeds


def config_seed(manifest: Mapping[str, Any]) -> int:
    """The `--seed` a bundle was built with (`BuildConfig.seed`, in the manifest's config)."""
    return int(manifest["config"]["seed"])


def _without_seeds(value: Any) -> Any:
    """A config with every `seed` dropped: what must be equal between seed siblings."""
    if isinstance(value, dict):
        return {k: _without_seeds(v) for k, v in value.items() if k != "seed"}
    return value


def _config_json(cfg: BuildConfig) -> Any:
    """The config as the manifest stores it (JSON: tuples become lists)."""
    return json.loads(json.dumps(cfg.to_dict()))


def bundle_preset(manifest: Mapping[str, Any]) -> str | None:
    """The preset a bundle was built with: recorded by `genrec build`, else (older bundles,
    or ones built from Python) the preset whose config it matches, seeds aside."""
    if manifest.get("preset"):
        return str(manifest["preset"])
    config = manifest.get("config") or {}
    for name, cfg in PRESETS.items():
        candidate = replace(cfg, max_users=config.get("max_users"))
        if _without_seeds(_config_json(candidate)) == _without_seeds(config):
            return name
    return None


def default_seed_count(manifest: Mapping[str, Any]) -> int:
    """3 seeds for the full preset (the figures that are published), else 1 (tiny bundles
    are for tests, where one build is enough)."""
    return 3 if bundle_preset(manifest) == "full" else 1


def seed_dirs(bundle_dir: Path, manifest: Mapping[str, Any], n: int) -> dict[int, Path]:
    """seed → bundle directory: the given bundle's own seed first, then the siblings
    `BUNDLE-seed<K>` for the next n − 1 seeds."""
    own = config_seed(manifest)
    dirs = {own: bundle_dir}
    for seed in range(own + 1, own + n):
        dirs[seed] = bundle_dir.with_name(f"{bundle_dir.name}-seed{seed}")
    return dirs


def sibling_config(manifest: Mapping[str, Any], seed: int) -> BuildConfig:
    """The given bundle's build config (preset and `--set` overrides alike) with another
    seed; ValueError when another genrec version wrote it (then build siblings by hand)."""
    try:
        return BuildConfig.from_dict(manifest["config"]).with_seed(seed)
    except ValueError as e:
        raise ValueError(f"{e}: build the seed siblings with `--seed`") from None


def check_sibling(
    manifest: Mapping[str, Any], sibling: Mapping[str, Any], seed: int, path: Path
) -> None:
    """A sibling must differ from the given bundle only in its seed: same data, same options,
    same test split (else the seeds' figures, and the per-user averages, are not comparable)."""
    problems = []
    if config_seed(sibling) != seed:
        problems.append(f"built with seed {config_seed(sibling)}, not {seed}")
    if _without_seeds(sibling.get("config")) != _without_seeds(manifest.get("config")):
        problems.append("built with other options")
    for key in ("dataset_checksum", "holdout", "base_model"):
        if sibling.get(key) != manifest.get(key):
            problems.append(f"another {key}")
    if sibling["files"].get("holdout.npy") != manifest["files"].get("holdout.npy"):
        problems.append("another test split")
    if problems:
        raise ValueError(f"{path}: not a seed sibling ({'; '.join(problems)}); remove it")


def stored_evaluation(
    bundle: Bundle, *, beam_width: int, max_users: int | None
) -> Evaluation | None:
    """The evaluation `genrec build` ran and stored in the bundle, when it is the one asked
    for (torch engine, the config's beam width and seed, all test users): an evaluation
    costs minutes on the full preset, and the build has already paid for it."""
    manifest = bundle.manifest
    if "evaluation" not in manifest or PER_USER_FILE not in manifest.get("files", {}):
        return None
    if beam_width != int(manifest["config"]["beam_width"]):
        return None
    per_user = read_per_user(bundle.dir / PER_USER_FILE)
    if max_users is not None and max_users < len(per_user.user_ids):
        return None
    stored = manifest["evaluation"]  # the manifest is written with sorted keys
    summary = {row: {m: float(stored[row][m]) for m in METRICS} for row in ROWS}
    return Evaluation(summary, per_user)


def mean_over_seeds(evaluations: Sequence[Evaluation], seeds: Sequence[int]) -> PerUserScores:
    """Each user's scores averaged over the seeds (their expected score over training noise);
    the seeds must have evaluated the same users in the same order."""
    first = evaluations[0].per_user
    if len(evaluations) == 1:
        return first
    if any(e.per_user.user_ids != first.user_ids for e in evaluations):
        raise ValueError("the seeds' bundles evaluated different users (another test split?)")
    rows = {
        row: {m: np.mean([e.per_user.rows[row][m] for e in evaluations], axis=0) for m in METRICS}
        for row in first.rows
    }
    name = f"genrec (mean over seeds {', '.join(map(str, seeds))})"
    return PerUserScores(name, first.user_ids, rows, {"seeds": list(seeds)})
