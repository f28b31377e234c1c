"""What does the generator read from the soft token? A bundle's LLM against its user model.

For every held-out user, the LLM's distribution over the first SID level is compared with
the user model's (the teacher: its next-item probabilities summed per first-level code),
for three prompts that differ only in the soft token: the user's own, another user's
(shuffled), and none (the `baseline` prompt: the last item alone). If the soft token
carries the user, the LLM agrees with the user model far more with the user's own token
than with another's. Run it on a `--holdout validation` bundle while tuning:

    python -m loadtest.bench_soft_token --bundle /tmp/val/d0 --bundle /tmp/val/d1

`--beam-widths 50,100,200` also ranks the `soft` row at each beam width beside `ann`: if a
wider beam does not close the gap, the beam cuts nothing that matters and the model's own
ranking is what trails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_store import metrics
from model_store.bundle import Bundle, load_bundle
from model_store.distill import Teacher
from model_store.engines.torch_engine import TorchEngine
from model_store.evaluate import (
    SEARCH_CHUNK,
    HeldOut,
    held_out,
    ranked_beams,
    ranked_by_ann,
    search_prompts,
)
from model_store.prompts import MODES
from model_store.recommend import Recommender

TOP_CODES = 3


def teacher_level0(rec: Recommender, users: np.ndarray) -> np.ndarray:
    """(n, codes): the user model's next-item probabilities summed per first-level code."""
    bundle = rec.bundle
    teacher = Teacher(bundle.retrieval_vectors, float(bundle.user_model_config["temperature"]))
    probs = teacher.probs(torch.from_numpy(np.asarray(users, dtype=np.float32))).numpy()
    codes = rec.bundle.sid_codes[:, 0]
    out = np.zeros((len(users), int(codes.max()) + 1))
    for code in range(out.shape[1]):
        out[:, code] = probs[:, codes == code].sum(axis=1)
    return out


def llm_level0(
    rec: Recommender, engine: TorchEngine, histories: list[list[int]], users: np.ndarray | None
) -> np.ndarray:
    """(n, codes): the LLM's first-level distribution after the last item, with `users`
    as soft tokens (None: no soft token)."""
    mode = MODES["soft"] if users is not None else MODES["baseline"]
    n_codes = int(rec.bundle.sid_codes[:, 0].max()) + 1
    tokens = rec.layout.token(0, np.arange(n_codes))
    out = []
    for start in range(0, len(histories), 256):
        part = histories[start : start + 256]
        vectors = users[start : start + 256] if users is not None else [None] * len(part)
        prompts = [rec.prompt(mode, h, v, None) for h, v in zip(part, vectors, strict=True)]
        raw = np.stack(engine.open(prompts).logprobs([tokens] * len(prompts)))
        p = np.exp(raw - raw.max(axis=1, keepdims=True))
        out.append(p / p.sum(axis=1, keepdims=True))
    return np.concatenate(out)


def agreement(teacher: np.ndarray, llm: np.ndarray) -> dict[str, float]:
    """KL(teacher ‖ LLM), top-code agreement, and the LLM's mass on the teacher's top codes."""
    eps = 1e-12
    kl = (teacher * (np.log(teacher + eps) - np.log(llm + eps))).sum(axis=1)
    top = np.argsort(-teacher, axis=1)[:, :TOP_CODES]
    return {
        "kl": float(kl.mean()),
        "top1_agree": float((teacher.argmax(1) == llm.argmax(1)).mean()),
        f"mass_on_teacher_top{TOP_CODES}": float(np.take_along_axis(llm, top, 1).sum(1).mean()),
    }


def soft_row_by_beam(
    rec: Recommender, engine: TorchEngine, held: HeldOut, vectors: np.ndarray, widths: list[int]
) -> dict[str, dict[str, float]]:
    """`ann` and the `soft` row at each beam width, as the evaluation ranks them (nothing
    when no width is asked); `vectors` are the held-out users' embeddings."""
    if not widths:
        return {}
    rows = {"ann": metrics.summary(ranked_by_ann(rec, vectors, held.seen), held.targets)}
    prompts = [
        rec.prompt(MODES["soft"], h, v, None) for h, v in zip(held.histories, vectors, strict=True)
    ]
    for width in widths:
        beams = search_prompts(rec, engine, prompts, width, SEARCH_CHUNK, False, "soft", held.seen)
        ranked = ranked_beams(beams, held.seen)
        rows[f"soft, beam {width}"] = metrics.summary(ranked, held.targets)
    return rows


def measure(bundle: Bundle, seed: int, widths: list[int]) -> dict[str, Any]:
    rec = Recommender(bundle, with_reranker=False)
    engine = TorchEngine.from_dir(bundle.llm_dir)
    held = held_out(bundle)
    users = np.asarray(bundle.user_embeddings[held.users], dtype=np.float32)
    shuffled = users[np.random.default_rng(seed).permutation(len(users))]
    teacher = teacher_level0(rec, users)
    rows = {
        "own soft token": llm_level0(rec, engine, held.histories, users),
        "another user's": llm_level0(rec, engine, held.histories, shuffled),
        "none": llm_level0(rec, engine, held.histories, None),
    }
    top = np.argsort(-teacher, axis=1)[:, :TOP_CODES]
    return {
        "bundle": str(bundle.dir),
        "users": len(users),
        "teacher_mass_on_its_top3": float(np.take_along_axis(teacher, top, 1).sum(1).mean()),
        "rows": {name: agreement(teacher, p) for name, p in rows.items()},
        "by_beam": soft_row_by_beam(rec, engine, held, users, widths),
    }


def report(results: list[dict[str, Any]]) -> None:
    head = "| bundle | soft token | KL(teacher ‖ LLM) | top-1 code agrees | LLM mass on"
    print(f"{head} teacher's top {TOP_CODES} |")
    print("|---|---|---|---|---|")
    for r in results:
        for name, row in r["rows"].items():
            print(
                f"| {Path(r['bundle']).name} | {name} | {row['kl']:.3f} | "
                f"{row['top1_agree']:.3f} | {row[f'mass_on_teacher_top{TOP_CODES}']:.3f} |"
            )
    for r in results:
        own = r["teacher_mass_on_its_top3"]
        print(f"{r['bundle']}: the teacher's own mass on its top {TOP_CODES}: {own:.3f}")
    for r in results:
        for name, row in r["by_beam"].items():
            figures = " | ".join(f"{k} {v:.4f}" for k, v in row.items())
            print(f"| {Path(r['bundle']).name} | {name} | {figures} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True)
    parser.add_argument("--seed", type=int, default=0, help="Shuffle of the other users.")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--beam-widths", default="", help="Comma-separated widths to rank the soft row at."
    )
    args = parser.parse_args()
    widths = [int(w) for w in args.beam_widths.split(",") if w]
    results = [measure(load_bundle(b), args.seed, widths) for b in args.bundle]
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
