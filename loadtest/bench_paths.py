"""The generative path against the traditional one, per request, in one process: speed and
quality side by side over the same real users of a bundle.

* generative: `Recommender.prompt` (soft+prompt) → `generate` (SID-constrained beam search
  through `VLLMEngine`, the user's history cut from the trie as the gateway does) →
  `rerank` (LightGBM) → first k unseen;
* traditional: faiss ANN over the user-model vectors (`Recommender.nearest`, N = beam-width
  candidates, history excluded) → the same LightGBM reranker (`candidate_features` with the
  ANN score in the `beam_logprob` column and the ANN rank in `beam_rank`; the reranker was
  trained on beam log-probs, so those two columns are outside what it learnt) → first k unseen.

One request at a time, the two paths interleaved per user (A B, then B A) after a warm-up
on other users. The headline is the ratio generative / traditional of the median latency;
HR@k and NDCG@k on the bundle's held-out items (history excluded) over the users timed
sit next to it. The ANN order without the reranker is reported as a reference row.

    python -m loadtest.bench_paths --bundle bundles/ml-100k --users 0 --out /tmp/paths.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from loadtest.bench_beam_vs_vllm import (
    add_exclude_seen,
    bench_parser,
    load_cases,
    machine_info,
    machine_line,
    open_vllm,
    percentiles,
    run_bench,
    vllm_environment,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    vllm_environment()
    info = machine_info()
    from model_store import metrics
    from model_store.bundle import load_bundle
    from model_store.prompts import MODES
    from model_store.recommend import Recommender, unseen
    from model_store.reranker import candidate_features, rerank

    bundle = load_bundle(args.bundle)
    rec = Recommender(bundle)
    if rec.reranker is None:
        raise SystemExit("the bundle has no reranker")
    reranker = rec.reranker
    n_total = args.warmup + args.users if args.users > 0 else 0
    cases = load_cases(bundle, rec, n_total, args.seed)
    warm, timed = cases[: args.warmup], cases[args.warmup :]
    mode = MODES["soft+prompt"]
    width, k = args.beam, args.k

    engine = open_vllm(bundle, args.kv_cache_gib)
    stage: dict[str, list[float]] = {
        s: [] for s in ("gen_prompt", "gen_generate", "gen_rerank", "trad_ann", "trad_rerank")
    }
    total: dict[str, list[float]] = {"generative": [], "traditional": []}
    lists: dict[str, list[list[int]]] = {"generative": [], "traditional": [], "ann_order": []}

    def generative(case: Any, record: bool) -> list[int]:
        t0 = time.perf_counter()
        prompt = rec.prompt(mode, case.history, case.embedding, case.context)
        t1 = time.perf_counter()
        exclude = [case.seen] if args.exclude_seen else None
        beams = rec.generate(engine, [prompt], width, exclude=exclude)[0]
        t2 = time.perf_counter()
        ranked = rec.rerank(case.embedding, case.history, beams)
        top = unseen((s.item for s in ranked), case.seen, k)
        t3 = time.perf_counter()
        if record:
            stage["gen_prompt"].append(1000.0 * (t1 - t0))
            stage["gen_generate"].append(1000.0 * (t2 - t1))
            stage["gen_rerank"].append(1000.0 * (t3 - t2))
            total["generative"].append(1000.0 * (t3 - t0))
        return top

    def traditional(case: Any, record: bool) -> tuple[list[int], list[int]]:
        t0 = time.perf_counter()
        near = rec.nearest(case.embedding, case.seen, width)
        t1 = time.perf_counter()
        items = [s.item for s in near]
        x = candidate_features(
            rec.table, case.embedding, case.history, items, [s.score for s in near]
        )
        order, _ = rerank(reranker, x)
        top = unseen((items[i] for i in order), case.seen, k)
        t2 = time.perf_counter()
        if record:
            stage["trad_ann"].append(1000.0 * (t1 - t0))
            stage["trad_rerank"].append(1000.0 * (t2 - t1))
            total["traditional"].append(1000.0 * (t2 - t0))
        return top, unseen(items, case.seen, k)

    try:
        for case in warm:
            generative(case, False)
            traditional(case, False)
        for i, case in enumerate(timed):
            if i % 2 == 0:
                gen = generative(case, True)
                trad, ann = traditional(case, True)
            else:
                trad, ann = traditional(case, True)
                gen = generative(case, True)
            lists["generative"].append(gen)
            lists["traditional"].append(trad)
            lists["ann_order"].append(ann)
    finally:
        engine.close()

    targets = [c.target for c in timed]
    quality = {}
    for name, ranked in lists.items():
        ranks = metrics.target_ranks(ranked, targets)
        quality[name] = {f"HR@{k}": metrics.hit_rate(ranks, k), f"NDCG@{k}": metrics.ndcg(ranks, k)}
    g, t = percentiles(total["generative"]), percentiles(total["traditional"])
    paired = np.asarray(total["generative"]) / np.asarray(total["traditional"])
    return {
        "benchmark": "bench_paths",
        "machine": info,
        "bundle": str(args.bundle),
        "bundle_version": bundle.version,
        "settings": {
            "beam_width_and_ann_candidates": width,
            "k": k,
            "users_timed": len(timed),
            "users_warmup": len(warm),
            "exclude_seen_in_trie": args.exclude_seen,
            "kv_cache_gib": args.kv_cache_gib,
            "order": "interleaved per user: generative,traditional then traditional,generative",
            "traditional_reranker_input": (
                "ANN score (user.item + item prior, faiss inner product) in the beam_logprob "
                "column, ANN rank in beam_rank; the reranker was trained on beam log-probs"
            ),
        },
        "generative_ms": g,
        "traditional_ms": t,
        "stages_ms": {name: percentiles(v) for name, v in stage.items()},
        "ratio_generative_over_traditional": {
            "p50": g["p50"] / t["p50"],
            "p95": g["p95"] / t["p95"],
            "median_of_paired": float(np.median(paired)),
        },
        "quality": quality,
    }


def report(r: dict[str, Any]) -> None:
    s = r["settings"]
    k = s["k"]
    print(machine_line(r["machine"]))
    print(
        f"bundle {r['bundle_version']}; {s['users_timed']} users timed after "
        f"{s['users_warmup']} warm-up; {s['beam_width_and_ann_candidates']} candidates "
        f"(beam width / ANN), top {k}; held-out item, history excluded"
    )
    print(
        f"{'path':<40} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'HR@' + str(k):>8} {'NDCG@' + str(k):>8}"
    )
    q = r["quality"]
    st = r["stages_ms"]
    rows = (
        ("generative: prompt→beam→rerank", r["generative_ms"], q["generative"]),
        ("traditional: ANN→rerank", r["traditional_ms"], q["traditional"]),
        ("(reference) ANN order, no reranker", st["trad_ann"], q["ann_order"]),
    )
    for label, p, m in rows:
        print(
            f"{label:<40} {p['p50']:8.2f} {p['p95']:8.2f} {p['p99']:8.2f} "
            f"{m[f'HR@{k}']:8.4f} {m[f'NDCG@{k}']:8.4f}"
        )
    print(
        "stages p50 ms: generative prompt {:.2f} · generate {:.2f} · rerank {:.2f}; "
        "traditional ANN {:.2f} · features+rerank {:.2f}".format(
            *(st[n]["p50"] for n in ("gen_prompt", "gen_generate", "gen_rerank")),
            *(st[n]["p50"] for n in ("trad_ann", "trad_rerank")),
        )
    )
    ratio = r["ratio_generative_over_traditional"]
    print(
        f"ratio generative / traditional: p50 {ratio['p50']:.1f}x, p95 {ratio['p95']:.1f}x, "
        f"median of per-user ratios {ratio['median_of_paired']:.1f}x; "
        f"HR@{k} {q['generative'][f'HR@{k}']:.4f} vs {q['traditional'][f'HR@{k}']:.4f}"
    )
    print(f"note: traditional reranker input = {s['traditional_reranker_input']}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--users", type=int, default=0, help="users timed (<= 0: every user with a held-out item)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="other users, run untimed")
    parser.add_argument("--beam", type=int, default=20, help="beam width = ANN candidates")
    parser.add_argument("--k", type=int, default=10, help="list length and HR/NDCG cut-off")
    add_exclude_seen(parser, "cut the user's history from the trie, as the gateway does")
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
