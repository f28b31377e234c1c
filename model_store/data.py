"""Datasets as RecBole atomic files: the MovieLens-100K fetch, a strict loader, the split.

Everything downstream (Semantic IDs, the user model, evaluation) works on dense user and item
indices; this module is the one place where original ids, file formats and their quirks live.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

ML100K = "ml-100k"
SUFFIXES = ("inter", "item", "user")  # also the order in which files enter the checksum
RECBOLE = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
ML100K_MEMBER_DIR = "recbole/dataset_example/ml-100k"
ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

# Tokens that mean "not known"; ml-100k spells it "unkonwn" in item 267.
_MISSING = frozenset({"", "unknown", "unkonwn"})
# Column names accepted for each field: our own first (what the writer emits), then RecBole's.
_ALIASES = {
    "title": ("title", "movie_title"),
    "year": ("year", "release_year"),
    "genres": ("genres", "class"),
    "zip": ("zip", "zip_code"),
}
_INT_ID = r"-?\d{1,18}"
_NUMBER = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
_US_ZIP = r"\d{5}(?:-\d{4})?"
_TITLE_YEAR = r"\((\d{4})\)\s*$"


class DataError(ValueError):
    """A dataset file is missing, malformed or not the expected bytes (one-line message)."""


@dataclass(frozen=True, eq=False)  # eq=False: DataFrames have no boolean equality
class Dataset:
    """Interactions plus item and user tables, all indexed densely from 0."""

    name: str
    interactions: pd.DataFrame  # user, item (int64 indices), timestamp; by user, then time
    items: pd.DataFrame  # item_id, uri, title, year, genres (list[str]), kind, creator
    users: pd.DataFrame  # user_id, age (-1 unknown), gender, occupation, zip, region
    checksum: str  # sha256 over the source files' bytes, see `checksum`

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out split; -1 marks users too short to hold anything out."""

    train: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray


# --- fetch -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$GENREC_CACHE`, else ~/.cache/genrec: shared across runs so data is fetched once."""
    return Path(os.environ.get("GENREC_CACHE") or Path.home() / ".cache" / "genrec")


def fetch_ml100k(cache_dir: Path | None = None) -> Path:
    """MovieLens-100K atomic files from the recbole wheel, verified; returns their directory.

    The wheel is the only pinned, checksummable copy on a registry we can reach; it is read as a
    zip, never installed. Verified files already in the cache mean no download at all.
    """
    cache = cache_dir or default_cache_dir()
    out = cache / ML100K
    if all(_file_sha256(out / fname) == digest for fname, digest in ML100K_SHA256.items()):
        return out
    wheel = _recbole_wheel(cache / "wheels")
    contents = _read_members(wheel)
    out.mkdir(parents=True, exist_ok=True)
    for fname, data in contents.items():
        tmp = out / f".{fname}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / fname)
    return out


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _recbole_wheel(wheels: Path) -> Path:
    """The cached wheel, downloaded with pip (the registry's own client) only when absent."""
    wheel = wheels / RECBOLE_WHEEL
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    done = subprocess.run([*cmd, RECBOLE, "-d", str(wheels)], capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip download {RECBOLE} failed (exit {done.returncode}): {last}")
    return wheel


def _read_members(wheel: Path) -> dict[str, bytes]:
    """All three files, each checked against its pinned sha256 before anything is written."""
    contents: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for fname, digest in ML100K_SHA256.items():
                member = f"{ML100K_MEMBER_DIR}/{fname}"
                if member not in names:
                    raise DataError(f"{fname}: missing from {wheel.name} (member {member})")
                data = zf.read(member)
                got = hashlib.sha256(data).hexdigest()
                if got != digest:
                    raise DataError(
                        f"{fname}: sha256 mismatch in {wheel.name}: got {got}, expected {digest}"
                    )
                contents[fname] = data
    except zipfile.BadZipFile:
        raise DataError(f"{wheel.name}: not a zip file (delete it to download again)") from None
    return contents


# --- load --------------------------------------------------------------------------------


def checksum(files: Mapping[str, bytes]) -> str:
    """sha256 over the files present, in SUFFIXES order, each framed by suffix and length."""
    digest = hashlib.sha256()
    for suffix in SUFFIXES:
        if suffix in files:
            digest.update(f"{suffix} {len(files[suffix])}\n".encode())
            digest.update(files[suffix])
    return digest.hexdigest()


def dataset_name(directory: Path) -> str:
    """The atomic files' name in `directory` (see :func:`load_dataset`)."""
    if (directory / f"{directory.name}.inter").is_file():
        return directory.name
    found = sorted(p.stem for p in directory.glob("*.inter"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{directory}: no .inter file (atomic files: NAME.inter, NAME.item)")
    raise DataError(f"{directory}: several datasets ({', '.join(found)}); name one")


def load_dataset(directory: Path, name: str | None = None) -> Dataset:
    """Read `<name>.inter`, `<name>.item` and optionally `<name>.user` from `directory`.

    Without a `name`: the directory's own name (RecBole's layout, `ml-100k/ml-100k.inter`),
    else the stem of the directory's only `.inter` file (what `genrec data synth --out DIR`
    writes, whatever DIR is called)."""
    name = name or dataset_name(directory)
    raw: dict[str, bytes] = {}
    for suffix in SUFFIXES:
        path = directory / f"{name}.{suffix}"
        if path.is_file():
            raw[suffix] = path.read_bytes()
        elif suffix != "user":
            raise DataError(f"{path.name}: missing file in {directory}")
    files = {s: f"{name}.{s}" for s in SUFFIXES}
    inter = _read_table(files["inter"], raw["inter"])
    items = _read_table(files["item"], raw["item"])
    users = _read_table(files["user"], raw["user"]) if "user" in raw else None
    return build_dataset(
        name,
        _typed_interactions(files["inter"], inter),
        _typed_items(files["item"], items),
        None if users is None else _typed_users(files["user"], users),
        checksum(raw),
    )


def _read_table(fname: str, data: bytes) -> pd.DataFrame:
    """An atomic file as an all-text frame; row i is file line i + 2 (line 1 is the header).

    Parsed by pyarrow's CSV reader with quoting off (titles hold quotes): at millions of lines
    it is over 10x faster than pandas' own reader with the same settings.
    """
    body = data.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n") + b"\n"
    if not body.strip():
        raise DataError(f"{fname}: empty file")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{fname}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if body.count(b"\r") != body.count(b"\r\n"):
        raise DataError(f"{fname}: stray carriage return")
    header = body[: body.index(b"\n")].decode().rstrip("\r").split("\t")
    names = [h.split(":", 1)[0].strip() for h in header]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{fname}: repeated column {repeated[0]!r}")
    n_lines = _check_field_counts(fname, body)
    try:
        table = pa_csv.read_csv(
            io.BytesIO(body),
            read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pa_csv.ParseOptions(
                delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=False
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.large_string()),
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"{fname}: {str(exc).splitlines()[0]}") from None
    if table.num_rows != n_lines - 1:
        raise DataError(f"{fname}: parsed {table.num_rows} rows from {n_lines - 1} lines")
    return table.to_pandas(types_mapper={pa.large_string(): pd.StringDtype(na_value=np.nan)}.get)


def _check_field_counts(fname: str, body: bytes) -> int:
    """Every line has the header's field count; fails naming the line (arrow's error won't)."""
    raw = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(raw == ord("\n"))
    tabs = np.flatnonzero(raw == ord("\t"))
    per_line = np.diff(np.searchsorted(tabs, ends), prepend=0)
    bad = np.flatnonzero(per_line != per_line[0])
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{fname}: line {i + 1}: expected {per_line[0] + 1} fields, got {per_line[i] + 1}"
        )
    return len(ends)


def _column(frame: pd.DataFrame, fname: str, field: str, required: bool = True) -> pd.Series:
    for name in _ALIASES.get(field, (field,)):
        if name in frame.columns:
            return frame[name]
    if required:
        raise DataError(f"{fname}: missing column {field}")
    return pd.Series(np.full(len(frame), "", dtype=object), dtype=str)


def _to_floats(text: pd.Series) -> np.ndarray:
    """float64 per cell (exact for repr output), NaN where a cell is not a finite number."""
    cells = pc.utf8_trim_whitespace(pa.array(text, type=pa.large_string()))
    try:
        values = pc.cast(cells, pa.float64())
    except pa.ArrowInvalid:  # some cell is no number: blank those out, callers report NaNs
        ok = pc.match_substring_regex(cells, _NUMBER)
        values = pc.cast(pc.if_else(ok, cells, "nan"), pa.float64())
    out = np.array(values.to_numpy(zero_copy_only=False), dtype=np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


def _fail_first(fname: str, bad: np.ndarray, label: str, text: pd.Series) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{fname}: line {i + 2}: bad {label} {text.iloc[i]!r}")


def _typed_interactions(fname: str, frame: pd.DataFrame) -> pd.DataFrame:
    stamps = _column(frame, fname, "timestamp")
    values = _to_floats(stamps)
    _fail_first(fname, np.isnan(values), "timestamp", stamps)
    return pd.DataFrame(
        {
            "user_id": _column(frame, fname, "user_id"),
            "item_id": _column(frame, fname, "item_id"),
            "timestamp": values,
        }
    )


def _typed_items(fname: str, frame: pd.DataFrame) -> pd.DataFrame:
    title = _column(frame, fname, "title")
    text = _column(frame, fname, "year", required=False).str.strip()
    year = _to_floats(text)
    missing = text.str.lower().isin(_MISSING).to_numpy()
    # A year cell that is junk (ml-100k item 1412 has 'V') falls back to a "(1995)" title end.
    junk = np.flatnonzero(np.isnan(year) & ~missing)
    found = title.iloc[junk].str.extract(_TITLE_YEAR, expand=False)
    year[junk] = found.astype(np.float64).to_numpy()
    _fail_first(fname, np.isnan(year) & ~missing, "year", text)
    return pd.DataFrame(
        {
            "item_id": _column(frame, fname, "item_id"),
            "title": title,
            "year": year,
            "genres": _column(frame, fname, "genres", required=False),
            "kind": _column(frame, fname, "kind", required=False),
            "creator": _column(frame, fname, "creator", required=False),
        }
    )


def _typed_users(fname: str, frame: pd.DataFrame) -> pd.DataFrame:
    text = _column(frame, fname, "age", required=False).str.strip()
    age = _to_floats(text)
    unknown = text.str.lower().isin(_MISSING).to_numpy()
    _fail_first(fname, (np.isnan(age) | (age != np.round(age))) & ~unknown, "age", text)
    return pd.DataFrame(
        {
            "user_id": _column(frame, fname, "user_id"),
            "age": np.where(unknown, -1, np.nan_to_num(age)).astype(np.int64),
            "gender": _column(frame, fname, "gender", required=False),
            "occupation": _column(frame, fname, "occupation", required=False),
            "zip": _column(frame, fname, "zip", required=False),
        }
    )


# --- assemble ----------------------------------------------------------------------------


def build_dataset(
    name: str,
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame | None,
    checksum: str,
) -> Dataset:
    """A Dataset from typed tables keyed by original ids; the loader and generator share it.

    `interactions`: user_id, item_id (str), timestamp (float64), in file order.
    `items`: item_id, title (str); optional year (float64), genres (str, space-separated),
    kind, creator (str). `users`: user_id (str); optional age (int64, -1 unknown), gender,
    occupation, zip (str). Row i of each table is reported as line i + 2 of its file.
    """
    inter_file, item_file, user_file = (f"{name}.{s}" for s in SUFFIXES)
    item_ids = _ids(item_file, "item_id", items["item_id"], unique=True)
    item_order = _id_order(item_ids)
    catalog = _item_table(name, items.iloc[item_order].reset_index(drop=True))

    inter_items = _ids(inter_file, "item_id", interactions["item_id"], unique=False)
    item = _positions(inter_items, catalog["item_id"])
    if (item < 0).any():
        i = int(np.flatnonzero(item < 0)[0])
        raise DataError(
            f"{inter_file}: line {i + 2}: unknown item_id {inter_items.iloc[i]!r} (not in "
            f"{item_file})"
        )

    inter_users = _ids(inter_file, "user_id", interactions["user_id"], unique=False)
    codes, uniques = pd.factorize(inter_users)
    user_ids = pd.Series(uniques, dtype=str)
    user_order = _id_order(user_ids)
    user_rank = np.empty(len(user_order), dtype=np.int64)
    user_rank[user_order] = np.arange(len(user_order))
    user = user_rank[codes]
    user_ids = user_ids.iloc[user_order].reset_index(drop=True)
    if users is not None:
        _ids(user_file, "user_id", users["user_id"], unique=True)

    stamps = np.asarray(interactions["timestamp"], dtype=np.float64)
    order = np.argsort(stamps, kind="stable")
    order = order[np.argsort(user[order], kind="stable")]
    table = pd.DataFrame(
        {
            "user": user[order].astype(np.int64),
            "item": item[order].astype(np.int64),
            "timestamp": stamps[order],
        }
    )
    return Dataset(name, table, catalog, _user_table(user_ids, users), checksum)


def _ids(fname: str, label: str, values: pd.Series, unique: bool) -> pd.Series:
    ids = pd.Series(values, dtype=str).reset_index(drop=True)
    bad = (ids == "").to_numpy()
    if unique:
        bad = bad | ids.duplicated().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        problem = "empty" if ids.iloc[i] == "" else f"repeated {ids.iloc[i]!r} as"
        raise DataError(f"{fname}: line {i + 2}: {problem} {label}")
    return ids


def _id_order(ids: pd.Series) -> np.ndarray:
    """Positions sorting ids numerically when all are integers, else by code point."""
    if not (len(ids) and ids.str.fullmatch(_INT_ID).all()):
        return np.asarray(ids.sort_values(kind="stable").index.to_numpy())
    numbers = ids.astype(np.int64).to_numpy()
    order = np.argsort(numbers, kind="stable")
    if (np.diff(numbers[order]) == 0).any():  # "7" and "07": the text breaks the tie
        keys = pd.DataFrame({"number": numbers, "text": ids})
        order = keys.sort_values(["number", "text"], kind="stable").index.to_numpy()
    return order


def _positions(keys: pd.Series, values: pd.Series) -> np.ndarray:
    """Position of each key among the (unique) values, -1 if absent; arrow hashing, fast."""
    found = pc.index_in(
        pa.array(keys, type=pa.large_string()), value_set=pa.array(values, type=pa.large_string())
    )
    return np.asarray(found.fill_null(-1).to_numpy(), dtype=np.int64)


def _text(frame: pd.DataFrame, column: str, default: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series(np.full(len(frame), default, dtype=object), dtype=str)
    values = pd.Series(frame[column], dtype=str)
    return values.where(values != "", default) if default else values


def _item_table(name: str, items: pd.DataFrame) -> pd.DataFrame:
    kind = _text(items, "kind", "movie" if name == ML100K else "item")
    item_id = pd.Series(items["item_id"], dtype=str)
    year = items["year"] if "year" in items.columns else np.full(len(items), np.nan)
    return pd.DataFrame(
        {
            "item_id": item_id,
            "uri": name + ":" + kind + ":" + item_id,
            "title": _text(items, "title", ""),
            "year": np.asarray(year, dtype=np.float64),
            "genres": _genre_lists(_text(items, "genres", "")),
            "kind": kind,
            "creator": _text(items, "creator", ""),
        }
    )


def split_genres(text: str) -> list[str]:
    """A genre cell as a list: lower-cased, space-separated, 'unknown' meaning no genre."""
    return [g for g in text.lower().split() if g not in _MISSING]


def _genre_lists(text: pd.Series) -> pd.Series:
    """Genre lists per row; few distinct genre strings exist, so each is split only once."""
    codes, uniques = pd.factorize(text)
    parsed = [split_genres(u) for u in uniques]
    return pd.Series([list(parsed[c]) for c in codes.tolist()], dtype=object)


def _user_table(user_ids: pd.Series, users: pd.DataFrame | None) -> pd.DataFrame:
    """Context for users with interactions; absent users or files give empty context."""
    given = users if users is not None else pd.DataFrame({"user_id": pd.Series([], dtype=str)})
    at = _positions(user_ids, pd.Series(given["user_id"], dtype=str))

    def pick(column: str, default: object, dtype: type) -> np.ndarray:
        if column not in given.columns:
            return np.full(len(user_ids), default, dtype=dtype)
        source: np.ndarray = np.asarray(given[column].to_numpy(), dtype=dtype)
        return np.append(source, np.asarray([default], dtype=dtype))[at]  # -1: the default

    zips = pd.Series(pick("zip", "", object), dtype=str)
    region = np.where(zips.str.fullmatch(_US_ZIP), zips.str[:1], "other")
    region = np.where(zips == "", "unknown", region)
    return pd.DataFrame(
        {
            "user_id": user_ids,
            "age": pick("age", -1, np.int64),
            "gender": pd.Series(pick("gender", "", object), dtype=str),
            "occupation": pd.Series(pick("occupation", "", object), dtype=str),
            "zip": zips,
            "region": pd.Series(region, dtype=str),
        }
    )


# --- views -------------------------------------------------------------------------------


def sequences(ds: Dataset) -> list[np.ndarray]:
    """Per user, item indices in time order (interactions are already sorted that way)."""
    items = ds.interactions["item"].to_numpy(dtype=np.int64, copy=True)
    counts = np.bincount(ds.interactions["user"].to_numpy(), minlength=ds.n_users)
    return np.split(items, np.cumsum(counts)[:-1]) if ds.n_users else []


def leave_one_out(seqs: list[np.ndarray]) -> Split:
    """Last item = test, second last = validation, rest = train; < 3 items: all train."""
    valid = np.full(len(seqs), -1, dtype=np.int64)
    test = np.full(len(seqs), -1, dtype=np.int64)
    train: list[np.ndarray] = []
    for u, seq in enumerate(seqs):
        if len(seq) < 3:
            train.append(np.asarray(seq, dtype=np.int64))
            continue
        train.append(np.asarray(seq[:-2], dtype=np.int64))
        valid[u], test[u] = seq[-2], seq[-1]
    return Split(train, valid, test)


def item_text(items: pd.DataFrame) -> list[str]:
    """Content text per item, 'title (year) · genre1, genre2', for the text encoder."""
    texts: list[str] = []
    for title, year, genres in zip(items["title"], items["year"], items["genres"], strict=True):
        text = str(title)
        if not np.isnan(year):
            stamp = f"({int(year)})" if float(year).is_integer() else f"({year:g})"
            if not text.rstrip().endswith(stamp):
                text = f"{text} {stamp}" if text else stamp
        if len(genres):
            text = f"{text} · {', '.join(genres)}"
        texts.append(text)
    return texts
