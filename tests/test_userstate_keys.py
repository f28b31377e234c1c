"""The Redis key schema: one slot per user's state (Redis Cluster), the codecs of live event
entries, and the checkpoint filter."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from model_store.userstate.keys import (
    ACTIVE,
    BUCKETS,
    CONSUMED_TYPES,
    CURRENT,
    EVENT_TYPES,
    JOB_LOCK,
    VERSIONS,
    bucket_of,
    checkpoint_before,
    consumed_since,
    decode_live,
    dislikes_key,
    encode_live,
    event_log_key,
    first_after,
    live_key,
    meta_key,
    profile_key,
    seen_event_key,
    skips_key,
    state_key,
    stream_position,
)

URIS = st.from_regex(r"[a-z0-9][a-z0-9\-]{0,8}:[a-z]{1,8}:[A-Za-z0-9_.\-]{1,16}", fullmatch=True)
# Stream entry ids as Redis writes them (never 0-0, the "nothing consumed" checkpoint).
IDS = st.tuples(st.integers(1, 2**48), st.integers(0, 2**20)).map(lambda t: f"{t[0]}-{t[1]}")


@given(IDS, st.sampled_from(EVENT_TYPES), URIS)
def test_live_entries_round_trip(stream_id: str, kind: str, uri: str) -> None:
    assert decode_live(encode_live(stream_id, kind, uri)) == (stream_id, kind, uri)


@given(st.lists(st.tuples(IDS, st.sampled_from(EVENT_TYPES), URIS), max_size=30), IDS)
def test_consumed_since_keeps_consuming_events_after_the_checkpoint_in_order(
    events: list[tuple[str, str, str]], checkpoint: str
) -> None:
    live = [encode_live(*e) for e in events]
    expected = [
        uri for sid, kind, uri in events
        if kind in CONSUMED_TYPES and stream_position(sid) > stream_position(checkpoint)
    ]  # fmt: skip
    assert consumed_since(live, checkpoint) == expected
    assert consumed_since(live, None) == [u for _, k, u in events if k in CONSUMED_TYPES]


def test_stream_positions_compare_numerically_not_as_text() -> None:
    assert stream_position("10-0") > stream_position("9-5")
    assert stream_position("9-10") > stream_position("9-9")
    assert stream_position("0-0") < stream_position("0-1")


USERS = st.text(st.characters(codec="utf-8", exclude_characters="{}"), min_size=1, max_size=40)


@given(USERS, st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_every_key_of_a_user_is_in_one_cluster_slot(user: str, version: str, event: str) -> None:
    keys = [
        state_key(version, user), profile_key(user), live_key(user), dislikes_key(user),
        skips_key(user), event_log_key(user), seen_event_key(user, event),
    ]  # fmt: skip
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert 0 <= bucket_of(user) < BUCKETS


def test_buckets_are_stable_and_spread_users_evenly_over_primaries() -> None:
    assert bucket_of("196") == 3734  # crc32: the same in every process and language
    counts = [0] * 64  # 64 primaries, each serving a contiguous 64th of the slots
    for i in range(200_000):
        counts[key_slot(event_log_key(f"user-{i}").encode()) * 64 // 16384] += 1
    assert max(counts) / min(counts) < 1.25


def test_the_control_keys_share_one_slot() -> None:
    control = (CURRENT, ACTIVE, VERSIONS, JOB_LOCK, meta_key("b@1"))
    slots = {key_slot(k.encode()) for k in control}
    assert len(slots) == 1


@given(st.integers(1, 2**48), IDS)
def test_a_checkpoint_splits_stream_ids_at_its_millisecond(ms: int, stream_id: str) -> None:
    checkpoint = checkpoint_before(ms)
    after = stream_position(stream_id) > stream_position(checkpoint)
    assert after == (stream_position(stream_id)[0] >= ms)
    assert stream_position(first_after(checkpoint)) == (ms, 0)  # what a trim keeps
