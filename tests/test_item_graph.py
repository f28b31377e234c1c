"""The item graph against a dense computation written from its definition: which items
follow which, which share users, each row cut to its strongest neighbours, and the two
scores the reranker reads, also after a round trip through the bundle's files."""

from __future__ import annotations

import mmap
from pathlib import Path
from unittest.mock import patch

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store import item_graph
from model_store.item_graph import build_item_graph, load_item_graph, save_item_graph

N_ITEMS = 12

sequences = st.lists(
    st.lists(st.integers(0, N_ITEMS - 1), min_size=1, max_size=15).map(np.array),
    min_size=1,
    max_size=12,
)


def _dense_transitions(seqs: list[np.ndarray]) -> np.ndarray:
    counts = np.zeros((N_ITEMS, N_ITEMS))
    for seq in seqs:
        for step, weight in enumerate(item_graph.FOLLOW_WEIGHTS, start=1):
            for a, b in zip(seq[:-step], seq[step:], strict=True):
                counts[a, b] += weight
    return counts / (counts.sum(axis=1, keepdims=True) + item_graph.SMOOTHING)


def _dense_cosine(seqs: list[np.ndarray]) -> np.ndarray:
    has = np.zeros((len(seqs), N_ITEMS))
    for user, seq in enumerate(seqs):
        has[user, seq] = 1.0
    shared = has.T @ has
    norms = np.sqrt(np.diag(shared))
    norms[norms == 0] = 1.0
    cosine = shared / norms[:, None] / norms[None, :]
    np.fill_diagonal(cosine, 0.0)
    return cosine


@settings(max_examples=60, deadline=None)
@given(seqs=sequences, k=st.integers(1, 5), budget=st.sampled_from([1.0, 40.0, 2e7]))
def test_each_table_keeps_the_strongest_neighbours_of_its_definition(
    seqs: list[np.ndarray], k: int, budget: float
) -> None:
    with patch.object(item_graph, "ENTRY_BUDGET", budget):  # one item per block, a few, all
        graph = build_item_graph(seqs, N_ITEMS, k)
    for built, dense in (
        (graph.transitions, _dense_transitions(seqs)),
        (graph.cooccurrence, _dense_cosine(seqs)),
    ):
        kept = built.toarray()
        assert np.allclose(kept[kept > 0], dense[kept > 0], atol=1e-6)  # true values ...
        for row, values in zip(kept, dense, strict=True):  # ... and the row's k largest
            strongest = np.sort(values[values > 0])[::-1][:k]
            assert np.allclose(np.sort(row[row > 0])[::-1], strongest, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    seqs=sequences,
    history=st.lists(st.integers(0, N_ITEMS - 1), min_size=1, max_size=25).map(np.array),
    candidates=st.sets(st.integers(0, N_ITEMS - 1), min_size=1).map(
        lambda s: np.array(sorted(s))[::-1].copy()
    ),
)
def test_the_scores_read_the_history_as_defined(
    seqs: list[np.ndarray], history: np.ndarray, candidates: np.ndarray
) -> None:
    graph = build_item_graph(seqs, N_ITEMS, N_ITEMS)  # nothing cut: the dense tables
    transitions, cosine = _dense_transitions(seqs), _dense_cosine(seqs)
    recent = history[::-1][: len(item_graph.RECENT_WEIGHTS)]
    expected = sum(
        w * transitions[item, candidates]
        for w, item in zip(item_graph.RECENT_WEIGHTS, recent, strict=False)
    )
    assert np.allclose(
        graph.transition_score(history, candidates), np.log(expected + item_graph.FLOOR), atol=1e-5
    )
    latest = history[-item_graph.COOCCURRENCE_HISTORY :]
    assert np.allclose(
        graph.cooccurrence_score(history, candidates),
        cosine[latest][:, candidates].mean(axis=0),
        atol=1e-6,
    )


def test_the_bundle_files_give_back_the_same_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, N_ITEMS, size=rng.integers(2, 20)) for _ in range(30)]
    graph = build_item_graph(seqs, N_ITEMS, 4)
    assert load_item_graph(tmp_path) is None  # a bundle built before the graph
    save_item_graph(graph, tmp_path)
    loaded = load_item_graph(tmp_path)
    assert loaded is not None
    history, candidates = np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6, 5])
    assert np.array_equal(
        loaded.transition_score(history, candidates), graph.transition_score(history, candidates)
    )
    assert np.array_equal(
        loaded.cooccurrence_score(history, candidates),
        graph.cooccurrence_score(history, candidates),
    )


def test_the_loaded_tables_stay_mapped(tmp_path: Path) -> None:
    save_item_graph(build_item_graph([np.array([0, 1, 2, 3])], N_ITEMS, 3), tmp_path)
    loaded = load_item_graph(tmp_path)
    assert loaded is not None
    for table in (loaded.transitions, loaded.cooccurrence):
        for part in (table.data, table.indices, table.indptr):  # no copy in the heap
            assert _file_backed(part)


def _file_backed(array: object) -> bool:
    while array is not None:
        if isinstance(array, np.memmap | mmap.mmap):
            return True
        array = getattr(array, "base", None)
    return False
