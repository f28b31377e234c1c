"""The serving bundle: one directory, one `manifest.json`, a sha256 for every file.

The manifest is the contract between the offline builder and the gateway. `verify`
refuses a bundle whose files are missing, altered or unlisted in a way that matters,
before anything is loaded from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from model_store.columns import mapped

if TYPE_CHECKING:
    from model_store.item_graph import ItemGraph
    from model_store.projector import Projector
    from model_store.reranker import Reranker
    from model_store.trie import SIDTrie
    from model_store.user_model import UserModel
    from model_store.vocab import Vocab

SCHEMA_VERSION = 2
"""2: per-item columns under `items/` (mapped, no per-item objects), float16 item and
content vectors, `ann.faiss` for catalogs above the exact-search size."""
MANIFEST = "manifest.json"
ITEMS_DIR = "items"
REQUIRED_FILES = (
    "catalog.parquet",
    "items/uri.bin",
    "items/uri.offsets.npy",
    "items/uri.hash.npy",
    "items/uri.order.npy",
    "items/title.bin",
    "items/genre.codes.npy",
    "items/popularity.npy",
    "items/sid_tokens.npy",
    "users.parquet",
    "sid_codes.npy",
    "sid_trie.npz",
    "item_embeddings.npy",
    "item_retrieval.npy",
    "content_vectors.npy",
    "user_embeddings.npy",
    "histories.npz",
    "reranker.txt",
    "llm/config.json",
)
"""What the gateway loads; a bundle without one of them cannot be served."""


class BundleError(ValueError):
    """The bundle cannot be served: the message names the file and the problem."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(directory: Path) -> list[str]:
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def content_version(dataset: str, files: dict[str, str]) -> str:
    """The bundle's name: its dataset and a digest of its files' checksums (equal builds
    match; any changed file changes it)."""
    content = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    return f"{dataset}-{content}"


def write_manifest(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Checksums every file and names the bundle by its content, so equal builds match."""
    files = {name: sha256_file(directory / name) for name in bundle_files(directory)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "bundle_version": content_version(str(meta["dataset"]), files),
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify(directory: Path) -> dict[str, Any]:
    """The manifest, after checking schema and every checksum; BundleError otherwise."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"{directory}: not a directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing manifest (partial or unfinished bundle?)")
    try:
        manifest = json.loads(path.read_bytes().decode())
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: not a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: no file checksums")
    if not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{path}: a checksum that is not a string")
    dataset = manifest.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        raise BundleError(f"{path}: no dataset name")
    version, expected = manifest.get("bundle_version"), content_version(dataset, files)
    if version != expected:  # two bundles must never share a version: rollouts go by it
        raise BundleError(f"{path}: bundle_version {version!r} is not {expected!r} (edited?)")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise BundleError(
            f"{path}: lacks {missing} (built by an older genrec?); rebuild it with `genrec build`"
        )
    for name, expected in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing")
        if sha256_file(file) != expected:
            raise BundleError(f"{file}: sha256 does not match the manifest (altered file)")
    return dict(manifest)


@dataclass
class Histories:
    """Per-user item sequences stored flat: items[offsets[u]:offsets[u+1]]."""

    items: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lists(cls, seqs: list[np.ndarray]) -> Histories:
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)
        return cls(items, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def to_lists(self) -> list[np.ndarray]:
        return [self[u] for u in range(len(self))]


class Bundle:
    """A verified bundle; each artifact loads on first use."""

    def __init__(self, directory: Path, verified: bool = True) -> None:
        """`verified=False` is for the builder reading its own unfinished output."""
        self.dir = Path(directory)
        self.manifest: dict[str, Any] = verify(self.dir) if verified else {}

    @property
    def version(self) -> str:
        return str(self.manifest.get("bundle_version", "unfinished"))

    @cached_property
    def catalog(self) -> pd.DataFrame:
        return pd.read_parquet(self.dir / "catalog.parquet")

    @cached_property
    def users(self) -> pd.DataFrame:
        return pd.read_parquet(self.dir / "users.parquet")

    def array(self, name: str) -> np.ndarray:
        """A bundle array mapped read-only: pages are read when touched and shared by every
        process serving the bundle, so no per-item table is copied into the heap."""
        return mapped(np.load(self.dir / name, mmap_mode="r", allow_pickle=False))

    def item_array(self, name: str) -> np.ndarray:
        """A per-item array of `items/` (popularity, year, ...), mapped."""
        return self.array(f"{ITEMS_DIR}/{name}.npy")

    def item_facet_names(self, facet: str) -> list[str]:
        """The distinct names of a per-item facet (genre, kind, creator)."""
        from model_store.columns import Strings

        return list(Strings(self.dir / ITEMS_DIR, f"{facet}.names"))

    @cached_property
    def sid_codes(self) -> np.ndarray:
        return self.array("sid_codes.npy")

    @cached_property
    def trie(self) -> SIDTrie:
        from model_store.trie import SIDTrie

        return SIDTrie.load(self.dir / "sid_trie.npz")

    @cached_property
    def vocab(self) -> Vocab:
        from model_store.vocab import Vocab

        return Vocab.load(self.dir / "llm")

    @cached_property
    def item_sid_ids(self) -> np.ndarray:
        """(n, L) SID token ids per item (int32), mapped."""
        return self.item_array("sid_tokens")

    @cached_property
    def item_vectors(self) -> np.ndarray:
        """User-model item vectors, float16, mapped."""
        return self.array("item_embeddings.npy")

    @cached_property
    def retrieval_vectors(self) -> np.ndarray:
        """Item vectors plus the user model's item prior (see `user_model.retrieval_vectors`),
        float32 (the prior's scale needs it; see BENCHMARKS.md), mapped."""
        return self.array("item_retrieval.npy")

    @cached_property
    def user_model_config(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "user_model.json").read_text()))

    @cached_property
    def content_vectors(self) -> np.ndarray:
        """Content vectors, float16, mapped."""
        return self.array("content_vectors.npy")

    @cached_property
    def user_embeddings(self) -> np.ndarray:
        return np.load(self.dir / "user_embeddings.npy")

    @cached_property
    def histories(self) -> Histories:
        with np.load(self.dir / "histories.npz") as f:
            return Histories(f["items"], f["offsets"])

    @cached_property
    def holdout(self) -> np.ndarray | None:
        path = self.dir / "holdout.npy"
        return np.load(path) if path.exists() else None

    @cached_property
    def item_graph(self) -> ItemGraph | None:
        """The reranker's item-to-item experts, mapped; None in bundles built before them."""
        from model_store.item_graph import load_item_graph

        return load_item_graph(self.dir)

    @cached_property
    def projector(self) -> Projector:
        from model_store.projector import load_projector

        return load_projector(self.dir)

    @cached_property
    def user_model(self) -> UserModel:
        from model_store.user_model import load_user_model

        return load_user_model(self.dir)

    @cached_property
    def reranker(self) -> Reranker:
        from model_store.reranker import load_reranker

        base = self.manifest.get("reranker", {}).get("base")
        return load_reranker(self.dir / "reranker.txt", base)

    @property
    def llm_dir(self) -> Path:
        return self.dir / "llm"


def load_bundle(directory: Path | str) -> Bundle:
    return Bundle(Path(directory))
