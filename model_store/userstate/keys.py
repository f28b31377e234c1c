"""The Redis key schema and value encodings: the one place key names are written.

The batch publisher, the gateway's reader and the reader's Lua scripts all take their key
names from here (the scripts through :func:`lua_versioned_key`, rendered from the same
constants), so the three can never disagree.

* ``emb:current``            → the active version, ``<bundle version>@<publish time>``
* ``emb:versions``           → published versions, newest first (old ones are deleted)
* ``emb:{version}:{user}``   → the user's embedding, float16 bytes
* ``hist:{version}:{user}``  → the user's recent item indices (bundle indices), int32 bytes
* ``emb:meta:{version}``     → hash {checkpoint, snapshot, users, published_at} of a version
* ``emb:job``                → the lock of the running daily job (one run at a time)
* ``profile:{user}``         → taste-profile edits: hash {rev, edits (JSON)}, not versioned

Histories are versioned with the embeddings because item indices belong to one bundle.

Listening events (the real-time loop):

* ``events:log``             → the durable event log, a Stream: fields e (event id), u (user),
                               i (item URI), t (type), ts (seconds since the epoch)
* ``evseen:{event id}``      → an event id seen recently (deduplication, expires)
* ``live:{user}``            → the user's recent events, ``<stream id> <type> <URI>``, newest
                               last, capped at :data:`LIVE_MAX`
* ``dislike:{user}``         → URIs the user disliked (a set; never recommended again)
* ``skip:{user}``            → URIs the user skipped (a set; demoted)

An event is appended to the log and to the user's live list in one script, so what the
history shows and what the daily job reads cannot disagree. A version's ``checkpoint`` is
the last log entry its histories include: the reader adds only live events after it, so
an event is counted once whichever side of a flip it arrives on. Live entries hold URIs,
not item indices, so they survive a new bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

EMB = "emb"
HIST = "hist"
PROFILE = "profile"
CURRENT = f"{EMB}:current"
VERSIONS = f"{EMB}:versions"
EVENT_LOG = "events:log"
JOB_LOCK = f"{EMB}:job"
"""Held by the running `embed-users` job (a redis-py lock with an expiry)."""
LIVE_MAX = 500
"""Live events kept per user: more than a day of listening between two daily runs."""

EVENT_TYPES = ("play", "finish", "skip", "like", "dislike")
CONSUMED_TYPES = frozenset({"play", "finish", "like"})
"""Event types that put the item in the user's history (and so out of their answers)."""

NO_CHECKPOINT = "0-0"
"""The checkpoint of a version that consumed no events (every live event is shown)."""


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


def meta_key(version: str) -> str:
    return f"{EMB}:meta:{version}"


def lua_meta_key(version_expr: str) -> str:
    """:func:`meta_key` as a Lua expression."""
    return lua_key(meta_key, version_expr)


def seen_event_key(event_id: str) -> str:
    return f"evseen:{event_id}"


def live_key(user: str) -> str:
    return f"live:{user}"


def dislikes_key(user: str) -> str:
    return f"dislike:{user}"


def skips_key(user: str) -> str:
    return f"skip:{user}"


def lua_key(key: Callable[[str], str], expr: str) -> str:
    """The key `key(x)` names, as a Lua expression for x = `expr` (the prefix comes from the
    same function the Python side calls, so the two cannot drift apart)."""
    return f"'{key('')}' .. {expr}"


def stream_position(stream_id: str) -> tuple[int, int]:
    """A Stream entry id (``<ms>-<seq>``) as a comparable pair."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def encode_live(stream_id: str, event_type: str, uri: str) -> str:
    return f"{stream_id} {event_type} {uri}"


def decode_live(raw: str) -> tuple[str, str, str]:
    """(stream id, type, URI) of a live entry."""
    stream_id, event_type, uri = raw.split(" ", 2)
    return stream_id, event_type, uri


def consumed_since(live: Iterable[str], checkpoint: str | None) -> list[str]:
    """URIs of the live events after `checkpoint` (None: all) that put an item in the
    history, oldest first: what a version's histories do not hold yet."""
    after = stream_position(checkpoint or NO_CHECKPOINT)
    out = []
    for raw in live:
        stream_id, event_type, uri = decode_live(raw)
        if event_type in CONSUMED_TYPES and stream_position(stream_id) > after:
            out.append(uri)
    return out


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
