"""How far one SID-constrained search is from the hardware limit: the LLM's FLOPs per request
against the machine's measured matmul throughput.

FLOPs come from the model config (the usual decoder estimate): per computed token
2 × non-embedding parameters + an attention term 2 × n_layers × context × hidden, plus
the LM head 2 × vocab × hidden once per engine row (vLLM computes logits for the last
position of a request only). Tokens computed per engine step, as `VLLMEngine` runs them:
the prompt once (level 0), then per scored row (`SearchStats.rows_scored` of a real
search) only the tail that the prefix cache does not hold, assuming vLLM's block size of
32 tokens: the full blocks of the row's parent are cached, so a row of length n recomputes
n - 32·floor((n - 1) / 32) tokens. vLLM's own prefix-cache counters (queried − hit tokens)
are printed beside the estimate as a check.

The hardware side is `torch.matmul` of float32 matrices at the model's shapes, i.e. one
layer's projections (M, hidden) @ (hidden, hidden | kv | intermediate) and
(M, intermediate) @ (intermediate, hidden) with M = rows × tokens of each step, and at a
large square size for the peak. Achieved FLOP/s = FLOPs of a search / its measured time;
the headline is that as a fraction of the peak, measured in the same run.

    python -m loadtest.bench_flops --bundle bundles/ml-100k --searches 50 --out /tmp/flops.json
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.bench_beam_vs_vllm import (
    bench_parser,
    load_cases,
    machine_info,
    machine_line,
    open_vllm,
    percentiles,
    run_bench,
    vllm_environment,
)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_weights(self) -> int:
        """Multiply-add weights of one layer's projections: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return h * h + 2 * h * kv + h * h + 3 * h * i

    @property
    def non_embedding_params(self) -> int:
        """Projections with their q/k/v biases and the RMSNorm weights (Qwen2)."""
        per_layer = self.layer_weights + (self.hidden + 2 * self.kv_dim) + 2 * self.hidden
        return self.layers * per_layer + self.hidden

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        heads = int(config["num_attention_heads"])
        return cls(
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]),
        )


@dataclass(frozen=True)
class Step:
    """One engine call: `rows` requests of `length` tokens, each computing `tail` of them."""

    level: int
    rows: int
    length: int
    tail: int

    @property
    def tokens(self) -> int:
        return self.rows * self.tail


def steps_of(prompt_len: int, calls: Sequence[tuple[int, int]], block: int) -> list[Step]:
    """Engine steps of one search from its (level, rows scored) calls."""
    steps = []
    for level, rows in calls:
        length = prompt_len + level
        cached = 0 if level == 0 else block * ((length - 1) // block)
        steps.append(Step(level, rows, length, length - cached))
    return steps


def step_flops(shape: Shape, step: Step) -> dict[str, float]:
    """FLOPs of one step: linear (2 × non-embedding params per token), attention
    (2 × layers × context × hidden per token, context = the token's position + 1), LM head."""
    start, end = step.length - step.tail, step.length  # positions computed: [start, end)
    context_sum = end * (end + 1) // 2 - start * (start + 1) // 2
    linear = 2.0 * shape.non_embedding_params * step.tokens
    attention = 2.0 * shape.layers * shape.hidden * context_sum * step.rows
    head = 2.0 * shape.vocab * shape.hidden * step.rows
    return {"linear": linear, "attention": attention, "lm_head": head}


def search_flops(shape: Shape, steps: Sequence[Step]) -> dict[str, float]:
    total = {"linear": 0.0, "attention": 0.0, "lm_head": 0.0}
    for s in steps:
        for k, v in step_flops(shape, s).items():
            total[k] += v
    total["total"] = sum(total.values())
    total["tokens"] = float(sum(s.tokens for s in steps))
    return total


class _CountingSession:
    """Passes through to the engine's session and records (level, rows asked) per call."""

    def __init__(self, inner: Any, calls: list[tuple[int, int]]) -> None:
        self._inner = inner
        self._calls = calls
        self._level = 0

    def logprobs(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._calls.append((self._level, sum(1 for c in candidates if len(c))))
        result: list[np.ndarray] = self._inner.logprobs(candidates)
        return result

    def extend(self, parents: np.ndarray, tokens: np.ndarray) -> None:
        self._level += 1
        self._inner.extend(parents, tokens)


class _CountingEngine:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []

    def open(self, prompts: Sequence[Any]) -> _CountingSession:
        return _CountingSession(self.inner.open(prompts), self.calls)


# ---------------------------------------------------------------------------- matmul


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_gflops(
    pairs: Sequence[tuple[int, int, int]], device: str, min_s: float = 0.2, rounds: int = 5
) -> float:
    """GFLOP/s of running the float32 matmuls (m, k) @ (k, n) of `pairs` back to back,
    best of `rounds` rounds of at least `min_s` seconds each."""
    import torch

    with torch.inference_mode():
        gen = torch.Generator(device="cpu").manual_seed(0)
        mats = [
            (
                torch.randn(m, k, generator=gen).to(device),
                torch.randn(k, n, generator=gen).to(device),
            )
            for m, k, n in pairs
        ]
        flops = sum(2.0 * m * k * n for m, k, n in pairs)

        def once() -> None:
            for a, b in mats:
                torch.matmul(a, b)

        once()
        _sync(device)
        t0 = time.perf_counter()
        once()
        _sync(device)
        per_call = max(time.perf_counter() - t0, 1e-7)
        reps = max(1, math.ceil(min_s / per_call))
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                once()
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
    return flops / best / 1e9


def layer_pairs(shape: Shape, m: int) -> list[tuple[int, int, int]]:
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    return [(m, h, h), (m, h, kv), (m, h, kv), (m, h, h), (m, h, i), (m, h, i), (m, i, h)]


# ---------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    vllm_environment()
    info = machine_info()
    import json

    import torch

    from model_store.bundle import load_bundle
    from model_store.generation import SearchStats
    from model_store.recommend import Recommender

    bundle = load_bundle(args.bundle)
    config = json.loads((bundle.llm_dir / "config.json").read_text())
    shape = Shape.from_config(config)
    rec = Recommender(bundle)
    cases = load_cases(bundle, rec, args.warmup + args.searches, args.seed)
    warm, timed = cases[: args.warmup], cases[args.warmup :]

    threads_before = torch.get_num_threads()
    device_hint = "cuda" if torch.cuda.is_available() else "cpu"
    peak_before = matmul_gflops([(args.peak_size,) * 3], device_hint)

    llm_kwargs: dict[str, Any] = {"disable_log_stats": not args.vllm_counters}
    engine = open_vllm(bundle, args.kv_cache_gib, **llm_kwargs)
    try:
        llm = engine.llm
        assert llm is not None
        device = str(getattr(llm.llm_engine.vllm_config.device_config, "device_type", "cpu"))
        counting = _CountingEngine(engine)

        def counters() -> tuple[float, float]:
            if not args.vllm_counters:
                return (float("nan"), float("nan"))
            found = {m.name: float(getattr(m, "value", 0) or 0) for m in llm.get_metrics()}
            return found.get("vllm:prefix_cache_queries", float("nan")), found.get(
                "vllm:prefix_cache_hits", float("nan")
            )

        for case in warm:
            rec.generate(engine, [case.prompt], args.beam, exclude=[case.seen])
        per_search: list[dict[str, Any]] = []
        for case in timed:
            stats = SearchStats()
            counting.calls.clear()
            q0, h0 = counters()
            start = time.perf_counter()
            rec.generate(counting, [case.prompt], args.beam, stats, [case.seen])
            seconds = time.perf_counter() - start
            q1, h1 = counters()
            if [r for _, r in counting.calls] != stats.rows_scored:
                raise SystemExit("engine calls and SearchStats.rows_scored disagree")
            steps = steps_of(len(case.prompt.token_ids), counting.calls, args.block_size)
            flops = search_flops(shape, steps)
            per_search.append(
                {
                    "prompt_len": len(case.prompt.token_ids),
                    "rows_scored": list(stats.rows_scored),
                    "steps": [
                        {
                            **s.__dict__,
                            "tokens": s.tokens,
                            "flops": sum(step_flops(shape, s).values()),
                        }
                        for s in steps
                    ],
                    "flops": flops,
                    "seconds": seconds,
                    "vllm_tokens_computed": (q1 - q0) - (h1 - h0),
                }
            )

        threads_engine = torch.get_num_threads()
        peak_engine = matmul_gflops([(args.peak_size,) * 3], device)
        # Model-shape throughput at the M of each step of the median search (by FLOPs).
        median_search = sorted(per_search, key=lambda s: s["flops"]["total"])[len(per_search) // 2]
        shape_rows = []
        bound_s = 0.0
        for st in median_search["steps"]:
            m = st["tokens"]
            gflops = matmul_gflops(layer_pairs(shape, m), device)
            layer_flops = 2.0 * shape.layer_weights * m
            bound_s += shape.layers * layer_flops / (gflops * 1e9)
            single = {
                f"({m},{k})@({k},{n})": matmul_gflops([(m, k, n)], device)
                for m, k, n in sorted(set(layer_pairs(shape, m)))
            }
            shape_rows.append(
                {"level": st["level"], "M": m, "layer_gflops": gflops, "matmuls_gflops": single}
            )
    finally:
        engine.close()

    total_flops = sum(s["flops"]["total"] for s in per_search)
    total_s = sum(s["seconds"] for s in per_search)
    achieved = total_flops / total_s / 1e9
    peak = max(peak_before, peak_engine)
    model_tokens = sum(s["flops"]["tokens"] for s in per_search)
    vllm_tokens = sum(s["vllm_tokens_computed"] for s in per_search)
    mf = median_search["flops"]
    median_s = median_search["seconds"]
    return {
        "benchmark": "bench_flops",
        "machine": info,
        "bundle": str(args.bundle),
        "bundle_version": bundle.version,
        "device": device,
        "model": {
            **shape.__dict__,
            "non_embedding_params": shape.non_embedding_params,
            "flops_per_token_linear": 2 * shape.non_embedding_params,
        },
        "settings": {
            "beam_width": args.beam,
            "searches": len(per_search),
            "warmup": len(warm),
            "block_size_assumed": args.block_size,
            "peak_size": args.peak_size,
            "torch_threads_before_vllm": threads_before,
            "torch_threads_with_vllm": threads_engine,
            "vllm_counters": args.vllm_counters,
            "exclude_seen": True,
        },
        "per_search_ms": percentiles([1000.0 * s["seconds"] for s in per_search]),
        "flops_per_search": {
            k: float(np.median([s["flops"][k] for s in per_search]))
            for k in ("linear", "attention", "lm_head", "total", "tokens")
        },
        "tokens_computed": {"model": model_tokens, "vllm_counters": vllm_tokens},
        "median_search": {
            "prompt_len": median_search["prompt_len"],
            "rows_scored": median_search["rows_scored"],
            "steps": median_search["steps"],
            "flops": mf,
            "ms": 1000.0 * median_s,
            "linear_matmul_bound_ms": 1000.0 * bound_s,
            "peak_bound_ms": 1000.0 * mf["total"] / (peak * 1e9),
        },
        "matmul_gflops": {
            "peak_square_before_vllm": peak_before,
            "peak_square_with_vllm": peak_engine,
            "peak": peak,
            "model_shapes": shape_rows,
        },
        "achieved_gflops": achieved,
        "fraction_of_peak": achieved / peak,
    }


def report(r: dict[str, Any]) -> None:
    s, m, ms = r["settings"], r["model"], r["median_search"]
    print(machine_line(r["machine"]))
    print(
        f"bundle {r['bundle_version']}; device {r['device']}; Qwen2 hidden {m['hidden']}, "
        f"intermediate {m['intermediate']}, {m['layers']} layers, {m['heads']} heads "
        f"({m['kv_heads']} kv), vocab {m['vocab']}; {m['non_embedding_params']:,} non-embedding "
        f"params → {m['flops_per_token_linear'] / 1e6:.2f} MFLOP/token + attention"
    )
    print(
        f"{s['searches']} searches (beam {s['beam_width']}, one at a time, history excluded) "
        f"after {s['warmup']} warm-up; prefix-cache block {s['block_size_assumed']} assumed; "
        f"torch threads {s['torch_threads_before_vllm']} before vLLM, "
        f"{s['torch_threads_with_vllm']} with it"
    )
    print(f"median search: prompt {ms['prompt_len']} tokens, rows scored {ms['rows_scored']}")
    print(f"{'level':>5} {'rows':>5} {'row len':>8} {'tail':>5} {'tokens':>7} {'MFLOP':>8}")
    for st in ms["steps"]:
        print(
            f"{st['level']:>5} {st['rows']:>5} {st['length']:>8} {st['tail']:>5} "
            f"{st['tokens']:>7} {st['flops'] / 1e6:>8.2f}"
        )
    f = ms["flops"]
    print(
        f"FLOPs of the median search: {f['total'] / 1e6:.1f} M = linear {f['linear'] / 1e6:.1f} "
        f"+ attention {f['attention'] / 1e6:.1f} + LM head {f['lm_head'] / 1e6:.1f} "
        f"over {int(f['tokens'])} computed tokens"
    )
    tc = r["tokens_computed"]
    print(
        f"tokens computed over all searches: estimate {int(tc['model'])}, vLLM prefix-cache "
        f"counters {tc['vllm_counters']:.0f}"
    )
    mm = r["matmul_gflops"]
    print(f"{'float32 matmul':<44} {'GFLOP/s':>9}")
    print(
        f"{'peak, square ' + str(s['peak_size']) + ' (before vLLM)':<44} "
        f"{mm['peak_square_before_vllm']:9.1f}"
    )
    print(
        f"{'peak, square ' + str(s['peak_size']) + ' (vLLM threads)':<44} "
        f"{mm['peak_square_with_vllm']:9.1f}"
    )
    for row in mm["model_shapes"]:
        label = f"one layer of projections, M={row['M']} (level {row['level']})"
        print(f"{label:<44} {row['layer_gflops']:9.1f}")
        for name, g in row["matmuls_gflops"].items():
            print(f"{'    ' + name:<44} {g:9.1f}")
    p = r["per_search_ms"]
    print(
        f"search time p50 {p['p50']:.1f} ms (median search {ms['ms']:.1f} ms); at the square "
        f"peak its FLOPs take {ms['peak_bound_ms']:.3f} ms, its projections at the measured "
        f"model-shape speed {ms['linear_matmul_bound_ms']:.3f} ms"
    )
    print(
        f"achieved {r['achieved_gflops']:.3f} GFLOP/s (all FLOPs / all search time) = "
        f"{r['fraction_of_peak']:.2%} of the {mm['peak']:.1f} GFLOP/s peak "
        f"(1 / {1 / r['fraction_of_peak']:.0f})"
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--searches", type=int, default=50, help="users searched and timed")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=32, help="vLLM KV block (assumed)")
    parser.add_argument("--peak-size", type=int, default=2048, help="square matmul for the peak")
    parser.add_argument(
        "--vllm-counters",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="enable vLLM's stats to check the token count (small overhead per request)",
    )
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
