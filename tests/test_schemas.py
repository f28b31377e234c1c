"""The REST request models refuse what JSON Schema would: numbers are numbers, not strings or
booleans that pydantic's lax mode would convert."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.events import Event
from service.schemas import RecommendationRequest

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
