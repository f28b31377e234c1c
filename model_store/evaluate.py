"""The evaluation protocol (leave-one-out, full ranking, history excluded) over a bundle.

Every row goes through `Recommender`, the object the gateway serves with: the generative
ablations (baseline / prompt / soft / soft+prompt / random-context control), the served
pipeline (generation → reranker → no-repeats rule), and the non-generative baselines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_store import metrics
from model_store.bundle import Bundle
from model_store.generation import Beam, Engine, Prompt
from model_store.progress import progress_bar
from model_store.prompts import MODES
from model_store.recommend import Recommender, unseen

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


def _search(
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


def evaluate(
    bundle: Bundle,
    engine: Engine,
    *,
    beam_width: int = 50,
    chunk: int = 128,
    seed: int = 0,
    max_users: int | None = None,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics per row, e.g. `{"served": {"HR@10": ..., "NDCG@10": ..., ...}, ...}`."""
    if bundle.holdout is None:
        raise ValueError(f"{bundle.dir}: built with --holdout none, nothing to evaluate on")
    rec = Recommender(bundle)
    users = np.flatnonzero(bundle.holdout >= 0)[:max_users]
    targets = bundle.holdout[users]
    histories = [bundle.histories[int(u)].tolist() for u in users]
    seen = [set(h) for h in histories]
    vectors = bundle.user_embeddings[users]
    contexts = [list(c) for c in bundle.users["context"].iloc[users]]
    rng = np.random.default_rng(seed)
    other = (np.arange(len(users)) + rng.integers(1, max(2, len(users)), len(users))) % len(users)

    ranked: dict[str, list[list[int]]] = {
        "popularity": [rec.popular(s, TOP_K) for s in seen],
        "ann": [
            [x.item for x in rec.nearest(v, s, TOP_K)] for v, s in zip(vectors, seen, strict=True)
        ],
    }
    beams_by_row: dict[str, list[list[Beam]]] = {}
    plans = {name: (mode, np.arange(len(users))) for name, mode in MODES.items()}
    plans["random-context"] = (MODES["soft+prompt"], other)
    for name, (mode, donor) in plans.items():
        prompts = [
            rec.prompt(mode, h, vectors[d], contexts[d])
            for h, d in zip(histories, donor, strict=True)
        ]
        beams_by_row[name] = _search(
            rec, engine, prompts, beam_width, chunk, show_progress, name, seen
        )
        ranked[name] = [
            unseen((b.item for b in bs), s, TOP_K)
            for bs, s in zip(beams_by_row[name], seen, strict=True)
        ]
    ranked["served"] = [
        unseen((x.item for x in rec.rerank(v, h, bs)), s, TOP_K)
        for v, h, bs, s in zip(vectors, histories, beams_by_row["soft+prompt"], seen, strict=True)
    ]
    return {row: metrics.summary(ranked[row], targets.tolist()) for row in ROWS}


def lift_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table with each metric and its relative lift over the generative baseline."""
    base = results["baseline"]
    names = list(next(iter(results.values())))
    head = "| row | " + " | ".join(names) + " | HR@30 lift |\n|---|" + "---|" * (len(names) + 1)
    lines = [head]
    for row, figures in results.items():
        lift = figures["HR@30"] / base["HR@30"] - 1 if base["HR@30"] else float("nan")
        cells = " | ".join(f"{figures[n]:.4f}" for n in names)
        lines.append(f"| {row} | {cells} | {lift:+.1%} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, dict[str, float]], out_dir: Path) -> list[str]:
    """eval.json (row → metrics), eval.md (table with lifts) and eval.png (bar chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    (out_dir / "eval.md").write_text(lift_table(results))
    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4))
    for offset, metric in zip(
        (-0.3, -0.1, 0.1, 0.3), ("HR@10", "NDCG@10", "HR@30", "NDCG@30"), strict=True
    ):
        ax.bar(x + offset, [results[n][metric] for n in names], width=0.2, label=metric)
    ax.set_xticks(x, names, rotation=20)
    ax.set_title("genrec evaluation (leave-one-out, full ranking, history excluded)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "eval.png", dpi=100)
    plt.close(fig)
    return ["eval.json", "eval.md", "eval.png"]
