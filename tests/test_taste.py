"""Unit tests of taste edits and profiles in `service.taste`, on a six-item hand-built catalog."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from model_store.catalog import Catalog
from service.profiles import ProfileContended, Profiles, StaleRevision
from service.rules import Taste
from service.taste import (
    Share,
    TasteEdits,
    TastePatch,
    TasteSet,
    build_profile,
    parse_edits,
    prompt_history,
    resolve,
    unseen_by_embedding,
)

CATALOG = Catalog(
    uris=[f"ml-100k:movie:{i}" for i in range(1, 7)],
    titles=["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot"],
    kinds=["movie", "movie", "movie", "show", "movie", "movie"],
    sids=["0-0-0", "0-1-0", "1-0-0", "2-0-0", "1-1-0", "2-1-0"],
    genres=[("drama",), ("drama", "romance"), ("comedy",), ("horror",), ("comedy", "drama"), ()],
    creators=["ann", "ann", "bob", "cat", "bob", ""],
    first_code=np.array([0, 0, 1, 2, 1, 2]),
    vectors=np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [1.0, 1.0]]),
    user_ids=["u1"],
    user_rows=[{"age": 30}],
)


def uri(item: int) -> str:
    return CATALOG.uris[item]


def test_apply_moves_a_thing_named_in_one_list_out_of_the_other_two() -> None:
    edits = TasteEdits(
        more=TasteSet(genres=["drama"], items=[uri(0)]),
        less=TasteSet(creators=["bob"]),
        forget=TasteSet(items=[uri(3)], genres=["horror"]),
    )
    patch = TasteEdits(
        more=TasteSet(items=[uri(3)], creators=["bob"]),
        less=TasteSet(genres=["drama"]),
        forget=TasteSet(items=[uri(0)]),
    )
    out = edits.apply(patch)
    assert out.more == TasteSet(creators=["bob"], items=[uri(3)])
    assert out.less == TasteSet(genres=["drama"])
    assert out.forget == TasteSet(genres=["horror"], items=[uri(0)])


def test_apply_merges_in_order_without_duplicates() -> None:
    edits = TasteEdits(more=TasteSet(genres=["drama", "comedy"], items=[uri(1)]))
    patch = TasteEdits(more=TasteSet(genres=["horror", "comedy", "horror"], items=[uri(1)]))
    out = edits.apply(patch)
    assert out.more.genres == ["drama", "comedy", "horror"]
    assert out.more.items == [uri(1)]
    assert edits.more.genres == ["drama", "comedy"]  # the stored edits are not mutated
    assert TasteEdits().apply(TasteEdits()) == TasteEdits()


LISTS = ("none", "more", "less", "forget")


@st.composite
def patches(draw: st.DrawFn) -> TasteEdits:
    """A patch that names each thing in at most one list (what a consistent client sends)."""
    names = {
        "genres": ["drama", "comedy", "horror"],
        "creators": ["ann", "bob"],
        "items": [uri(i) for i in range(4)],
    }
    sets: dict[str, dict[str, list[str]]] = {k: {f: [] for f in names} for k in LISTS}
    for field, pool in names.items():
        for name in draw(st.permutations(pool)):
            sets[draw(st.sampled_from(LISTS))][field].append(name)
    return TasteEdits(**{k: TasteSet(**sets[k]) for k in LISTS[1:]})


@settings(max_examples=200, deadline=None)
@given(st.lists(patches(), min_size=1, max_size=5))
def test_apply_never_leaves_a_thing_in_two_lists(steps: list[TasteEdits]) -> None:
    edits = TasteEdits()
    for patch in steps:
        edits = edits.apply(patch)
        for field in ("genres", "creators", "items"):
            lists = [getattr(s, field) for s in (edits.more, edits.less, edits.forget)]
            for values in lists:
                assert len(values) == len(set(values))
            everything = [v for values in lists for v in values]
            assert len(everything) == len(set(everything)), (field, edits)
    last = steps[-1]
    for kind in ("more", "less", "forget"):
        for field in ("genres", "creators", "items"):
            assert set(getattr(getattr(last, kind), field)) <= set(
                getattr(getattr(edits, kind), field)
            )


@given(patches())
def test_a_consistent_patch_is_accepted_as_sent(patch: TasteEdits) -> None:
    assert TastePatch.model_validate(patch.model_dump()).model_dump() == patch.model_dump()


@pytest.mark.parametrize(
    ("body", "clashes"),
    [
        (
            {"more": {"genres": ["drama"]}, "less": {"genres": ["drama"]}},
            ["genres ['drama'] in both more and less"],
        ),
        (
            {"more": {"creators": ["ann", "bob"]}, "less": {"creators": ["bob", "ann"]}},
            ["creators ['ann', 'bob'] in both more and less"],
        ),
        (
            {"less": {"items": [uri(1)]}, "forget": {"items": [uri(1), uri(2)]}},
            [f"items ['{uri(1)}'] in both less and forget"],
        ),
        (
            {
                "more": {"genres": ["drama"], "items": [uri(0)]},
                "less": {"genres": ["drama"]},
                "forget": {"items": [uri(0)], "genres": ["drama"]},
            },
            [
                "genres ['drama'] in both more and less",
                "genres ['drama'] in both more and forget",
                f"items ['{uri(0)}'] in both more and forget",
                "genres ['drama'] in both less and forget",
            ],
        ),
    ],
)
def test_a_patch_naming_a_thing_in_two_lists_is_refused_by_name(
    body: dict[str, dict[str, list[str]]], clashes: list[str]
) -> None:
    with pytest.raises(ValidationError) as err:
        TastePatch.model_validate(body)
    assert err.value.errors()[0]["msg"] == f"Value error, contradictory edits: {'; '.join(clashes)}"
    TasteEdits.model_validate(body)  # stored edits are read as they are, whatever they hold


def test_parse_edits() -> None:
    assert parse_edits(None) == TasteEdits()
    assert parse_edits("") == TasteEdits()
    stored = TasteEdits(less=TasteSet(genres=["horror"], items=[uri(2)]))
    assert parse_edits(stored.model_dump_json()) == stored
    assert parse_edits("{not json") is None
    assert parse_edits('{"more": {"moods": ["sad"]}}') is None  # unknown field
    assert parse_edits('{"forget": {"items": ["not a uri"]}}') is None


def test_resolve_keeps_known_genres_and_items_only() -> None:
    edits = TasteEdits(
        more=TasteSet(genres=["drama", "jazz"], creators=["zed"], items=[uri(4), "ml-1m:movie:9"]),
        less=TasteSet(genres=["comedy"], creators=["bob"], items=[uri(2)]),
        forget=TasteSet(genres=["horror"], items=[uri(3)]),
    )
    assert resolve(edits, CATALOG) == Taste(
        more_genres=frozenset({"drama"}),
        more_creators=frozenset({"zed"}),
        more_items=frozenset({4}),
        less_genres=frozenset({"comedy"}),
        less_creators=frozenset({"bob"}),
        less_items=frozenset({2}),
        forget_genres=frozenset({"horror"}),
        forget_items=frozenset({3}),
    )
    assert resolve(TasteEdits(), CATALOG) == Taste()


def test_prompt_history_drops_forgotten_and_appends_more_items() -> None:
    edits = TasteEdits(
        more=TasteSet(items=[uri(4), uri(0), "ml-1m:movie:9"]),
        forget=TasteSet(items=[uri(1)], genres=["horror"]),
    )
    assert prompt_history([0, 1, 2, 3], edits, CATALOG) == [0, 2, 4]
    assert prompt_history([5, 2], TasteEdits(), CATALOG) == [5, 2]


def test_what_the_embedding_has_not_seen_is_the_shown_history_after_it() -> None:
    edits = TasteEdits(more=TasteSet(items=[uri(4)]), forget=TasteSet(items=[uri(1)]))
    history = [0, 1, 2, 3]  # the prompt shows [0, 2, 3, 4]
    shown = prompt_history(history, edits, CATALOG)
    unseen = [unseen_by_embedding(shown, history[:k], edits, CATALOG) for k in range(5)]
    assert unseen == [4, 3, 3, 2, 1]
    plain = prompt_history(history, TasteEdits(), CATALOG)
    assert unseen_by_embedding(plain, history, TasteEdits(), CATALOG) == 0


HISTORY = [0, 1, 2, 4, 3, 5]
FORGET = TasteEdits(forget=TasteSet(items=[uri(5)], genres=["romance"]))


def shares(facet: Sequence[Share]) -> list[tuple[str, float]]:
    return [(s.name, s.share) for s in facet]


def test_build_profile_counts_facets_without_forgotten_things() -> None:
    profile = build_profile("u1", CATALOG, HISTORY, None, FORGET, revision=7)
    assert (profile.user_id, profile.revision, profile.edits) == ("u1", 7, FORGET)
    assert shares(profile.top_genres) == [("drama", 0.6), ("comedy", 0.4), ("horror", 0.2)]
    assert shares(profile.top_kinds) == [("movie", 0.8), ("show", 0.2)]
    assert shares(profile.top_creators) == [("ann", 0.4), ("bob", 0.4), ("cat", 0.2)]
    assert [(n.prefix, n.genre, n.share) for n in profile.neighbourhoods] == [
        ("0", "drama", 0.4),
        ("1", "comedy", 0.4),
        ("2", "horror", 0.2),
    ]
    recent = [uri(i) for i in (3, 4, 2, 1, 0)]
    assert [i.uri for i in profile.recent_items] == recent
    assert [i.uri for i in profile.representative_items] == recent  # no embedding: the latest
    assert profile.recent_items[0].title == "Delta"
    assert profile.summary == (
        "5 movies so far, mostly drama, comedy and horror. "
        "Most typical: Delta and Echo. Lately: Delta. Never romance."
    )


def test_build_profile_ranks_representative_items_by_the_embedding() -> None:
    profile = build_profile("u1", CATALOG, HISTORY, np.array([1.0, 0.0]), FORGET, revision=0)
    assert [i.uri for i in profile.representative_items] == [uri(i) for i in (0, 1, 3, 4, 2)]
    assert "Most typical: Alpha and Bravo." in profile.summary


def test_summarise_without_history_and_with_edits() -> None:
    empty = build_profile("u2", CATALOG, [], np.array([1.0, 0.0]), TasteEdits(), revision=0)
    assert empty.summary == "No history yet: recommendations follow context and popularity."
    assert empty.top_genres == empty.representative_items == empty.neighbourhoods == []
    edits = TasteEdits(
        more=TasteSet(genres=["comedy"]), less=TasteSet(genres=["horror", "drama", "romance"])
    )
    profile = build_profile("u3", CATALOG, [0, 2], None, edits, revision=1)
    assert profile.summary == (
        "2 movies so far, mostly drama and comedy. Most typical: Charlie and Alpha. "
        "Lately: Charlie. Asked for more comedy. Asked for less horror, drama and romance."
    )


class _Contended:
    """A store where another writer always gets in between a read and its write."""

    def __init__(self) -> None:
        self.revision = 0

    async def get_edits(self, user: str) -> tuple[int, str | None]:
        return self.revision, None

    async def set_edits(self, user: str, expected: int, edits: str) -> tuple[bool, int]:
        self.revision += 1  # the other writer's
        return False, self.revision


def test_edits_that_keep_losing_to_concurrent_writers_are_a_conflict_not_an_outage() -> None:
    profiles = Profiles(users=None, store=_Contended(), catalog=CATALOG)  # type: ignore[arg-type]
    more = TastePatch(more=TasteSet(genres=["comedy"]))
    with pytest.raises(ProfileContended):  # 409: retry, nothing is down
        asyncio.run(profiles.patch("u1", more, None))
    with pytest.raises(StaleRevision):  # with a revision, the first loss is stale: 412
        asyncio.run(profiles.patch("u1", more, profiles.store.revision))  # type: ignore[union-attr]


def test_a_rewatched_item_is_listed_once() -> None:
    profile = build_profile("u4", CATALOG, [0, 1, 2, 1, 2], np.array([1.0, 0.0]), TasteEdits(), 0)
    assert [p.uri for p in profile.recent_items] == [uri(2), uri(1), uri(0)]  # newest first
    listed = [p.uri for p in profile.representative_items]
    assert len(listed) == len(set(listed)) == 3
