"""Unit tests of the business rules in `service.rules`: pure functions on hand-made candidates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.rules import (
    RULE_NAMES,
    Candidate,
    ItemFacts,
    RuleInput,
    Rules,
    Taste,
    age,
    availability,
    diversity,
    exclude,
    feedback,
    load_availability,
    no_repeats,
    taste,
)

# item:      0              1              2                 3        4          5
GENRES = [("drama",), ("drama",), ("comedy", "drama"), ("horror",), ("comedy",), ()]
CREATORS = ["ann", "ann", "ann", "bob", "", "bob"]
FACTS = ItemFacts(
    genres=GENRES,
    creators=CREATORS,
    markets=[None, frozenset({"US"}), frozenset({"US", "DE"}), None, frozenset({"FR"}), None],
    min_age=np.array([0, 0, 13, 18, 0, 7]),
)


def cands(*items: int) -> list[Candidate]:
    return [Candidate(item=i, score=-float(n), why="model") for n, i in enumerate(items)]


def items(out: list[Candidate]) -> list[int]:
    return [c.item for c in out]


ALL = cands(0, 1, 2, 3, 4, 5)


def test_no_repeats_and_exclude_drop_only_their_items_and_keep_order() -> None:
    req = RuleInput(seen=frozenset({1, 4}), excluded=frozenset({0, 5}))
    assert items(no_repeats(ALL, req, FACTS)) == [0, 2, 3, 5]
    assert items(exclude(ALL, req, FACTS)) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("market", "kept"),
    [("us", [0, 1, 2, 3, 5]), ("DE", [0, 2, 3, 5]), ("JP", [0, 3, 5]), (None, [0, 3, 5])],
)
def test_availability_keeps_items_licensed_in_the_market(
    market: str | None, kept: list[int]
) -> None:
    assert items(availability(ALL, RuleInput(market=market), FACTS)) == kept


@pytest.mark.parametrize(
    ("user_age", "kept"),
    [
        (None, [0, 1, 4]),
        (0, [0, 1, 4]),
        (-5, [0, 1, 4]),
        (7, [0, 1, 4, 5]),
        (18, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_age_treats_unknown_age_as_a_minor(user_age: int | None, kept: list[int]) -> None:
    assert items(age(ALL, RuleInput(age=user_age), FACTS)) == kept


def test_taste_forgets_boosts_and_demotes() -> None:
    t = Taste(
        forget_items=frozenset({0}),
        forget_genres=frozenset({"horror"}),
        more_genres=frozenset({"comedy"}),
        less_creators=frozenset({"ann"}),
    )
    out = taste(ALL, RuleInput(taste=t), FACTS)
    # 0 forgotten, 3 horror; 4 comedy ahead; 1 and 2 by ann behind (less beats more for 2)
    assert items(out) == [4, 5, 1, 2]
    why = {c.item: c.why for c in out}
    assert why[4] == "model; boosted: more comedy"
    assert why[5] == "model"
    assert why[1] == why[2] == "model; demoted: less ann"


def test_taste_names_the_item_when_an_item_is_boosted() -> None:
    out = taste(cands(3, 5), RuleInput(taste=Taste(more_items=frozenset({5}))), FACTS)
    assert [(c.item, c.why) for c in out] == [(5, "model; boosted: more this item"), (3, "model")]


def test_feedback_drops_dislikes_and_demotes_skips() -> None:
    req = RuleInput(disliked=frozenset({2}), skipped=frozenset({0, 4}))
    out = feedback(ALL, req, FACTS)
    assert items(out) == [1, 3, 5, 0, 4]
    assert [c.why for c in out][-2:] == ["model; demoted: skipped"] * 2
    assert feedback(ALL, RuleInput(), FACTS) == ALL


def test_diversity_demotes_over_the_caps_instead_of_dropping() -> None:
    req = RuleInput(k=4, genre_cap=1, creator_cap=5)
    out = diversity(ALL, req, FACTS)
    # 1 and 2 would be a second drama; 3, 4 and 5 move up into the top k
    assert items(out) == [0, 3, 4, 5, 1, 2]
    assert [c.why for c in out[-2:]] == ["model; demoted by genre cap (drama)"] * 2


def test_diversity_caps_creators_and_spares_asked_genres() -> None:
    req = RuleInput(k=10, genre_cap=1, creator_cap=2, asked_genres=frozenset({"drama"}))
    out = diversity(ALL, req, FACTS)
    assert items(out) == [0, 1, 3, 4, 5, 2]
    assert out[-1].why == "model; demoted by creator cap (ann)"
    # a `more` genre is exempt from the cap too
    more = RuleInput(
        k=10, genre_cap=1, creator_cap=9, taste=Taste(more_genres=frozenset({"drama"}))
    )
    assert items(diversity(ALL, more, FACTS)) == [0, 1, 2, 3, 5, 4]


def test_diversity_stops_capping_once_k_items_are_kept() -> None:
    req = RuleInput(k=1, genre_cap=1, creator_cap=1)
    assert items(diversity(cands(0, 1, 2), req, FACTS)) == [0, 1, 2]


N_GENRES = ["a", "b", "c", "d"]
facts_strategy = st.integers(1, 12).flatmap(
    lambda n: st.builds(
        lambda gs, cs: ItemFacts(
            genres=gs, creators=cs, markets=[None] * n, min_age=np.zeros(n, dtype=np.int64)
        ),
        st.lists(
            st.lists(st.sampled_from(N_GENRES), max_size=3).map(tuple), min_size=n, max_size=n
        ),
        st.lists(st.sampled_from(["", "x", "y", "z"]), min_size=n, max_size=n),
    )
)


@settings(max_examples=200, deadline=None)
@given(
    facts=facts_strategy,
    data=st.data(),
    k=st.integers(1, 8),
    genre_cap=st.integers(1, 3),
    creator_cap=st.integers(1, 3),
    asked=st.frozensets(st.sampled_from(N_GENRES), max_size=2),
)
def test_diversity_only_reorders_and_respects_caps_in_the_top_k(
    facts: ItemFacts,
    data: st.DataObject,
    k: int,
    genre_cap: int,
    creator_cap: int,
    asked: frozenset[str],
) -> None:
    order = data.draw(st.permutations(range(len(facts.genres))))
    given_cands = cands(*order)
    req = RuleInput(k=k, genre_cap=genre_cap, creator_cap=creator_cap, asked_genres=asked)
    out = diversity(given_cands, req, facts)
    assert sorted(items(out)) == sorted(order)
    assert {(c.item, c.score) for c in out} == {(c.item, c.score) for c in given_cands}
    genre_count: Counter[str] = Counter()
    creator_count: Counter[str] = Counter()
    for c in out[:k]:
        if "demoted" in c.why:
            continue
        genre_count.update(set(facts.genres[c.item]) - asked)
        if facts.creators[c.item]:
            creator_count[facts.creators[c.item]] += 1
    assert all(n <= genre_cap for n in genre_count.values())
    assert all(n <= creator_cap for n in creator_count.values())


def test_rules_registry_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown rules \\['nope'\\]"):
        Rules(["age", "nope"])
    assert [s.name for s in Rules(RULE_NAMES).specs] == list(RULE_NAMES)


def test_cut_from_search_is_the_union_for_configured_cutting_rules_only() -> None:
    req = RuleInput(
        seen=frozenset({1}),
        excluded=frozenset({2}),
        taste=Taste(forget_items=frozenset({3}), less_items=frozenset({4})),
    )
    assert Rules(RULE_NAMES).cut_from_search(req) == {1, 2, 3}
    assert Rules(["exclude", "taste"]).cut_from_search(req) == {2, 3}
    disliked = RuleInput(disliked=frozenset({5}), skipped=frozenset({0}))
    assert Rules(["feedback"]).cut_from_search(disliked) == {5}
    assert Rules(["availability", "age", "diversity"]).cut_from_search(req) == frozenset()
    assert Rules([]).cut_from_search(req) == frozenset()


def test_apply_runs_the_rules_in_order() -> None:
    req = RuleInput(seen=frozenset({0}), k=2, genre_cap=1, creator_cap=9)
    # no_repeats first: 1 is the first drama, so 2 is demoted
    assert items(Rules(["no_repeats", "diversity"]).apply(ALL, req, FACTS)) == [1, 3, 4, 5, 2]
    # diversity first: 1 is demoted behind everything, then 0 is dropped
    assert items(Rules(["diversity", "no_repeats"]).apply(ALL, req, FACTS)) == [3, 4, 5, 1, 2]
    assert Rules([]).apply(ALL, req, FACTS) == ALL


URIS = {"ml-100k:movie:1": 0, "ml-100k:movie:2": 1, "ml-100k:movie:3": 2}


def write_csv(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "availability.csv"
    path.write_text("uri,markets,min_age\n" + body)
    return path


def test_load_availability_reads_markets_and_ages(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "ml-100k:movie:1,us| de ,13\nml-100k:movie:3,*,\n")
    markets, min_age = load_availability(path, URIS, 4)
    assert markets == [frozenset({"US", "DE"}), None, None, None]
    assert min_age.tolist() == [13, 0, 0, 0]


def test_load_availability_without_a_file_allows_everything() -> None:
    markets, min_age = load_availability(None, URIS, 3)
    assert markets == [None, None, None]
    assert min_age.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("ml-100k:movie:1,US,0\nml-100k:movie:9,US,0\n", r":3: unknown item 'ml-100k:movie:9'"),
        ("ml-100k:movie:1,US,adult\n", r":2: min_age 'adult' is not a number"),
    ],
)
def test_load_availability_names_the_bad_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_availability(write_csv(tmp_path, body), URIS, 3)


def test_load_availability_requires_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("uri,markets\nml-100k:movie:1,US\n")
    with pytest.raises(ValueError, match=r"missing columns \['min_age'\]"):
        load_availability(path, URIS, 3)
