"""Dataset loading, writing, splitting and fetching; the synthetic generator."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_store import data, synthetic
from model_store.data import (
    DataError,
    Dataset,
    build_dataset,
    checksum,
    fetch_ml100k,
    item_text,
    leave_one_out,
    load_dataset,
    sequences,
)
from model_store.synthetic import atomic_bytes, generate, write_atomic

FRAMES = ("interactions", "items", "users")


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.name == b.name
    for frame in FRAMES:
        pd.testing.assert_frame_equal(getattr(a, frame), getattr(b, frame))


def write_files(directory: Path, name: str, **files: str) -> Path:
    """Atomic files from text, one keyword per suffix (inter=..., item=..., user=...)."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, text in files.items():
        (directory / f"{name}.{suffix}").write_text(text, encoding="utf-8")
    return directory


INTER = "user_id:token\titem_id:token\ttimestamp:float\n"
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"


# --- round trip -------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=10)
INT_IDS = st.integers(-5, 10**6).map(str)
WORD_IDS = st.text("abcXYZ09-_.:é", min_size=1, max_size=5)
GENRE = st.text("abcdeFGH-'&", min_size=1, max_size=6).filter(lambda g: g.lower() != "unknown")
YEAR = st.one_of(
    st.none(), st.integers(1900, 2030), st.floats(allow_nan=False, allow_infinity=False)
)
STAMP = st.one_of(st.integers(0, 2**40), st.floats(-1e12, 1e12, allow_nan=False))


@st.composite
def raw_datasets(draw: st.DrawFn) -> Dataset:
    """Arbitrary small tables, through the same assembly the loader and generator use."""
    ids = draw(st.sampled_from([INT_IDS, WORD_IDS]))
    item_ids = draw(st.lists(ids, min_size=1, max_size=12, unique=True))
    user_pool = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    n = len(item_ids)
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": draw(st.lists(TEXT, min_size=n, max_size=n)),
            "year": [
                np.nan if y is None else float(y)
                for y in draw(st.lists(YEAR, min_size=n, max_size=n))
            ],
            "genres": [
                " ".join(g)
                for g in draw(st.lists(st.lists(GENRE, max_size=3), min_size=n, max_size=n))
            ],
            "kind": draw(
                st.lists(st.sampled_from(["track", "episode", ""]), min_size=n, max_size=n)
            ),
            "creator": draw(st.lists(TEXT, min_size=n, max_size=n)),
        }
    )
    events = draw(
        st.lists(
            st.tuples(st.sampled_from(user_pool), st.sampled_from(item_ids), STAMP),
            min_size=1,
            max_size=30,
        )
    )
    interactions = pd.DataFrame(events, columns=["user_id", "item_id", "timestamp"])
    interactions["timestamp"] = interactions["timestamp"].astype(np.float64)
    users = None
    if draw(st.booleans()):
        known = draw(st.lists(st.sampled_from([*user_pool, "nobody"]), unique=True))
        m = len(known)
        users = pd.DataFrame(
            {
                "user_id": known,
                "age": draw(st.lists(st.integers(-1, 99), min_size=m, max_size=m)),
                "gender": draw(st.lists(st.sampled_from(["F", "M", ""]), min_size=m, max_size=m)),
                "occupation": draw(st.lists(TEXT, min_size=m, max_size=m)),
                "zip": draw(
                    st.lists(
                        st.sampled_from(["02139", "94043-1234", "K7L 5J1", "", "1234"]),
                        min_size=m,
                        max_size=m,
                    )
                ),
            }
        )
    return build_dataset("rt", interactions, items, users, checksum="")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ds=raw_datasets())
def test_write_then_load_is_identity(ds: Dataset, tmp_path: Path) -> None:
    directory = tmp_path / "rt"
    write_atomic(ds, directory)
    back = load_dataset(directory)
    assert_same(ds, back)
    assert back.checksum == checksum(atomic_bytes(ds))
    assert atomic_bytes(back) == atomic_bytes(ds)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_users=st.integers(1, 40),
    n_items=st.integers(1, 200),
    n_clusters=st.integers(1, 40),
    mean_len=st.integers(3, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_synthetic_round_trip(
    n_users: int, n_items: int, n_clusters: int, mean_len: int, seed: int, tmp_path: Path
) -> None:
    ds = generate(n_users, n_items, n_clusters, mean_len, seed)
    write_atomic(ds, tmp_path / "gen")
    back = load_dataset(tmp_path / "gen")  # named by its only .inter file, not the folder
    assert_same(ds, back)
    assert back.checksum == ds.checksum


def test_a_folder_of_several_datasets_needs_a_name(tmp_path: Path) -> None:
    for name in ("alpha", "beta"):
        write_files(tmp_path / "both", name, inter=INTER, item=ITEM)
    with pytest.raises(DataError, match="several datasets \\(alpha, beta\\)"):
        load_dataset(tmp_path / "both")
    assert load_dataset(tmp_path / "both", "beta").name == "beta"
    with pytest.raises(DataError, match="no \\.inter file"):
        load_dataset(tmp_path)


# --- loading semantics ------------------------------------------------------------------


def test_order_ties_and_context(tmp_path: Path) -> None:
    directory = write_files(
        tmp_path / "toy",
        "toy",
        inter=INTER + "10\t9\t5\n2\t10\t7\n10\t1\t5\n10\t10\t1\n2\t9\t7\n",
        item=ITEM + "10\tTen (1990)\t1990\tDrama\n9\tNine\t\tAction Sci-Fi\n1\tOne\t2001\t\n"
        "3\tNever Seen\t1999\tComedy\n",
        user=USER + "10\t30\tF\twriter\t02139\n77\t40\tM\tnone\t12345\n",
    )
    ds = load_dataset(directory)
    # Numeric id order, never-seen items kept, kind defaults to "item" off ml-100k.
    assert ds.items["item_id"].tolist() == ["1", "3", "9", "10"]
    assert ds.items["uri"].tolist() == ["toy:item:1", "toy:item:3", "toy:item:9", "toy:item:10"]
    assert ds.items["genres"].tolist() == [[], ["comedy"], ["action", "sci-fi"], ["drama"]]
    assert np.isnan(ds.items["year"].iloc[2])
    # Users only from interactions, in numeric order; missing context is empty.
    assert ds.users["user_id"].tolist() == ["2", "10"]
    assert ds.users["age"].tolist() == [-1, 30]
    assert ds.users["region"].tolist() == ["unknown", "0"]
    # By user then time; equal timestamps keep file order (user 10: item 9 before item 1).
    assert [s.tolist() for s in sequences(ds)] == [[3, 2], [3, 2, 0]]
    assert ds.interactions["timestamp"].tolist() == [7, 7, 1, 5, 5]
    assert ds.n_users == 2 and ds.n_items == 4


def test_no_user_file_and_ml100k_quirks(tmp_path: Path) -> None:
    directory = write_files(
        tmp_path / "ml-100k",
        "ml-100k",
        inter=INTER + "1\t267\t3\n1\t1412\t4\n",
        item=ITEM + "267\tunkonwn\tunkonwn\tunknown\n"
        "1412\tLand Before Time III (1995)\tV\tAnimation Children's\n",
    )
    ds = load_dataset(directory)
    assert ds.items["uri"].tolist() == ["ml-100k:movie:267", "ml-100k:movie:1412"]
    assert np.isnan(ds.items["year"].iloc[0]) and ds.items["year"].iloc[1] == 1995
    assert ds.items["genres"].tolist() == [[], ["animation", "children's"]]
    assert ds.users.iloc[0].tolist() == ["1", -1, "", "", "", "unknown"]


def test_checksum_covers_every_file(tmp_path: Path) -> None:
    files = {"inter": INTER + "1\t1\t1\n", "item": ITEM + "1\tA\t2000\tDrama\n"}
    a = load_dataset(write_files(tmp_path / "a", "x", **files), "x")
    b = load_dataset(write_files(tmp_path / "b", "x", **files, user=USER), "x")
    c = load_dataset(
        write_files(tmp_path / "c", "x", **{**files, "item": ITEM + "1\tB\t\t\n"}), "x"
    )
    assert len({a.checksum, b.checksum, c.checksum}) == 3
    assert a.checksum == load_dataset(tmp_path / "a", "x").checksum


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"inter": "user_id:token\ttimestamp:float\n1\t5\n"}, "d.inter: missing column item_id"),
        ({"item": "item_id:token\tyear:float\n1\t1999\n"}, "d.item: missing column title"),
        ({"item": None}, "d.item: missing file"),
        ({"inter": INTER + "1\t1\t5\n1\t42\t6\n"}, "d.inter: line 3: unknown item_id '42'"),
        ({"inter": INTER + "1\t1\tsoon\n"}, "d.inter: line 2: bad timestamp 'soon'"),
        ({"inter": INTER + "1\t1\t\n"}, "d.inter: line 2: bad timestamp ''"),
        ({"item": ITEM + "1\tA\tabc\tDrama\n"}, "d.item: line 2: bad year 'abc'"),
        ({"item": ITEM + "1\tA\t1999\tDrama\n1\tB\t\t\n"}, "d.item: line 3: repeated '1'"),
        ({"user": USER + "1\told\tF\tx\t02139\n"}, "d.user: line 2: bad age 'old'"),
        ({"inter": INTER + "1\t1\t5\n1\t1\n"}, "d.inter: line 3: expected 3 fields, got 2"),
        ({"inter": INTER + "1\t1\t5\t9\n"}, "d.inter: line 2: expected 3 fields, got 4"),
        ({"inter": INTER + "\n1\t1\t5\n"}, "d.inter: line 2: expected 3 fields, got 1"),
        ({"inter": ""}, "d.inter: empty file"),
        ({"inter": "user_id:token\tuser_id:float\titem_id\n"}, "d.inter: repeated column"),
    ],
)
def test_bad_files_name_the_file(
    tmp_path: Path, files: dict[str, str | None], message: str
) -> None:
    base: dict[str, str | None] = {
        "inter": INTER + "1\t1\t5\n",
        "item": ITEM + "1\tA\t1999\tDrama\n",
        "user": USER + "1\t20\tF\tx\t02139\n",
    }
    base.update(files)
    given_files = {k: v for k, v in base.items() if v is not None}
    directory = write_files(tmp_path / "d", "d", **given_files)
    with pytest.raises(DataError) as caught:
        load_dataset(directory)
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_bad_bytes(tmp_path: Path) -> None:
    directory = write_files(tmp_path / "d", "d", item=ITEM + "1\tA\t1999\tDrama\n")
    (directory / "d.inter").write_bytes(INTER.encode() + b"1\t1\t5\r2\t1\t6\n")
    with pytest.raises(DataError, match=r"^d\.inter: stray carriage return$"):
        load_dataset(directory)
    (directory / "d.inter").write_bytes(INTER.encode() + b"\xff\t1\t5\n")
    with pytest.raises(DataError, match=r"^d\.inter: not UTF-8"):
        load_dataset(directory)


def test_writer_refuses_what_would_not_read_back(tmp_path: Path) -> None:
    ds = generate(3, 10, n_clusters=2)
    items = ds.items.copy()
    items.loc[0, "title"] = "two\tfields"
    with pytest.raises(DataError, match=r"^synthetic\.item: title"):
        write_atomic(Dataset(ds.name, ds.interactions, items, ds.users, ""), tmp_path)
    items = ds.items.copy()
    items["genres"] = [["Rock"]] * len(items)
    with pytest.raises(DataError, match=r"^synthetic\.item: genre 'Rock'"):
        write_atomic(Dataset(ds.name, ds.interactions, items, ds.users, ""), tmp_path)


# --- split and text ---------------------------------------------------------------------


def test_leave_one_out() -> None:
    seqs = [np.array([5, 6, 7, 8]), np.array([1, 2]), np.array([3, 4, 9]), np.array([0])]
    split = leave_one_out(seqs)
    assert [t.tolist() for t in split.train] == [[5, 6], [1, 2], [3], [0]]
    assert split.valid.tolist() == [7, -1, 4, -1]
    assert split.test.tolist() == [8, -1, 9, -1]
    assert split.valid.dtype == np.int64 and all(t.dtype == np.int64 for t in split.train)
    empty = leave_one_out([])
    assert empty.train == [] and empty.valid.shape == (0,)


def test_item_text() -> None:
    items = pd.DataFrame(
        {
            "title": ["Toy Story", "Heat (1995)", "Untitled", ""],
            "year": [1995.0, 1995.0, np.nan, 2001.0],
            "genres": [["animation", "comedy"], ["crime"], [], []],
        }
    )
    assert item_text(items) == [
        "Toy Story (1995) · animation, comedy",
        "Heat (1995) · crime",
        "Untitled",
        "(2001)",
    ]


# --- fetch ------------------------------------------------------------------------------


def fake_wheel(cache: Path, contents: dict[str, bytes]) -> Path:
    wheel = cache / "wheels" / data.RECBOLE_WHEEL
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        for fname, body in contents.items():
            zf.writestr(f"{data.ML100K_MEMBER_DIR}/{fname}", body)
    return wheel


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch ran pip although the wheel is cached")

    monkeypatch.setattr(data.subprocess, "run", refuse)


FAKE = {
    "ml-100k.inter": (INTER + "1\t1\t5\n").encode(),
    "ml-100k.item": (ITEM + "1\tToy Story\t1995\tAnimation Children's Comedy\n").encode(),
    "ml-100k.user": (USER + "1\t24\tM\ttechnician\t85711\n").encode(),
}


@pytest.mark.usefixtures("no_pip")
def test_fetch_extracts_caches_and_heals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digests = {f: hashlib.sha256(b).hexdigest() for f, b in FAKE.items()}
    monkeypatch.setattr(data, "ML100K_SHA256", digests)
    monkeypatch.setenv("GENREC_CACHE", str(tmp_path))
    wheel = fake_wheel(tmp_path, FAKE)

    out = fetch_ml100k()
    assert out == tmp_path / "ml-100k"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == FAKE
    assert load_dataset(out).items["uri"].tolist() == ["ml-100k:movie:1"]

    wheel.rename(wheel.with_suffix(".moved"))  # verified files alone must suffice
    assert fetch_ml100k() == out

    wheel.with_suffix(".moved").rename(wheel)
    (out / "ml-100k.item").write_bytes(b"tampered")  # a bad cached file is re-extracted
    fetch_ml100k()
    assert (out / "ml-100k.item").read_bytes() == FAKE["ml-100k.item"]


@pytest.mark.usefixtures("no_pip")
def test_fetch_rejects_tampered_data(tmp_path: Path) -> None:
    fake_wheel(tmp_path, FAKE)  # checked against the real ML-100K digests: all wrong
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "ml-100k.inter").write_bytes(b"wrong bytes")
    with pytest.raises(DataError, match=r"^ml-100k\.inter: sha256 mismatch in recbole-1\.2\.1"):
        fetch_ml100k(tmp_path)
    assert (tmp_path / "ml-100k" / "ml-100k.inter").read_bytes() == b"wrong bytes"


@pytest.mark.usefixtures("no_pip")
def test_fetch_missing_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digests = {f: hashlib.sha256(b).hexdigest() for f, b in FAKE.items()}
    monkeypatch.setattr(data, "ML100K_SHA256", digests)
    fake_wheel(tmp_path, {k: v for k, v in FAKE.items() if k != "ml-100k.user"})
    with pytest.raises(DataError, match=r"^ml-100k\.user: missing from recbole"):
        fetch_ml100k(tmp_path)


@pytest.mark.slow
def test_real_ml100k(ml100k_dir: Path) -> None:
    ds = load_dataset(ml100k_dir)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (943, 1682, 100_000)
    toy = ds.items.set_index("uri").loc["ml-100k:movie:1"]
    assert toy["title"] == "Toy Story" and toy["year"] == 1995
    assert toy["genres"] == ["animation", "children's", "comedy"]
    assert ds.users["region"].value_counts()["other"] == 18  # the Canadian postcodes
    split = leave_one_out(sequences(ds))
    assert (split.test >= 0).all()  # every ML-100K user rated at least 20 movies
    assert item_text(ds.items)[0] == "Toy Story (1995) · animation, children's, comedy"


# --- synthetic --------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_mixed() -> None:
    a, b = generate(60, 500, n_clusters=8, seed=7), generate(60, 500, n_clusters=8, seed=7)
    assert_same(a, b)
    assert a.checksum == b.checksum
    assert generate(60, 500, n_clusters=8, seed=8).checksum != a.checksum
    assert set(a.items["kind"]) == {"track", "episode"}
    kinds = a.items["kind"] + ":" + a.items["item_id"]
    assert (a.items["uri"] == "synthetic:" + kinds).all()
    assert a.n_users == 60 and a.n_items == 500
    assert min(len(s) for s in sequences(a)) >= 3
    assert a.interactions.groupby("user")["timestamp"].is_monotonic_increasing.all()


def test_synthetic_users_stick_to_their_clusters() -> None:
    n_clusters = 16
    ds = generate(300, 3000, n_clusters=n_clusters, seed=1)
    genre = synthetic.cluster_genres(n_clusters)
    primary = ds.items["genres"].str[0].map(genre.index).to_numpy()
    cluster = primary[ds.interactions["item"].to_numpy()]
    top_share = (
        pd.DataFrame({"user": ds.interactions["user"], "cluster": cluster})
        .groupby("user")["cluster"]
        .agg(lambda c: c.value_counts().iloc[0] / len(c))
    )
    assert top_share.mean() > 5 / n_clusters
