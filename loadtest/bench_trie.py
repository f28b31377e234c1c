"""Benchmark of the Semantic-ID trie at catalogue scale (build time, bytes/item, latencies).

Synthetic SIDs mimic residual-quantisation output: a skewed (Zipf) first level, inner levels
whose skewed distribution depends on the parent code, and a final uniqueness level (the rank
of the item among items sharing the other codes), so the last level only disambiguates.

    python -m loadtest.bench_trie --items 1000000 10000000
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_store.trie import SIDTrie


def _zipf_draw(rng: np.random.Generator, n: int, k: int, skew: float) -> np.ndarray:
    """n codes in [0, k) with P(c) proportional to 1 / (c + 1) ** skew."""
    p = 1.0 / np.arange(1, k + 1, dtype=np.float64) ** skew
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(n), side="right").astype(np.int64)


def clustered_sids(
    n: int, levels: int, k: int, skew: float, inner_skew: float, seed: int
) -> np.ndarray:
    """(n, levels) distinct SIDs: RQ-like codes for levels-1 levels plus a uniqueness level."""
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, levels), dtype=np.int64)
    codes[:, 0] = _zipf_draw(rng, n, k, skew)
    for level in range(1, levels - 1):
        # A parent-dependent rotation makes each cluster favour different child codes.
        rotation = (codes[:, level - 1] * 2654435761 + level * 40503) % k
        codes[:, level] = (_zipf_draw(rng, n, k, inner_skew) + rotation) % k
    if levels == 1:
        codes[:, 0] = np.arange(n)
        return codes
    key = np.zeros(n, dtype=np.int64)
    for level in range(levels - 1):
        key = key * k + codes[:, level]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    group_start = np.searchsorted(sorted_key, sorted_key, side="left")
    codes[order, levels - 1] = np.arange(n) - group_start
    return codes


def _per_call_us(fn: Callable[[Any], object], args: Sequence[Any], repeats: int = 3) -> float:
    """Mean time of fn(a) over args in µs (Python call overhead included), best of `repeats`.

    The best pass is the least disturbed by other processes on a shared machine.
    """
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in args:
            fn(a)
        best = min(best, time.perf_counter() - t0)
    return best / len(args) * 1e6


def bench(n: int, levels: int, k: int, skew: float, inner_skew: float, seed: int) -> None:
    """Build one trie of n items and print its figures."""
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    codes = clustered_sids(n, levels, k, skew, inner_skew, seed)
    gen_s = time.perf_counter() - t0
    print(f"\n== {n:,} items x {levels} levels, {k} codes/level (generated in {gen_s:.1f} s)")
    print(
        f"   codes used per level: {[len(np.unique(codes[:, lv])) for lv in range(levels)]}, "
        f"uniqueness level size {int(codes[:, -1].max()) + 1}"
    )

    gc.collect()
    t0 = time.perf_counter()
    trie = SIDTrie.build(codes)
    build_s = time.perf_counter() - t0
    n_internal = trie.n_nodes - trie.n_items
    print(f"   build: {build_s:.2f} s  ({build_s / n * 1e9:.0f} ns/item)")
    print(
        f"   nodes: {trie.n_nodes:,} ({n_internal:,} internal); "
        f"arrays {trie.nbytes / 2**20:.1f} MiB = {trie.nbytes / n:.2f} bytes/item"
    )

    samples = 100_000
    internal = [int(x) for x in rng.integers(0, n_internal, size=samples)]
    noop_us = _per_call_us(lambda node: None, internal)
    children_us = _per_call_us(trie.children, internal)
    mean_kids = float(np.mean([len(trie.children(x)[0]) for x in internal[:10_000]]))
    print(
        f"   children(): {children_us:.3f} µs/call over {samples:,} random internal nodes "
        f"(mean {mean_kids:.1f} children; bare Python call {noop_us:.3f} µs)"
    )

    batch = rng.integers(0, n_internal, size=(200, 1024))
    batch_s = _per_call_us(trie.children_batch, list(batch)) / 1e6
    mean_batch_kids = float(np.mean([len(trie.children_batch(b)[0]) for b in batch]))
    print(
        f"   children_batch(1024 nodes): {batch_s * 1e6:.0f} µs/batch = "
        f"{batch_s / 1024 * 1e9:.0f} ns/node ({mean_batch_kids:.0f} children)"
    )

    members = [[int(c) for c in codes[i]] for i in rng.integers(0, n, size=samples)]
    lookup_us = _per_call_us(trie.lookup, members)
    strangers = [[int(c) for c in row] for row in rng.integers(0, k, size=(samples, levels))]
    miss_us = _per_call_us(trie.lookup, strangers)
    hits = sum(trie.is_valid(s) for s in strangers)
    print(
        f"   lookup(full SID): {lookup_us:.3f} µs (member), {miss_us:.3f} µs (random SID, "
        f"{hits / samples:.1%} of them valid)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trie.npz"
        t0 = time.perf_counter()
        trie.save(path)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = SIDTrie.load(path)
        load_s = time.perf_counter() - t0
        size = path.stat().st_size
    assert loaded.n_nodes == trie.n_nodes
    print(f"   save {save_s:.2f} s, load {load_s:.2f} s, file {size / 2**20:.1f} MiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"   process peak RSS so far: {peak:.2f} GiB")


def main() -> None:
    """Parse arguments and run one benchmark per catalogue size."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codes", type=int, default=256, help="codes per level")
    parser.add_argument("--skew", type=float, default=1.0, help="Zipf exponent, level 0")
    parser.add_argument("--inner-skew", type=float, default=0.2, help="Zipf exponent, inner")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for n in args.items:
        bench(n, args.levels, args.codes, args.skew, args.inner_skew, args.seed)


if __name__ == "__main__":
    main()
