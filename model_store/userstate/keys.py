"""The Redis key schema and value encodings: the one place key names are written.

One schema serves a single Redis server and a Redis Cluster alike. Every key that belongs to
a user carries the hash tag of the user's *bucket*, ``{b<N>}`` (N = crc32 of the user id
modulo :data:`BUCKETS`), so all of a user's state sits in one cluster slot and one script
call can read or change it. The tag is the bucket and not the user because an event must be
appended to the durable log and to its user's live list in one script: the log is sharded
per bucket, so each log shard shares its slot with the users it records.

Per user (``{b}`` is the user's bucket tag):

* ``state:{b}:{version}``    → hash of a published version's users in bucket b: field
                               ``e:<user>`` the embedding (float16 bytes), ``h:<user>`` the
                               recent item indices (int32 bytes; they belong to one bundle)
* ``profile:{b}:{user}``     → taste-profile edits: hash {rev, edits (JSON)}, not versioned
* ``events:{b}``             → bucket b's shard of the durable event log, a Stream: fields
                               e (event id), u (user), i (item URI), t (type), ts (seconds)
* ``evseen:{b}:{event id}``  → an event id seen recently (deduplication, expires)
* ``live:{b}:{user}``        → the user's recent events, ``<stream id> <type> <URI>``, newest
                               last, capped at :data:`LIVE_MAX`
* ``dislike:{b}:{user}``     → URIs the user disliked (a set; never recommended again)
* ``skip:{b}:{user}``        → URIs the user skipped (a set; demoted)

A version is one hash per bucket, so deleting one is an UNLINK of :data:`BUCKETS` known key
names per kind, never a scan.

Control keys, all under one tag (``{ctl}``) so a flip is one atomic script in a cluster too:

* ``emb:{ctl}:current``      → the active version, ``<bundle version>@<publish time>``
* ``emb:{ctl}:active``       → hash {version, checkpoint}: the same, with its checkpoint, in
                               one read (what gateways cache)
* ``emb:{ctl}:versions``     → published versions, newest first (old ones are deleted)
* ``emb:{ctl}:meta:{version}`` → hash {checkpoint, snapshot, users, published_at}
* ``emb:{ctl}:job``          → the lock of the running daily job (one run at a time)
* ``emb:{ctl}:building``     → hash {version, snapshot} of the daily job's run in progress,
                               written before its first write: what the next run deletes
                               when this one was killed before its own cleanup

Gateways cache the active version (and its checkpoint) for a few seconds instead of
reading ``emb:{ctl}:active`` per request, which in a cluster would be one hot key on one
shard; a reader passes its cached version to the fetch script, which reads that version's
embedding and history only, so one answer never mixes two versions.

A version's ``checkpoint`` is the last log position its histories include, the same on
every shard: ``<ms>-<max seq>`` where ms is just below the lowest clock of the primaries
when the daily job started (see ``model_store.embed_users``). Stream ids on a shard are at
least that shard's clock, so every event logged after the job read the clocks lies after
the checkpoint on its own shard, and the reader adds exactly the live events after it: an
event is counted once whichever side of a flip it arrives on. Live entries hold URIs, not
item indices, so they survive a new bundle.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

BUCKETS = 16384
"""Buckets (hash tags) users are spread over. As many as a cluster has slots: with B buckets
over P primaries each primary holds B/P ± sqrt(B/P) of them, so 16384 keeps the memory of
64 primaries within ±6 % (1σ) of each other, where 1024 buckets would leave ±25 %. The
daily job reads every bucket's log shard (pipelined per node, a fraction of a second)."""

CONTROL_TAG = "{ctl}"
CURRENT = f"emb:{CONTROL_TAG}:current"
ACTIVE = f"emb:{CONTROL_TAG}:active"
VERSIONS = f"emb:{CONTROL_TAG}:versions"
JOB_LOCK = f"emb:{CONTROL_TAG}:job"
"""Held by the running `embed-users` job (a redis-py lock with an expiry)."""
BUILDING = f"emb:{CONTROL_TAG}:building"
"""The run in progress of the `embed-users` job: {version, snapshot}."""
LIVE_MAX = 500
"""Live events kept per user: more than a day of listening between two daily runs."""

EVENT_TYPES = ("play", "finish", "skip", "like", "dislike")
CONSUMED_TYPES = frozenset({"play", "finish", "like"})
"""Event types that put the item in the user's history (and so out of their answers)."""

NO_CHECKPOINT = "0-0"
"""The checkpoint of a version that consumed no events (every live event is shown)."""
MAX_SEQ = 2**64 - 1
"""The largest sequence number of a Stream id: ``<ms>-<MAX_SEQ>`` ends millisecond ms."""


def bucket_of(user: str) -> int:
    """The user's bucket: stable across processes, languages and Redis topologies."""
    return zlib.crc32(user.encode()) % BUCKETS


def bucket_tag(bucket: int) -> str:
    return f"{{b{bucket}}}"


def _tag(user: str) -> str:
    return bucket_tag(bucket_of(user))


def state_key(version: str, user: str) -> str:
    """The hash that holds `user`'s embedding and history in `version`."""
    return bucket_state_key(version, bucket_of(user))


def bucket_state_key(version: str, bucket: int) -> str:
    return f"state:{bucket_tag(bucket)}:{version}"


EMB_FIELD = "e:"
HIST_FIELD = "h:"


def emb_field(user: str) -> str:
    return EMB_FIELD + user


def hist_field(user: str) -> str:
    return HIST_FIELD + user


def profile_key(user: str) -> str:
    return f"profile:{_tag(user)}:{user}"


def meta_key(version: str) -> str:
    return f"emb:{CONTROL_TAG}:meta:{version}"


def event_log_key(user: str) -> str:
    """The log shard that records `user`'s events."""
    return bucket_log_key(bucket_of(user))


def bucket_log_key(bucket: int) -> str:
    return f"events:{bucket_tag(bucket)}"


def seen_event_key(user: str, event_id: str) -> str:
    """Deduplication is per user's bucket: an event id is its device's, hence its user's."""
    return f"evseen:{_tag(user)}:{event_id}"


def live_key(user: str) -> str:
    return f"live:{_tag(user)}:{user}"


def dislikes_key(user: str) -> str:
    return f"dislike:{_tag(user)}:{user}"


def skips_key(user: str) -> str:
    return f"skip:{_tag(user)}:{user}"


def stream_position(stream_id: str) -> tuple[int, int]:
    """A Stream entry id (``<ms>-<seq>``) as a comparable pair."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def checkpoint_before(ms: int) -> str:
    """The last Stream position before millisecond `ms` (every shard's ids compare to it)."""
    return f"{ms - 1}-{MAX_SEQ}" if ms > 0 else NO_CHECKPOINT


def first_after(checkpoint: str) -> str:
    """The first Stream position after `checkpoint` (for XTRIM MINID: what stays)."""
    ms, seq = stream_position(checkpoint)
    return f"{ms + 1}-0" if seq >= MAX_SEQ else f"{ms}-{seq + 1}"


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
