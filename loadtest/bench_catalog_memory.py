"""Catalog memory of one gateway process, before and after the mapped catalog, and the
fallback ANN's recall against the exact search.

    python loadtest/bench_catalog_memory.py generate --items 1000000 --out DIR
    python loadtest/bench_catalog_memory.py load DIR --mode after   # or before
    python loadtest/bench_catalog_memory.py recall DIR --queries 50
    python loadtest/bench_catalog_memory.py precision BUNDLE        # float16 vs float32

`generate` writes the per-item files a bundle holds for a synthetic catalog of N items
(`synthetic.catalog_items`: titles, kinds, creators, genres; clustered item and content
vectors; the IVF-PQ index above the exact-search size); no LLM is trained, as the catalog
and ANN files are what a gateway holds per item. `load` runs in a fresh process: it loads
the catalog and the fallback's tables the way the gateway does (`Catalog.from_bundle`,
`recommend.item_table`, `ItemSearch.load`), answers a few lookups and searches, and reports
RSS and the anonymous (heap) part of it from /proc/self/smaps_rollup, the part no file
backs and no other process shares. `--mode before` loads the same files the way the code
before the mapped catalog did: the catalog of that version (read from git at `--ref`, by
default HEAD) over the parquet table, float32 arrays read whole, a flat faiss index and a float32
genre matrix, as that version's `Recommender.__init__` built them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from model_store import ann, synthetic
from model_store.bundle import ITEMS_DIR, Bundle, bundle_files, sha256_file
from model_store.catalog import Catalog, single_codes, write_items
from model_store.recommend import genre_matrix, item_table
from model_store.trie import SIDTrie
from model_store.user_model import retrieval_query
from service.rules import load_availability

ROOT = Path(__file__).resolve().parents[1]
DIM, CONTENT_DIM, CLUSTERS, TEMPERATURE = 64, 384, 32, 0.05


def memory() -> dict[str, int]:
    """kB figures of this process: RSS and its anonymous and file-backed parts."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------- generate


def generate(n: int, out: Path, seed: int = 0, before: bool = False) -> dict[str, Any]:
    """The per-item files of a bundle for a synthetic catalog of `n` items."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    items, cluster = synthetic.catalog_items(n, CLUSTERS, seed)
    rng = np.random.default_rng(seed)
    popularity = np.minimum(rng.zipf(1.5, n), 1_000_000).astype(np.int64)
    codes = _unique_codes(rng, n)
    genres = _genre_codes(items["genres"])
    write_items(
        out / ITEMS_DIR,
        uris=pa.array(items["uri"]),
        titles=pa.array(items["title"]),
        kinds=single_codes(items["kind"]),
        creators=single_codes(items["creator"]),
        genres=genres,
        year=items["year"].to_numpy(dtype=np.float32),
        popularity=popularity,
        sid_tokens=codes + np.arange(4) * 256 + 100,
    )
    np.save(out / "sid_codes.npy", codes)
    SIDTrie.build(codes).save(out / "sid_trie.npz")
    pd.DataFrame({"user_id": ["0"], "age": [30]}).to_parquet(out / "users.parquet")
    (out / "user_model.json").write_text(json.dumps({"temperature": TEMPERATURE}))
    written = time.perf_counter()

    vectors = np.lib.format.open_memmap(out / "item_embeddings.npy", "w+", np.float16, (n, DIM))
    synthetic.clustered_vectors(cluster, DIM, seed=seed + 1, out=vectors)
    retrieval = np.lib.format.open_memmap(
        out / "item_retrieval.npy", "w+", np.float32, (n, DIM + 1)
    )
    log_pop = np.log1p(popularity)
    prior = 0.05 * (log_pop - log_pop.mean()) / log_pop.std() * 0.01  # scale of a trained prior
    for lo in range(0, n, 1 << 20):
        retrieval[lo : lo + (1 << 20), :DIM] = vectors[lo : lo + (1 << 20)]
        retrieval[lo : lo + (1 << 20), DIM] = prior[lo : lo + (1 << 20)]
    retrieval.flush()
    content = np.lib.format.open_memmap(
        out / "content_vectors.npy", "w+", np.float16, (n, CONTENT_DIM)
    )
    synthetic.clustered_vectors(cluster, CONTENT_DIM, seed=seed + 2, out=content)
    content.flush()
    vectors_done = time.perf_counter()
    index_files = ann.write_index(retrieval, out, seed)
    index_done = time.perf_counter()
    if before:  # the table the previous catalog was read from
        frame = items[["item_id", "uri", "title", "kind", "creator", "year"]].copy()
        frame["genres"] = items["genres"].str.split(" ")
        frame["popularity"] = popularity
        frame["sid"] = list(codes)
        frame.to_parquet(out / "catalog.parquet")
    sizes = {p: (out / p).stat().st_size for p in bundle_files(out)}
    return {
        "items": n,
        "columns_s": round(written - start, 1),
        "vectors_s": round(vectors_done - written, 1),
        "ann_build_s": round(index_done - vectors_done, 1),
        "ann": index_files or "exact",
        "bytes_on_disk": sum(sizes.values()),
        "bytes_per_item_on_disk": round(sum(sizes.values()) / n, 1),
    }


def _genre_codes(text: pd.Series) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Facet codes from space-separated genre text, vectorised over the few distinct texts."""
    which, uniques = pd.factorize(text)
    names: dict[str, int] = {}
    per_text = [[names.setdefault(g, len(names)) for g in str(u).split()] for u in uniques]
    lengths = np.array([len(p) for p in per_text], dtype=np.int64)
    padded = np.full((len(per_text), max(lengths.max(initial=0), 1)), -1, dtype=np.int64)
    for row, p in enumerate(per_text):
        padded[row, : len(p)] = p
    rows = padded[which]
    return list(names), rows[rows >= 0], lengths[which]


def _unique_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Distinct 4-level Semantic IDs (3 levels of 256 codes and a disambiguating one)."""
    first = rng.integers(0, 256, size=(n, 3))
    key = (first[:, 0] << 16) | (first[:, 1] << 8) | first[:, 2]
    order = np.argsort(key, kind="stable")
    rank = np.arange(n) - np.searchsorted(key[order], key[order])
    last = np.empty(n, dtype=np.int64)
    last[order] = rank
    return np.hstack([first, last[:, None]]).astype(np.int64)


# -------------------------------------------------------------------------------- load


def load_after(directory: Path) -> dict[str, Any]:
    """As the gateway loads a bundle now: mapped columns, mapped index."""
    bundle = Bundle(directory, verified=False)
    catalog = Catalog.from_bundle(bundle)
    table = item_table(bundle)
    order = bundle.item_array("popular_order")
    search = ann.ItemSearch.load(bundle.retrieval_vectors, directory)
    return {"catalog": catalog, "table": table, "popular": order, "search": search}


def _old_catalog_class(ref: str) -> Any:
    """The `Catalog` class of an earlier commit, loaded from git into a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:model_store/catalog.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = ModuleType("old_catalog")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{ref}:model_store/catalog.py", "exec"), module.__dict__)
    return module.Catalog


def load_before(directory: Path, ref: str) -> dict[str, Any]:
    """As the gateway loaded a bundle before: lists from the parquet table, float32 arrays
    read whole (the files were float32 then), a flat index holding a copy of the vectors."""
    import faiss

    from model_store.reranker import ItemTable

    frame = pd.read_parquet(directory / "catalog.parquet")
    users = pd.read_parquet(directory / "users.parquet")
    sid_codes = np.load(directory / "sid_codes.npy")
    vectors = np.load(directory / "item_embeddings.npy").astype(np.float32)
    retrieval = np.load(directory / "item_retrieval.npy")
    content = np.load(directory / "content_vectors.npy").astype(np.float32)
    shim = SimpleNamespace(catalog=frame, users=users, sid_codes=sid_codes, item_vectors=vectors)
    catalog = _old_catalog_class(ref).from_bundle(shim)
    # the per-item part of that version's Recommender.__init__, line for line
    genres, _ = genre_matrix([list(g) for g in frame["genres"]])
    popularity = frame["popularity"].to_numpy(dtype=np.float64)
    table = ItemTable(
        vectors=vectors,
        content=content,
        genres=genres,
        log_popularity=np.log1p(popularity).astype(np.float32),
        year=frame["year"].to_numpy(dtype=np.float32),
        prior=retrieval[:, -1],
    )
    order = np.argsort(-popularity, kind="stable")
    index = faiss.IndexFlatIP(retrieval.shape[1])
    index.add(np.ascontiguousarray(retrieval, dtype=np.float32))
    return {"catalog": catalog, "table": table, "popular": order, "index": index, "frame": frame}


def requests(parts: dict[str, Any], n_queries: int = 20, seed: int = 1) -> float:
    """What requests touch: URI lookups, titles and genres, ANN searches, table rows."""
    catalog, table = parts["catalog"], parts["table"]
    rng = np.random.default_rng(seed)
    n = len(catalog)
    start = time.perf_counter()
    for i in rng.integers(0, n, 200).tolist():
        assert catalog.item_index(catalog.uris[i]) == i
        _ = (catalog.titles[i], catalog.genres[i], catalog.creators[i], catalog.sids[i])
    users = synthetic.clustered_vectors(rng.integers(0, CLUSTERS, n_queries), DIM, seed=7)
    for u in users:
        q = retrieval_query(u)
        if "search" in parts:
            items, _ = parts["search"].search(q, 50)
        else:
            _, found = parts["index"].search(q[None], 50)
            items = found[0]
        _ = np.asarray(table.vectors[np.sort(items)], dtype=np.float32) @ u
    _ = catalog.items_by_genre.get(next(iter(catalog.genre_names)))
    return (time.perf_counter() - start) / n_queries


def measure(directory: Path, mode: str, ref: str) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(1)
    base = memory()
    start = time.perf_counter()
    parts = load_after(directory) if mode == "after" else load_before(directory, ref)
    loaded_s = time.perf_counter() - start
    loaded = memory()
    per_request_s = requests(parts)
    served = memory()
    n = len(parts["catalog"])
    # other per-item tables a gateway holds, outside this change: the rules' availability
    # lists and the SID trie (with the arrays its exclusion of consumed items builds)
    availability = load_availability(None, parts["catalog"].uri_index, n)
    with_rules = memory()
    trie = SIDTrie.load(directory / "sid_trie.npz")
    trie.blocked_nodes([0, 1, 2])
    with_trie = memory()
    del availability, trie

    def beyond(m: dict[str, int], key: str) -> float:
        return (m[key] - base[key]) * 1024 / n

    return {
        "mode": mode,
        "items": n,
        "load_s": round(loaded_s, 2),
        "rss_mib_loaded": round(loaded["Rss"] / 1024),
        "anon_mib_loaded": round((loaded["Anonymous"] - base["Anonymous"]) / 1024),
        "anon_bytes_per_item_loaded": round(beyond(loaded, "Anonymous"), 1),
        "rss_mib_after_requests": round(served["Rss"] / 1024),
        "anon_bytes_per_item_after_requests": round(beyond(served, "Anonymous"), 1),
        "file_backed_mib_after_requests": round((served["Rss"] - served["Anonymous"]) / 1024),
        "ms_per_ann_request": round(per_request_s * 1000, 2),
        "rules_availability_anon_bytes_per_item": round(
            (with_rules["Anonymous"] - served["Anonymous"]) * 1024 / n, 1
        ),
        "sid_trie_anon_bytes_per_item": round(
            (with_trie["Anonymous"] - with_rules["Anonymous"]) * 1024 / n, 1
        ),
    }


def checksums(directory: Path) -> dict[str, Any]:
    """What verifying every file's sha256 at load costs (cold page cache not forced)."""
    start = time.perf_counter()
    total = 0
    for name in bundle_files(directory):
        sha256_file(directory / name)
        total += (directory / name).stat().st_size
    seconds = time.perf_counter() - start
    return {"bytes": total, "sha256_s": round(seconds, 1), "mb_per_s": round(total / seconds / 1e6)}


# ------------------------------------------------------------------------------ recall


def recall(directory: Path, queries: int, seed: int = 3) -> dict[str, Any]:
    """Recall@50 of the IVF-PQ search (with its exact rescoring) against the exact scan."""
    import faiss

    faiss.omp_set_num_threads(1)
    bundle = Bundle(directory, verified=False)
    vectors = bundle.retrieval_vectors
    search = ann.ItemSearch.load(vectors, directory)
    rng = np.random.default_rng(seed)
    users = synthetic.clustered_vectors(rng.integers(0, CLUSTERS, queries), DIM, seed=seed)
    found, exact_s, ann_s = [], 0.0, 0.0
    for u in users:
        q = retrieval_query(u)
        t0 = time.perf_counter()
        truth, _ = ann.exact(vectors, q, 50)
        t1 = time.perf_counter()
        got, _ = search.search(q, 50)
        ann_s += time.perf_counter() - t1
        exact_s += t1 - t0
        found.append(len(set(truth.tolist()) & set(got.tolist())) / 50)
    return {
        "items": len(vectors),
        "index": "exact" if search.exact else _describe(search),
        "recall_at_50": round(float(np.mean(found)), 4),
        "recall_at_50_min": round(float(np.min(found)), 4),
        "ms_ann": round(ann_s / queries * 1000, 2),
        "ms_exact": round(exact_s / queries * 1000, 1),
    }


def _describe(search: ann.ItemSearch) -> str:
    import faiss

    assert search.index is not None
    ivf = faiss.extract_index_ivf(search.index)
    pq = f"PQ{ivf.code_size}x8"
    pool = max(ann.POOL_MIN, ivf.ntotal // ann.POOL_SHARE)
    return f"IVF{ivf.nlist},{pq} nprobe={ivf.nprobe}, {pool} candidates rescored exactly"


# --------------------------------------------------------------------------- precision


def precision(directory: Path) -> dict[str, Any]:
    """float16 against float32 per-item vectors on a real bundle whose files are float32
    (built before the change): the fallback's top 50, the reranker's features and its
    order, and the user-model ANN's NDCG@10 on the holdout."""
    from model_store.reranker import FEATURES, ItemTable, candidate_features, load_reranker, rerank

    frame = pd.read_parquet(directory / "catalog.parquet")
    genres, _ = genre_matrix([list(g) for g in frame["genres"]])
    retrieval = np.load(directory / "item_retrieval.npy")
    r32 = np.asarray(retrieval, dtype=np.float32)
    t32 = ItemTable(
        vectors=np.load(directory / "item_embeddings.npy").astype(np.float32),
        content=np.load(directory / "content_vectors.npy").astype(np.float32),
        genres=genres,
        log_popularity=np.log1p(frame["popularity"].to_numpy(np.float64)).astype(np.float32),
        year=frame["year"].to_numpy(dtype=np.float32),
        prior=r32[:, -1],
    )
    half = {
        "vectors": t32.vectors.astype(np.float16),
        "content": t32.content.astype(np.float16),
    }
    t16 = ItemTable(**{**t32.__dict__, **half})
    r16 = r32.astype(np.float16)
    histories = np.load(directory / "histories.npz")
    offsets, flat = histories["offsets"], histories["items"]
    embeddings = np.load(directory / "user_embeddings.npy")
    holdout = np.load(directory / "holdout.npy") if (directory / "holdout.npy").exists() else None
    manifest = json.loads((directory / "manifest.json").read_text())
    reranker = load_reranker(directory / "reranker.txt", manifest.get("reranker", {}).get("base"))
    overlap_r16: list[float] = []
    overlap_v: list[float] = []
    same_order: list[bool] = []
    top10: list[float] = []
    ndcg: dict[str, list[float]] = {"32": [], "16": []}
    feature_diff = np.zeros(len(FEATURES))
    for user in range(len(offsets) - 1):
        history = flat[offsets[user] : offsets[user + 1]].tolist()
        u = np.asarray(embeddings[user], dtype=np.float32)
        q = retrieval_query(u)
        seen = set(history)
        a = [i for i in ann.exact(r32, q, 50 + len(seen))[0].tolist() if i not in seen][:50]
        b = [i for i in ann.exact(r16, q, 50 + len(seen))[0].tolist() if i not in seen][:50]
        overlap_r16.append(len(set(a) & set(b)) / 50)
        if holdout is not None and holdout[user] >= 0:
            for key, got in (("32", a), ("16", b)):
                rank = got.index(int(holdout[user])) if int(holdout[user]) in got[:10] else None
                ndcg[key].append(0.0 if rank is None else 1.0 / np.log2(rank + 2))
        lp = np.linspace(-1, -5, len(a)).tolist()
        x32 = candidate_features(t32, u, history, a, lp)
        x16 = candidate_features(t16, u, history, a, lp)
        feature_diff = np.maximum(feature_diff, np.nanmax(np.abs(x32 - x16), axis=0))
        o32, _ = rerank(reranker, x32)
        o16, _ = rerank(reranker, x16)
        same_order.append(bool(np.array_equal(o32, o16)))
        top10.append(len(set(o32[:10].tolist()) & set(o16[:10].tolist())) / 10)
        v32 = np.asarray(t32.vectors, np.float32) @ u
        v16 = np.asarray(half["vectors"], np.float32) @ u
        overlap_v.append(len(set(np.argsort(-v32)[:50]) & set(np.argsort(-v16)[:50])) / 50)
    return {
        "users": len(offsets) - 1,
        "retrieval_f16_top50_overlap": round(float(np.mean(overlap_r16)), 4),
        "retrieval_f16_top50_overlap_min": round(float(np.min(overlap_r16)), 4),
        "item_vectors_f16_top50_overlap": round(float(np.mean(overlap_v)), 4),
        "ann_ndcg10_f32": round(float(np.mean(ndcg["32"])), 4) if ndcg["32"] else None,
        "ann_ndcg10_f16": round(float(np.mean(ndcg["16"])), 4) if ndcg["16"] else None,
        "max_feature_abs_diff": dict(
            zip(FEATURES, np.round(feature_diff, 6).tolist(), strict=True)
        ),
        "reranker_same_order_share": round(float(np.mean(same_order)), 4),
        "reranker_top10_overlap": round(float(np.mean(top10)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--items", type=int, required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--before", action="store_true", help="also write the parquet table")
    ld = sub.add_parser("load")
    ld.add_argument("directory", type=Path)
    ld.add_argument("--mode", choices=("before", "after"), default="after")
    ld.add_argument("--ref", default="HEAD", help="git revision of the 'before' catalog")
    ck = sub.add_parser("checksums")
    ck.add_argument("directory", type=Path)
    rc = sub.add_parser("recall")
    rc.add_argument("directory", type=Path)
    rc.add_argument("--queries", type=int, default=50)
    pr = sub.add_parser("precision")
    pr.add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.command == "generate":
        result = generate(args.items, args.out, before=args.before)
    elif args.command == "load":
        result = measure(args.directory, args.mode, args.ref)
    elif args.command == "checksums":
        result = checksums(args.directory)
    elif args.command == "recall":
        result = recall(args.directory, args.queries)
    else:
        result = precision(args.directory)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
