"""Reading what a prompt asks for: era words, named and meant genres, creators, kinds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_store.intent import Intent, IntentReader, era


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("comedies from the 80s", (1980, 1989)),
        ("1970s horror", (1970, 1979)),
        ("something from the '90s", (1990, 1999)),
        ("the nineties", (1990, 1999)),
        ("films of 1995", (1995, 1995)),
        ("between 1950 and the sixties", (1950, 1969)),
        ("noughties pop from the 00s", (2000, 2009)),
        ("top 10 of 500 picks", None),  # numbers that are no years
        ("something to make me laugh", None),
    ],
)
def test_era_reads_decades_and_years(text: str, years: tuple[int, int] | None) -> None:
    assert era(text) == years


@given(st.integers(1900, 2029), st.sampled_from(["from {}", "{} films", "in {}!"]))
def test_any_year_written_is_read_back(year: int, template: str) -> None:
    assert era(template.format(year)) == (year, year)


@pytest.mark.parametrize(
    ("text", "genre_text"),
    [
        ("movies from the 1970s", "movies from the"),
        ("comedies from the '80s", "comedies from the"),
        ("Nineties horror", "horror"),
        ("films of 1995, please", "movies of , please"),
        ("a Film noir", "a movie noir"),  # "film" is the medium, a word of film-noir's name
        ("filmed as it happened", "filmed as it happened"),
        ("1970s", ""),
        ("something to make me laugh", "something to make me laugh"),
    ],
)
def test_the_genres_are_read_from_the_words_apart_from_the_era(text: str, genre_text: str) -> None:
    assert IntentReader.genre_text(text) == genre_text


@given(st.text("0123456789s' nietyNIETY", max_size=30) | st.text(max_size=30))
def test_what_is_left_for_the_genres_names_no_era(text: str) -> None:
    assert era(IntentReader.genre_text(text)) is None


def _reader() -> IntentReader:
    """Three genres whose prototypes are the unit axes of a 3-d space."""
    return IntentReader(
        ["comedy", "horror", "western"],
        np.eye(3, dtype=np.float32),
        creators=["John Ford", "Ford"],
        kinds=["movie", "episode"],
    )


def test_a_named_genre_is_taken_as_named_whatever_the_meaning() -> None:
    meaning_horror = np.array([0.0, 1.0, 0.0])
    assert _reader().read("a western please", meaning_horror).genres == {"western"}


def test_a_genre_is_read_from_meaning_only_when_it_stands_out() -> None:
    reader = _reader()
    laugh = np.array([0.9, 0.2, 0.1])
    assert reader.read("something to make me laugh", laugh).genres == {"comedy"}
    between = np.array([0.6, 0.58, 0.0])  # two genres within the margin: both are meant
    assert reader.read("scary but funny", between).genres == {"comedy", "horror"}
    flat = np.array([0.5, 0.45, 0.45])  # near every genre alike: nothing in particular
    assert reader.read("what should I watch next", flat) == Intent()
    assert reader.read("anything", None) == Intent()


def test_creators_and_kinds_are_read_as_whole_words() -> None:
    intent = _reader().read("episodes directed by John Ford", None)
    assert intent.creators == {"John Ford", "Ford"} and intent.kinds == {"episode"}
    assert _reader().read("affordable picks", None).creators == frozenset()
    one_kind = IntentReader([], np.zeros((0, 3)), kinds=["movie"])
    assert one_kind.read("a movie", None).kinds == frozenset()  # says nothing in one kind


def test_an_item_matches_the_share_of_the_facets_asked() -> None:
    intent = Intent(genres=frozenset({"comedy"}), years=(1980, 1989))
    assert intent.match(("comedy", "drama"), 1984.0, "", "movie") == 1.0
    assert intent.match(("comedy",), 1995.0, "", "movie") == 0.5
    assert intent.match(("drama",), 1995.0, "", "movie") == 0.0
    assert Intent().match(("drama",), 1995.0, "", "movie") == 0.0
