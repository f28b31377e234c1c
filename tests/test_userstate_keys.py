"""The Redis key schema's codecs: live event entries and the checkpoint filter."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from model_store.userstate.keys import (
    CONSUMED_TYPES,
    EVENT_TYPES,
    consumed_since,
    decode_live,
    encode_live,
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
