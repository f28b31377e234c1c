"""The Redis key schema and value encodings: the one place key names are written.

The batch publisher, the gateway's reader and the reader's Lua scripts all take their key
names from here (the scripts through :func:`lua_versioned_key`, rendered from the same
constants), so the three can never disagree.

* ``emb:current``            → the active version, ``<bundle version>@<publish time>``
* ``emb:versions``           → published versions, newest first (old ones are deleted)
* ``emb:{version}:{user}``   → the user's embedding, float16 bytes
* ``hist:{version}:{user}``  → the user's recent item indices (bundle indices), int32 bytes
* ``profile:{user}``         → taste-profile edits: hash {rev, edits (JSON)}, not versioned

Histories are versioned with the embeddings because item indices belong to one bundle.
"""

from __future__ import annotations

import numpy as np

EMB = "emb"
HIST = "hist"
PROFILE = "profile"
CURRENT = f"{EMB}:current"
VERSIONS = f"{EMB}:versions"


def versioned_key(kind: str, version: str, user: str) -> str:
    """``{kind}:{version}:{user}`` for `kind` EMB or HIST."""
    return f"{kind}:{version}:{user}"


def lua_versioned_key(kind: str, version_expr: str, user_expr: str) -> str:
    """The same key as :func:`versioned_key`, as a Lua expression over two Lua values."""
    return f"'{kind}:' .. {version_expr} .. ':' .. {user_expr}"


def emb_key(version: str, user: str) -> str:
    return versioned_key(EMB, version, user)


def hist_key(version: str, user: str) -> str:
    return versioned_key(HIST, version, user)


def profile_key(user: str) -> str:
    return f"{PROFILE}:{user}"


def bundle_of(version: str) -> str:
    """The bundle version a published version belongs to."""
    return version.split("@", 1)[0]


def encode_embedding(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f2").tobytes()


def decode_embedding(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)


def encode_history(items: np.ndarray) -> bytes:
    return np.asarray(items, dtype="<i4").tobytes()


def decode_history(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i4").astype(np.int64)
