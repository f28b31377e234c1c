"""SIDTrie against brute force over random Semantic-ID sets."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store.trie import SIDTrie


@st.composite
def sid_sets(draw: st.DrawFn) -> np.ndarray:
    """Distinct SIDs in arbitrary row order; small alphabets force shared prefixes."""
    levels = draw(st.integers(1, 4))
    max_code = draw(st.sampled_from([1, 3, 7, 300]))
    sids = draw(
        st.lists(
            st.tuples(*[st.integers(0, max_code)] * levels), min_size=0, max_size=60, unique=True
        )
    )
    return np.array(sids, dtype=np.int64).reshape(len(sids), levels)


def _prefix_children(codes: np.ndarray) -> dict[tuple[int, ...], list[int]]:
    """Every prefix (length 0..L) of the SIDs -> sorted distinct next codes."""
    out: dict[tuple[int, ...], set[int]] = {}
    for row in codes.tolist():
        for d in range(len(row) + 1):
            out.setdefault(tuple(row[:d]), set())
            if d < len(row):
                out[tuple(row[:d])].add(row[d])
    if not out:
        out[()] = set()
    return {p: sorted(c) for p, c in out.items()}


@settings(max_examples=200, deadline=None)
@given(sid_sets())
def test_trie_matches_brute_force(codes: np.ndarray) -> None:
    trie = SIDTrie.build(codes)
    levels = codes.shape[1]
    assert trie.levels == levels
    assert trie.n_items == len(codes)
    brute = _prefix_children(codes)
    assert trie.n_nodes == len(brute)

    seen_nodes = set()
    for prefix, kids in brute.items():
        node = trie.lookup(prefix)
        assert node is not None
        seen_nodes.add(node)
        assert trie.level_of(node) == len(prefix)
        child_codes, child_nodes = trie.children(node)
        assert child_codes.tolist() == kids
        assert child_nodes.tolist() == [trie.lookup((*prefix, c)) for c in kids]
    assert seen_nodes == set(range(trie.n_nodes))

    for i, row in enumerate(codes.tolist()):
        leaf = trie.lookup(row)
        assert leaf is not None
        assert trie.item_of(leaf) == i
        assert trie.is_valid(row)
        assert len(trie.children(leaf)[0]) == 0
        assert len(trie.children(leaf)[1]) == 0
        assert not trie.is_valid(row[:-1])
        assert not trie.is_valid([*row, 0])


@settings(max_examples=100, deadline=None)
@given(sid_sets(), st.data())
def test_non_members_are_invalid(codes: np.ndarray, data: st.DataObject) -> None:
    trie = SIDTrie.build(codes)
    levels = codes.shape[1]
    members = {tuple(r) for r in codes.tolist()}
    for _ in range(20):
        sid = tuple(data.draw(st.tuples(*[st.integers(-2, 70_000)] * levels)))
        assert trie.is_valid(sid) == (sid in members)
        if sid not in members:
            assert trie.lookup(sid) is None


@settings(max_examples=100, deadline=None)
@given(sid_sets(), st.data())
def test_children_batch_agrees_with_children(codes: np.ndarray, data: st.DataObject) -> None:
    trie = SIDTrie.build(codes)
    nodes = np.array(
        data.draw(st.lists(st.integers(0, trie.n_nodes - 1), max_size=40)), dtype=np.int64
    )
    rows, child_codes, child_nodes = trie.children_batch(nodes)
    expect_rows: list[int] = []
    expect_codes: list[int] = []
    expect_nodes: list[int] = []
    for r, n in enumerate(nodes.tolist()):
        c, k = trie.children(n)
        expect_rows += [r] * len(c)
        expect_codes += c.tolist()
        expect_nodes += k.tolist()
    assert rows.tolist() == expect_rows
    assert child_codes.tolist() == expect_codes
    assert child_nodes.tolist() == expect_nodes


@settings(max_examples=50, deadline=None)
@given(sid_sets())
def test_save_load_round_trip(codes: np.ndarray) -> None:
    trie = SIDTrie.build(codes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trie.bin"  # any name: save must not append ".npz"
        trie.save(path)
        loaded = SIDTrie.load(path)
    assert loaded == trie
    assert loaded.nbytes == trie.nbytes
    for i, row in enumerate(codes.tolist()):
        leaf = loaded.lookup(row)
        assert leaf is not None and loaded.item_of(leaf) == i


def test_build_is_independent_of_row_order() -> None:
    rng = np.random.default_rng(3)
    codes = np.unique(rng.integers(0, 4, size=(200, 3)), axis=0)
    perm = rng.permutation(len(codes))
    a, b = SIDTrie.build(codes), SIDTrie.build(codes[perm])
    for i, row in enumerate(codes[perm].tolist()):
        leaf = b.lookup(row)
        assert leaf is not None and leaf == a.lookup(row)
        assert b.item_of(leaf) == i


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[1, 2], [1, 2]]),  # duplicate rows
        np.array([[0, 1, 2], [3, 4, 5], [0, 1, 2]]),
        np.array([[0, -1]]),  # negative code
        np.array([1, 2, 3]),  # not 2-D
        np.zeros((3, 0), dtype=np.int64),  # no levels
        np.zeros((2, 2, 2), dtype=np.int64),
        np.array([[0.5, 1.0]]),  # not integers
    ],
)
def test_invalid_input_raises(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        SIDTrie.build(bad)


def test_item_of_rejects_internal_nodes_and_children_bounds() -> None:
    trie = SIDTrie.build(np.array([[0, 1], [2, 3]]))
    with pytest.raises(ValueError):
        trie.item_of(0)
    with pytest.raises(ValueError):
        trie.item_of(trie.n_nodes)
    with pytest.raises(IndexError):
        trie.children(trie.n_nodes)
    with pytest.raises(IndexError):
        trie.children(-1)


def test_compact_dtypes_and_views() -> None:
    rng = np.random.default_rng(0)
    small = np.unique(rng.integers(0, 256, size=(5000, 4)), axis=0)
    trie = SIDTrie.build(small)
    codes, nodes = trie.children(0)
    assert codes.dtype == np.uint8
    assert nodes.dtype == np.int64
    assert not codes.flags.writeable  # a view into the trie, which callers must not mutate
    assert codes.base is not None
    # bytes: one code per node, one offset per internal node, one item id per leaf
    assert trie.nbytes <= 1 * trie.n_nodes + 4 * (trie.n_nodes - trie.n_items + 1) + 4 * len(
        small
    ) + 8 * (trie.levels + 2)
    wide = SIDTrie.build(np.array([[0, 300], [1, 2]]))
    assert wide.children(0)[0].dtype == np.uint16
    assert wide.lookup([0, 300]) is not None


def test_empty_catalogue() -> None:
    trie = SIDTrie.build(np.zeros((0, 3), dtype=np.int64))
    assert trie.n_items == 0
    assert trie.lookup([]) == 0
    assert trie.lookup([0]) is None
    assert len(trie.children(0)[0]) == 0
    rows, codes, nodes = trie.children_batch(np.array([0, 0]))
    assert len(rows) == len(codes) == len(nodes) == 0


@settings(max_examples=80, deadline=None)
@given(sid_sets(), st.data())
def test_blocked_nodes_are_the_nodes_with_only_excluded_items(
    codes: np.ndarray, data: st.DataObject
) -> None:
    if not len(codes):
        return
    trie = SIDTrie.build(codes)
    items = data.draw(st.sets(st.integers(0, len(codes) - 1)))
    want = set()
    for depth in range(1, codes.shape[1] + 1):
        for prefix in {tuple(r[:depth]) for r in codes.tolist()}:
            members = {i for i, r in enumerate(codes.tolist()) if tuple(r[:depth]) == prefix}
            if members <= items:
                want.add(trie.lookup(prefix))
    got = trie.blocked_nodes(items)
    assert list(got) == sorted(want)
