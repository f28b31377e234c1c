"""Synthetic music + podcast catalogues at any scale, and the atomic-file writer.

ML-100K is small and single-domain; this gives mixed item kinds (tracks and episodes), creators
and known cluster structure, at sizes (1M+ items) where scaling problems show. All sampling is
vectorised numpy driven by one seeded generator, so a seed always gives the same dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from model_store.data import (
    SUFFIXES,
    DataError,
    Dataset,
    build_dataset,
    checksum,
    split_genres,
)

NAME = "synthetic"
_STR = pd.StringDtype(na_value=np.nan)  # pandas' default "str" dtype, arrow-backed
MUSIC = (
    "jazz", "rock", "hip-hop", "classical", "electronic", "folk", "metal", "soul",
    "reggae", "country", "blues", "ambient", "punk", "funk", "latin", "indie",
)  # fmt: skip
PODCAST = (
    "true-crime", "comedy", "history", "science", "business", "sports", "news", "health",
    "technology", "politics", "education", "fiction", "society", "arts", "travel", "food",
)  # fmt: skip
ADJECTIVES = (
    "velvet", "silver", "hollow", "midnight", "electric", "golden", "quiet", "crimson",
    "wild", "paper", "northern", "broken", "lucky", "distant", "neon", "gentle",
)  # fmt: skip
NOUNS = (
    "owls", "harbor", "engines", "gardens", "signals", "rivers", "lanterns", "machines",
    "horses", "satellites", "mirrors", "islands", "foxes", "letters", "bridges", "storms",
)  # fmt: skip
OCCUPATIONS = ("student", "engineer", "artist", "teacher", "nurse", "driver", "writer", "other")

EXPLORE = 0.1  # share of sessions drawn outside the user's preferred clusters
SESSION_MEAN = 5.0  # interactions per listening session, all from one cluster
SECOND_GENRE = 0.3  # share of items that also carry a sibling cluster's genre


def generate(
    n_users: int, n_items: int, n_clusters: int = 32, mean_len: int = 30, seed: int = 0
) -> Dataset:
    """Users with a few preferred clusters, listening in sessions with Zipf-like popularity."""
    if min(n_users, n_items, n_clusters) < 1 or mean_len < 3:
        raise ValueError("need n_users, n_items, n_clusters >= 1 and mean_len >= 3")
    rng = np.random.default_rng(seed)
    cluster, members, sizes, starts, rank = _clusters(rng, n_items, n_clusters)
    items = _items(rng, cluster, rank, n_clusters)
    interactions = _interactions(rng, members, sizes, starts, n_users, mean_len)
    ds = build_dataset(NAME, interactions, items, _users(rng, n_users), checksum="")
    return replace(ds, checksum=checksum(atomic_bytes(ds)))


def catalog_items(
    n_items: int, n_clusters: int = 32, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """The items `generate` makes for a seed, alone: no users, no interactions and no
    Python list per item (genres stay space-separated text), so 10M+ items fit in memory
    for catalog-scale benchmarks. Returns the items (with `uri`) and each item's cluster."""
    rng = np.random.default_rng(seed)
    cluster, _, _, _, rank = _clusters(rng, n_items, n_clusters)
    items = _items(rng, cluster, rank, n_clusters)
    items["uri"] = NAME + ":" + items["kind"] + ":" + items["item_id"]
    return items, cluster


def _clusters(
    rng: np.random.Generator, n_items: int, n_clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(cluster per item, items by cluster, cluster sizes, their starts, rank in cluster)."""
    cluster = rng.choice(n_clusters, size=n_items, p=rng.dirichlet(np.full(n_clusters, 2.0)))
    # Items of each cluster, contiguous, in a random order that doubles as popularity rank.
    members = np.lexsort((rng.random(n_items), cluster))
    sizes = np.bincount(cluster, minlength=n_clusters)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.empty(n_items, dtype=np.int64)
    rank[members] = np.arange(n_items) - starts[cluster[members]]
    return cluster, members, sizes, starts, rank


def cluster_genres(n_clusters: int) -> list[str]:
    """Genre name per cluster: even clusters are music, odd ones podcasts; repeats get -2, -3."""
    names = []
    for c in range(n_clusters):
        words = PODCAST if c % 2 else MUSIC
        word, round_ = words[(c // 2) % len(words)], (c // 2) // len(words)
        names.append(word if round_ == 0 else f"{word}-{round_ + 1}")
    return names


def _pick(words: Sequence[str], index: np.ndarray) -> pd.Series:
    """Words by index as a str column (an arrow `take`: no Python object per row)."""
    return pd.Series(words, dtype=_STR).take(index).reset_index(drop=True)


def _words(rng: np.random.Generator, n: int) -> pd.Series:
    """n random two-word phrases ("Velvet Harbor") for titles."""
    adjective = _pick(ADJECTIVES, rng.integers(len(ADJECTIVES), size=n))
    return (adjective + " " + _pick(NOUNS, rng.integers(len(NOUNS), size=n))).str.title()


def _creator_names(episode: np.ndarray) -> pd.Series:
    """Distinct readable names, one per creator: artists, or '... Podcast' shows."""
    k = np.arange(len(episode))
    span = len(ADJECTIVES) * len(NOUNS)
    adjective = _pick(ADJECTIVES, k % len(ADJECTIVES))
    names = (adjective + " " + _pick(NOUNS, k // len(ADJECTIVES) % len(NOUNS))).str.title()
    names = names.where(k < span, names + " " + pd.Series(k // span + 1).astype(str))
    return names.where(~episode, "The " + names + " Podcast")


def _items(
    rng: np.random.Generator, cluster: np.ndarray, rank: np.ndarray, n_clusters: int
) -> pd.DataFrame:
    n_items = len(cluster)
    episode = (cluster % 2).astype(bool)
    # Creators: consecutive popularity ranks of a cluster share an artist or show.
    per_creator = rng.integers(3, 13, size=n_clusters)
    n_local = np.bincount(cluster, minlength=n_clusters) // per_creator + 1
    creator = np.concatenate(([0], np.cumsum(n_local)[:-1]))[cluster] + rank // per_creator[cluster]
    creator_episode = np.zeros(int(n_local.sum()), dtype=bool)
    creator_episode[creator] = episode

    number = _int_text(rank % per_creator[cluster] + 1)
    words = _words(rng, n_items)
    title = words.where(~episode, "Episode " + number + ": " + words)

    music, podcast = rng.integers(1965, 2020, n_clusters), rng.integers(2010, 2022, n_clusters)
    centre = np.where(np.arange(n_clusters) % 2, podcast, music)
    spread = np.where(episode, 2.0, 7.0)
    year = np.clip(np.round(centre[cluster] + rng.normal(0, 1, n_items) * spread), 1950, 2024)

    return pd.DataFrame(
        {
            "item_id": _int_text(np.arange(n_items)),
            "title": title,
            "year": year.astype(np.float64),
            "genres": _genre_text(rng, cluster, n_clusters),
            "kind": _pick(("track", "episode"), episode.astype(np.int64)),
            "creator": _creator_names(creator_episode).take(creator).reset_index(drop=True),
        }
    )


def _genre_text(rng: np.random.Generator, cluster: np.ndarray, n_clusters: int) -> pd.Series:
    """Own cluster's genre, sometimes plus a sibling cluster's of the same kind."""
    same_kind = (n_clusters - cluster % 2 + 1) // 2  # clusters sharing this item's parity
    sibling = rng.integers(0, same_kind) * 2 + cluster % 2
    second = (rng.random(len(cluster)) < SECOND_GENRE) & (sibling != cluster)
    code = cluster * (n_clusters + 1) + np.where(second, sibling, n_clusters)
    codes, inverse = np.unique(code, return_inverse=True)
    names = [*cluster_genres(n_clusters), ""]
    text = [f"{names[c // (n_clusters + 1)]} {names[c % (n_clusters + 1)]}".strip() for c in codes]
    return pd.Series(text, dtype=str).take(inverse).reset_index(drop=True)


def _interactions(
    rng: np.random.Generator,
    members: np.ndarray,
    sizes: np.ndarray,
    starts: np.ndarray,
    n_users: int,
    mean_len: int,
) -> pd.DataFrame:
    lengths = 2 + rng.geometric(1.0 / (mean_len - 2), size=n_users)  # >= 3, mean = mean_len
    user = np.repeat(np.arange(n_users), lengths)
    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    pos = np.arange(len(user)) - first[user]

    # Preferred clusters: 1-3 per user, popular (large) clusters more often.
    weight = sizes / sizes.sum()
    prefs = rng.choice(len(sizes), size=(n_users, 3), p=weight)
    n_prefs = rng.integers(1, 4, size=n_users)

    starts_session = (pos == 0) | (rng.random(len(user)) < 1.0 / SESSION_MEAN)
    session = np.cumsum(starts_session) - 1
    owner = user[starts_session]
    pick = (rng.random(len(owner)) * n_prefs[owner]).astype(np.int64)
    session_cluster = prefs[owner, pick]
    explore = rng.random(len(owner)) < EXPLORE
    session_cluster[explore] = rng.choice(len(sizes), size=int(explore.sum()), p=weight)
    cluster = session_cluster[session]

    # Zipf-like (exponent ~1) rank within the cluster: P(rank <= k) = log(k + 2) / log(n + 1).
    size = sizes[cluster]
    rank = np.minimum(np.floor((size + 1.0) ** rng.random(len(user))) - 1, size - 1)
    item = members[starts[cluster] + rank.astype(np.int64)]

    # Seconds: minutes apart within a session, about a day and a half between sessions.
    gap = np.where(starts_session, rng.exponential(129_600, len(user)), 0.0)
    gap = np.ceil(gap + 30 + rng.exponential(210, len(user)))
    gap[pos == 0] = 0
    clock = np.cumsum(gap)
    begin = 1_600_000_000 + rng.integers(0, 180 * 86_400, size=n_users)
    timestamp = clock - clock[first[user]] + begin[user]

    return pd.DataFrame(
        {
            "user_id": _int_text(user),
            "item_id": _int_text(item),
            "timestamp": timestamp.astype(np.float64),
        }
    )


def _users(rng: np.random.Generator, n_users: int) -> pd.DataFrame:
    age = np.where(rng.random(n_users) < 0.05, -1, rng.integers(16, 75, size=n_users))
    gender = pd.Series(["F", "M", ""], dtype=str).take(rng.choice(3, n_users, p=[0.48, 0.48, 0.04]))
    occupation = pd.Series(OCCUPATIONS, dtype=str).take(
        rng.integers(len(OCCUPATIONS), size=n_users)
    )
    zips = pd.Series(rng.integers(0, 100_000, size=n_users)).astype(str).str.zfill(5)
    foreign = pd.Series(["K7L 5J1", "SW1A 1AA", "2000", "100-0001", ""], dtype=str)
    abroad = foreign.take(rng.integers(len(foreign), size=n_users)).reset_index(drop=True)
    return pd.DataFrame(
        {
            "user_id": _int_text(np.arange(n_users)),
            "age": age.astype(np.int64),
            "gender": gender.reset_index(drop=True),
            "occupation": occupation.reset_index(drop=True),
            "zip": zips.where(rng.random(n_users) < 0.9, abroad),
        }
    )


# --- writer ------------------------------------------------------------------------------


def write_atomic(ds: Dataset, directory: Path) -> None:
    """Write `<name>.inter/.item/.user` so that `load_dataset` reads back the same Dataset."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, data in atomic_bytes(ds).items():
        (directory / f"{ds.name}.{suffix}").write_bytes(data)


def atomic_bytes(ds: Dataset) -> dict[str, bytes]:
    """The atomic files' bytes by suffix; their `checksum` is what loading them reports."""
    items, users, inter = ds.items, ds.users, ds.interactions
    item_file, user_file = f"{ds.name}.item", f"{ds.name}.user"
    bad = [g for g in set(chain.from_iterable(items["genres"])) if split_genres(g) != [g]]
    if bad:
        raise DataError(f"{item_file}: genre {bad[0]!r} would not read back as itself")
    for fname, frame, columns in (
        (item_file, items, ("item_id", "title", "kind", "creator")),
        (user_file, users, ("user_id", "gender", "occupation", "zip")),
    ):
        for column in columns:
            _check_plain(fname, column, frame[column])
    files = {
        "inter": {
            "user_id:token": users["user_id"].take(inter["user"].to_numpy()),
            "item_id:token": items["item_id"].take(inter["item"].to_numpy()),
            "timestamp:float": _numbers(inter["timestamp"].to_numpy()),
        },
        "item": {
            "item_id:token": items["item_id"],
            "title:token_seq": items["title"],
            "year:float": _numbers(items["year"].to_numpy()),
            "genres:token_seq": items["genres"].map(" ".join),
            "kind:token": items["kind"],
            "creator:token": items["creator"],
        },
        "user": {
            "user_id:token": users["user_id"],
            "age:token": _numbers(np.where(users["age"] < 0, np.nan, users["age"])),
            "gender:token": users["gender"],
            "occupation:token": users["occupation"],
            "zip_code:token": users["zip"],
        },
    }
    return {suffix: _table(files[suffix]) for suffix in SUFFIXES}


def _check_plain(fname: str, column: str, values: pd.Series) -> None:
    """Tabs and line breaks would split fields or rows of the atomic file."""
    bad = values.astype(str).str.contains(r"[\t\n\r]", regex=True).to_numpy()
    if bad.any():
        value = values.iloc[int(np.flatnonzero(bad)[0])]
        raise DataError(f"{fname}: {column} {value!r} contains a tab or line break")


def _numbers(values: np.ndarray) -> pd.Series:
    """Text that parses back to the same float64: integers plainly, others as repr, NaN empty."""
    values = np.asarray(values, dtype=np.float64)
    whole = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 2.0**53)
    text = _int_text(np.where(whole, values, 0).astype(np.int64))
    text = text.where(~np.isnan(values), "")
    other = ~whole & ~np.isnan(values)
    text.loc[other] = [repr(float(v)) for v in values[other]]
    return text


def _int_text(values: np.ndarray) -> pd.Series:
    """Decimal text of integers as a str column (an arrow cast: 4x faster than astype(str))."""
    return pd.Series(pa.array(values).cast(pa.large_string()), dtype=_STR)


def _table(columns: Mapping[str, pd.Series]) -> bytes:
    """Header line of typed names, then one tab-separated line per row (joined in arrow)."""
    arrays = [pa.array(pd.Series(c, dtype=_STR), type=pa.large_string()) for c in columns.values()]
    tab, newline = (pa.scalar(c, pa.large_string()) for c in "\t\n")
    lines = pc.binary_join_element_wise(*arrays, tab)
    rows = pa.LargeListArray.from_arrays(pa.array([0, len(lines)], pa.int64()), lines)
    body = pc.binary_join(rows, newline)[0].as_buffer().to_pybytes()
    return "\t".join(columns).encode("utf-8") + b"\n" + body + (b"\n" if len(lines) else b"")


# --- item vectors ------------------------------------------------------------------------


def clustered_vectors(
    cluster: np.ndarray,
    dim: int,
    seed: int = 0,
    spread: float = 0.5,
    out: np.ndarray | None = None,
    block: int = 1 << 16,
) -> np.ndarray:
    """Unit vectors near their cluster's centre, with sub-cluster structure (up to 65,536
    sub-centres in all), as a trained model's item vectors look; written
    block by block into `out` (e.g. a memory-mapped .npy of any float dtype)."""
    n = len(cluster)
    n_clusters = int(cluster.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_clusters, dim)))
    per_cluster = max(1, min(n // 8, 1 << 16) // max(n_clusters, 1))
    sub = _unit(rng.standard_normal((n_clusters * per_cluster, dim)))
    target = np.empty((n, dim), dtype=np.float32) if out is None else out
    for start in range(0, n, block):
        c = cluster[start : start + block]
        m = len(c)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        s = sub[c * per_cluster + rng.integers(0, per_cluster, size=m)] * spread
        target[start : start + m] = _unit(centres[c] + s + noise)
    return target


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
