"""The REST request models refuse what JSON Schema would: numbers are numbers, not strings or
booleans that pydantic's lax mode would convert, and a prompt has something to read."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.events import Event
from service.schemas import INVISIBLE, VISIBLE, PlaylistRequest, RecommendationRequest

EVENT = {"event_id": "e1", "user_id": "1", "item": "ml-100k:movie:1", "type": "play"}


@pytest.mark.parametrize(
    ("age", "ok"),
    [(25, True), (25.0, True), (None, True), ("25", False), (True, False), (25.5, False)],
)
def test_context_age_is_a_whole_number(age: Any, ok: bool) -> None:
    body = {"user_id": "1", "context": {"age": age}}
    if ok:
        request = RecommendationRequest.model_validate(body)
        assert request.context is not None and request.context.age == age
    else:
        with pytest.raises(ValidationError, match=r"context\.age"):
            RecommendationRequest.model_validate(body)


@pytest.mark.parametrize(
    ("ts", "ok"),
    [
        (1767225600, True),
        (1767225600.5, True),
        (None, True),
        ("1767225600", False),
        (True, False),
        (False, False),
    ],
)
def test_event_ts_is_a_number(ts: Any, ok: bool) -> None:
    if ok:
        assert Event.model_validate({**EVENT, "ts": ts}).ts == ts
    else:
        with pytest.raises(ValidationError, match="ts"):
            Event.model_validate({**EVENT, "ts": ts})


@pytest.mark.parametrize(
    ("prompt", "ok"),
    [
        ("horror", True),
        ("\u200bhorror\u200b", True),
        ("日本のアニメ", True),
        ("\u0301", True),  # a combining mark alone still shows
        ("😀", True),
        ("", False),
        ("   ", False),
        ("\u00a0\t\n", False),  # non-breaking space, tab, newline
        ("\u200b\u200b", False),  # zero-width spaces
        ("\ufeff\u2060\u200e\u202e", False),  # BOM, word joiner, bidi marks
        ("\x00\x1f\x7f", False),  # controls
        ("\u2028\u2029\u3000", False),  # separators, ideographic space
        ("\U000e0068\U000e0069", False),  # tag characters ("hi", unseen)
    ],
)
def test_a_playlist_prompt_needs_a_visible_character(prompt: str, ok: bool) -> None:
    body = {"user_id": "1", "prompt": prompt}
    if ok:
        assert PlaylistRequest.model_validate(body).prompt == prompt
    else:
        with pytest.raises(ValidationError, match="prompt"):
            PlaylistRequest.model_validate(body)


@given(st.text(max_size=20))
def test_the_prompt_pattern_means_the_same_to_pydantic_and_to_python_re(prompt: str) -> None:
    """The contract test generates prompts from the pattern with Python's `re`; pydantic
    validates with Rust's regex: both, and the categories, must agree on every text."""
    visible = any(unicodedata.category(c) not in INVISIBLE for c in prompt)
    assert (re.search(VISIBLE, prompt) is not None) == visible
    try:
        PlaylistRequest.model_validate({"user_id": "1", "prompt": prompt})
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == visible
