"""The catalog as memory-mapped columns: the same answers as the in-memory lists it replaced,
lookups that a hash collision cannot fool, and an ANN whose answers are scored exactly."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_store import ann
from model_store.bundle import load_bundle
from model_store.catalog import Catalog
from model_store.columns import StringIndex, Strings, fnv1a, fnv1a_many, write_strings
from model_store.recommend import Recommender
from model_store.synthetic import clustered_vectors
from model_store.user_model import retrieval_query


@given(st.lists(st.text(max_size=12), max_size=20))
def test_vectorised_hash_is_the_scalar_hash(values: list[str]) -> None:
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    assert fnv1a_many(blob, offsets).tolist() == [fnv1a(b) for b in encoded]


def test_lookup_checks_the_blob_so_colliding_hashes_find_the_right_row(tmp_path: Path) -> None:
    values = ["ml-100k:movie:1", "synthetic:episode:2", "ünïcode:track:3", ""]
    write_strings(tmp_path, "uri", values, lookup=True)
    column = Strings(tmp_path, "uri")
    assert list(column) == values and column[-1] == ""
    assert [column.find(v) for v in values] == [0, 1, 2, 3]
    assert column.find("ml-100k:movie:2") is None
    # every row given the hash of row 1: only the blob can tell them apart
    np.save(tmp_path / "uri.hash.npy", np.full(4, fnv1a(values[1].encode()), dtype=np.uint64))
    collided = Strings(tmp_path, "uri")
    assert collided.find(values[1]) == 1
    assert collided.find(values[0]) is None  # its true hash is no longer in the index
    index = StringIndex(collided)
    assert values[1] in index and index.get("nope") is None


@pytest.mark.slow
def test_mapped_catalog_answers_as_the_lists_did(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    mapped = Catalog.from_bundle(bundle)
    table = bundle.catalog  # the parquet table the lists were built from before
    lists = Catalog(
        uris=table["uri"].tolist(),
        titles=table["title"].tolist(),
        kinds=table["kind"].tolist(),
        sids=["-".join(str(c) for c in sid) for sid in table["sid"]],
        genres=[tuple(g) for g in table["genres"]],
        creators=[str(c) if isinstance(c, str) else "" for c in table["creator"]],
        first_code=np.stack(table["sid"].to_numpy())[:, 0],
        vectors=np.asarray(bundle.item_vectors, dtype=np.float32),
        user_ids=mapped.user_ids,
        user_rows=mapped.user_rows,
    )
    assert len(mapped) == len(lists) == len(table)
    for column in ("uris", "titles", "kinds", "sids", "genres", "creators"):
        assert list(getattr(mapped, column)) == list(getattr(lists, column)), column
    assert all(mapped.item_index(u) == i for i, u in enumerate(lists.uris))
    assert mapped.indices(["ml-100k:movie:999999", lists.uris[7]]) == [7]
    assert mapped.genre_names == lists.genre_names
    assert mapped.kind_names == lists.kind_names and mapped.creator_names == lists.creator_names
    for genre in lists.genre_names:
        assert mapped.items_by_genre[genre].tolist() == lists.items_by_genre[genre].tolist()
    assert set(mapped.items_by_creator) == set(lists.items_by_creator)
    assert mapped.prefix_genre == lists.prefix_genre
    # nothing per item was copied into the heap: the columns are views of the files
    assert _is_mapped(mapped.vectors) and _is_mapped(mapped.first_code)
    assert not isinstance(mapped.vectors, np.memmap)  # plain views: fast to index
    assert mapped.vectors.dtype == np.float16


@pytest.mark.slow
def test_small_catalogs_keep_the_exact_search(tiny_bundle: Path) -> None:
    """ML-100K is below the ANN size: the fallback equals a flat faiss index."""
    bundle = load_bundle(tiny_bundle)
    rec = Recommender(bundle, with_reranker=False)
    assert rec.search.exact and not (tiny_bundle / ann.INDEX_FILE).exists()
    flat = faiss.IndexFlatIP(bundle.retrieval_vectors.shape[1])
    flat.add(np.ascontiguousarray(bundle.retrieval_vectors, dtype=np.float32))
    for user in range(0, 40, 7):
        embedding = bundle.user_embeddings[user]
        got = rec.nearest(embedding, set(), 50)
        q = retrieval_query(embedding)[None]
        scores, items = flat.search(q, 50)
        assert np.allclose([s.score for s in got], scores[0], atol=1e-5)
        assert len({s.item for s in got} ^ set(items[0].tolist())) <= 2  # ties at the edge only


def test_ivfpq_finds_the_exact_neighbours_and_scores_them_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = clustered_vectors(rng.integers(0, 16, 30_000), 31, seed=1)
    vectors = np.hstack([vectors, rng.normal(0, 0.3, (len(vectors), 1)).astype(np.float32)])
    assert ann.write_index(vectors[:1000], tmp_path) == []  # small: exact, no index file
    faiss.write_index(ann.build_index(vectors), str(tmp_path / ann.INDEX_FILE))
    search = ann.ItemSearch.load(vectors, tmp_path)
    assert not search.exact
    queries = clustered_vectors(rng.integers(0, 16, 20), 31, seed=2, spread=0.8)
    recall = []
    for q in np.hstack([queries, np.ones((20, 1), np.float32)]):
        items, scores = search.search(q, 50)
        truth, _ = ann.exact(vectors, q, 50)
        recall.append(len(set(items.tolist()) & set(truth.tolist())) / 50)
        assert np.allclose(scores, vectors[items] @ q, atol=1e-5)
        assert np.all(np.diff(scores) <= 0)
    assert np.mean(recall) >= 0.95


def _is_mapped(array: np.ndarray) -> bool:
    """Whether `array` lies on a memory map (its own or one of its bases')."""
    base: object = array
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            return True
        base = base.base
    return base is not None and type(base).__name__ == "mmap"
