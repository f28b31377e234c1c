"""Which order of the generated candidates ranks best? One bundle's rankers side by side.

For every held-out user, the `soft+prompt` beams (the candidates `served` reranks) are
ordered six ways: beam order (the LLM alone), the user model's score alone, the
reranker's base alone, trees alone (the reranker as trained before the base), base +
trees without the item graph's experts (as trained before them), and base + trees (the
reranker now). The rerankers are trained here on the bundle's own reranker groups,
rebuilt as the build makes them (the bundle's dataset, holdout mode, user model and LLM),
so a bundle built before the base or the graph compares them all (`--item-neighbours 50`
adds the graph a build would make). Run it on a `--holdout
validation` bundle while tuning; on a test bundle it only confirms:

    python -m loadtest.bench_reranker --bundle /tmp/val/d0 --out artifacts/reranker-val.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from model_store import metrics, user_model
from model_store.build import reranker_groups, split_users
from model_store.bundle import load_bundle
from model_store.cli import load_named_dataset, set_threads
from model_store.config import BuildConfig
from model_store.engines.torch_engine import TorchEngine
from model_store.evaluate import TOP_K, held_out, search_prompts
from model_store.item_graph import build_item_graph
from model_store.prompts import MODES
from model_store.recommend import Recommender, unseen
from model_store.reranker import (
    FEATURES,
    GRAPH_WEIGHTS,
    base_score,
    candidate_features,
    train_reranker,
)

Scorer = Callable[[np.ndarray], np.ndarray]


def compare(
    bundle_dir: Path, beam_width: int | None = None, neighbours: int | None = None
) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    cfg = BuildConfig.from_dict(manifest["config"])
    if beam_width is not None:  # candidates per user, for training groups and ranking alike
        cfg = replace(cfg, beam_width=beam_width)
    dataset = load_named_dataset(str(manifest.get("dataset_source") or manifest["dataset"]))
    plan, contexts = split_users(dataset, cfg, manifest["holdout"])
    rec = Recommender(bundle, with_reranker=False)
    if neighbours is not None:  # the item graph as a build with this setting makes it
        graph = build_item_graph(plan.fit, dataset.n_items, neighbours) if neighbours else None
        rec.table = replace(rec.table, graph=graph)
    fit_states = user_model.user_states(bundle.user_model, plan.fit)
    groups = reranker_groups(rec, plan, contexts, fit_states, cfg.beam_width)
    temperature = float(bundle.user_model_config["temperature"])
    now = train_reranker(groups, temperature, seed=cfg.seed, rounds=cfg.reranker_rounds)
    trees = train_reranker(groups, None, seed=cfg.seed, rounds=cfg.reranker_rounds)
    no_graph = [(_without_graph(x), y) for x, y in groups]
    before_graph = train_reranker(no_graph, temperature, seed=cfg.seed, rounds=cfg.reranker_rounds)

    held = held_out(bundle)
    vectors = bundle.user_embeddings[held.users]
    user_contexts = [list(c) for c in bundle.users["context"].iloc[held.users]]
    engine = TorchEngine.from_dir(bundle.llm_dir)
    prompts = [
        rec.prompt(MODES["soft+prompt"], h, v, c)
        for h, v, c in zip(held.histories, vectors, user_contexts, strict=True)
    ]
    beams = search_prompts(
        rec, engine, prompts, cfg.beam_width, 128, False, "soft+prompt", held.seen
    )
    features = [
        candidate_features(rec.table, v, h, [b.item for b in bs], [b.logprob for b in bs])
        for v, h, bs in zip(vectors, held.histories, beams, strict=True)
    ]
    rankers: dict[str, Scorer] = {
        "beam order": lambda x: -np.arange(len(x), dtype=np.float64),
        "user model score": lambda x: x[:, FEATURES.index("user_model_score")],
        "base alone": lambda x: base_score(now.base, x),
        "trees alone (before)": trees.scores,
        "base + trees, no item graph": lambda x: before_graph.scores(_without_graph(x)),
        "base + trees (now)": now.scores,
    }
    rows = {}
    for name, scorer in rankers.items():
        ranked = []
        for x, bs, seen in zip(features, beams, held.seen, strict=True):
            order = np.lexsort((np.arange(len(x)), -scorer(x)))
            ranked.append(unseen((bs[i].item for i in order), seen, TOP_K))
        rows[name] = metrics.summary(ranked, held.targets)
    return {
        "bundle": str(bundle_dir),
        "holdout": manifest["holdout"],
        "seed": cfg.seed,
        "beam_width": cfg.beam_width,
        "base": now.base,
        "base_without_graph": before_graph.base,
        "rounds": {
            "now": now.booster.num_trees(),
            "before": trees.booster.num_trees(),
            "no item graph": before_graph.booster.num_trees(),
        },
        "target_in_candidates": float(
            np.mean([t in {b.item for b in bs} for t, bs in zip(held.targets, beams, strict=True)])
        ),
        "rows": rows,
    }


def _without_graph(features: np.ndarray) -> np.ndarray:
    """The features as a bundle without the item graph has them (its experts unknown)."""
    out = features.copy()
    out[:, [FEATURES.index(name) for name in GRAPH_WEIGHTS]] = np.nan
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="as the build (its figures repeat at 1 thread)"
    )
    parser.add_argument(
        "--beam-width", type=int, default=None, help="candidates per user (default: the build's)"
    )
    parser.add_argument(
        "--item-neighbours",
        type=int,
        default=None,
        help="rebuild the item graph with this many neighbours (0: none; default: the bundle's)",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    results = [compare(b, args.beam_width, args.item_neighbours) for b in args.bundle]
    for r in results:
        print(
            f"{r['bundle']} (holdout {r['holdout']}, seed {r['seed']}, "
            f"{r['beam_width']} beams): base {r['base']}, trees {r['rounds']}, "
            f"target among candidates {r['target_in_candidates']:.4f}"
        )
        for name, m in r["rows"].items():
            print(f"  {name:22s}" + "".join(f"  {k} {v:.4f}" for k, v in m.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
