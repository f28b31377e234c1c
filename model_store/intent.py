"""What a prompt asks for (genres, era, creators, kinds), read from its meaning.

The LLM's vocabulary knows genre names, but people ask for "something to make me laugh" or
"cowboys and the frontier". The bundle's sentence encoder knows those words: each genre gets
a prototype in its space, the sum of the genre's name and the centroid of its items' content
vectors (what the catalog says the genre is), and a prompt asks for the genres whose
prototype is nearest to it, when the nearest stands out from the rest. A prompt that names a genre
keeps exactly what it named. Decades and years ("the 80s", "1970s", "from 1995"), creator
names and kind names ("podcast") are read from the words themselves.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model_store.vocab import words_of

MIN_LIFT = 0.12
"""A prompt asks for its nearest genre only when that genre stands out: its cosine is at
least this much above the prompt's mean over all genres ("what should I watch next" is
about as near to every genre; "something to make me laugh" is 0.2 nearer to comedy). Chosen
on prompts written for development, not on the benchmark's prompts."""
MARGIN = 0.03
"""Genres within this of the nearest one are asked for too (a prompt between two genres)."""
CENTROID_SAMPLE = 2000
"""Items averaged per genre centroid at most (evenly spaced), so start-up stays bounded."""

_DECADE_WORDS = {
    "twenties": 1920, "thirties": 1930, "forties": 1940, "fifties": 1950, "sixties": 1960,
    "seventies": 1970, "eighties": 1980, "nineties": 1990,
}  # fmt: skip
_DECADE = re.compile(r"(?<!\d)(?:(1[89]\d0|20[0-2]0)|'?(\d0))s\b")
_YEAR = re.compile(r"(?<!\d)(1[89]\d\d|20[0-2]\d)(?![\ds])")


@dataclass(frozen=True)
class Intent:
    """What one prompt asks for; an empty intent asks for nothing in particular."""

    genres: frozenset[str] = frozenset()
    years: tuple[int, int] | None = None  # inclusive
    creators: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.genres or self.years or self.creators or self.kinds)

    def match(self, genres: Collection[str], year: float, creator: str, kind: str) -> float:
        """Share of the asked facets one item has (1.0: everything asked for)."""
        checks = []
        if self.genres:
            checks.append(not self.genres.isdisjoint(genres))
        if self.years:
            checks.append(self.years[0] <= year <= self.years[1])
        if self.creators:
            checks.append(creator in self.creators)
        if self.kinds:
            checks.append(kind in self.kinds)
        return sum(checks) / len(checks) if checks else 0.0


def era(text: str) -> tuple[int, int] | None:
    """The years a text names: a decade ("80s", "1980s", "eighties") or a year ("1995")."""
    lowered = text.lower()
    spans: list[tuple[int, int]] = []
    for full, short in _DECADE.findall(lowered):
        start = int(full) if full else _century(int(short)) + int(short)
        spans.append((start, start + 9))
    spans += [(_DECADE_WORDS[w], _DECADE_WORDS[w] + 9) for w in words_of(lowered)
              if w in _DECADE_WORDS]  # fmt: skip
    spans += [(int(y), int(y)) for y in _YEAR.findall(lowered)]
    if not spans:
        return None
    return min(s for s, _ in spans), max(e for _, e in spans)


_ERA_WORDS = re.compile(
    rf"{_DECADE.pattern}|{_YEAR.pattern}|\b(?:{'|'.join(_DECADE_WORDS)})\b", re.IGNORECASE
)
_FILM = re.compile(r"\bfilm(s?)\b", re.IGNORECASE)


def _century(two_digits: int) -> int:
    """'20s is the 1920s; '00s and '10s are this century's."""
    return 2000 if two_digits < 20 else 1900


class IntentReader:
    """Reads an :class:`Intent` from a prompt's words and its sentence-encoder vector."""

    def __init__(
        self,
        genre_names: Sequence[str],
        prototypes: np.ndarray,
        creators: Collection[str] = (),
        kinds: Collection[str] = (),
    ) -> None:
        self.genre_names = list(genre_names)
        self.prototypes = np.asarray(prototypes, dtype=np.float32)
        self.creators = {" ".join(words_of(c)): c for c in creators if words_of(c)}
        self.longest_creator = max((len(k.split()) for k in self.creators), default=0)
        self.kinds = {k.lower(): k for k in kinds if k}

    @staticmethod
    def genre_text(text: str) -> str:
        """The words whose vector says which genres are meant: `text` without its era, which
        is read as years, and with "film" written "movie" ("films from the 1970s" asks for no
        genre, yet the era's words and "film", a word of film-noir's name, both sit near
        film-noir in the encoder's space; "a movie noir" still reads as film-noir)."""
        medium = _FILM.sub(lambda m: "movie" + m.group(1), _ERA_WORDS.sub(" ", text))
        return " ".join(medium.split())

    @classmethod
    def from_catalog(
        cls,
        items_by_genre: Mapping[str, np.ndarray],
        content: np.ndarray,
        creators: Collection[str] = (),
        kinds: Collection[str] = (),
    ) -> IntentReader:
        """Prototypes from the genre names (encoded now) and the items' content vectors."""
        from model_store.content import encode

        names = sorted(items_by_genre)
        if not names:
            return cls([], np.zeros((0, 0), dtype=np.float32), creators, kinds)
        named = encode(names)
        centroids = np.stack([_centroid(content, items_by_genre[g]) for g in names])
        return cls(names, _unit(_unit(named) + _unit(centroids)), creators, kinds)

    def read(self, text: str, query: np.ndarray | None) -> Intent:
        """The intent of `text`; `query` is its encoder vector (None: words only)."""
        words = words_of(text)
        named = frozenset(w for w in words if w in self.genre_names)
        genres = named or self._nearest_genres(query)
        creators = frozenset(
            self.creators[phrase]
            for phrase in _phrases(words, self.longest_creator)
            if phrase in self.creators
        )
        kinds = frozenset(k for low, k in self.kinds.items() if low in words or f"{low}s" in words)
        return Intent(genres, era(text), creators, kinds if len(self.kinds) > 1 else frozenset())

    def _nearest_genres(self, query: np.ndarray | None) -> frozenset[str]:
        if query is None or not self.genre_names:
            return frozenset()
        similarity = self.prototypes @ np.asarray(query, dtype=np.float32)
        best = float(similarity.max())
        if best - float(similarity.mean()) < MIN_LIFT:
            return frozenset()
        return frozenset(
            g for g, s in zip(self.genre_names, similarity, strict=True) if s >= best - MARGIN
        )


def _phrases(words: Sequence[str], longest: int) -> Iterator[str]:
    """Every run of up to `longest` consecutive words: a dictionary look-up per run, so
    reading creators costs the same with a million of them."""
    for start in range(len(words)):
        for end in range(start + 1, min(start + longest, len(words)) + 1):
            yield " ".join(words[start:end])


def _centroid(content: np.ndarray, items: np.ndarray) -> np.ndarray:
    if len(items) > CENTROID_SAMPLE:
        items = items[np.linspace(0, len(items) - 1, CENTROID_SAMPLE).astype(np.int64)]
    return np.asarray(content[np.sort(items)], dtype=np.float32).mean(axis=0)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)
