"""`/v1/events`: listening events from product surfaces (play, finish, skip, like, dislike)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api import deps
from service.events import EventsAccepted, EventsRequest

router = APIRouter()


@router.post(
    "/v1/events",
    status_code=202,
    response_model=EventsAccepted,
    **deps.guarded("write", 413, 422, 503, ok=202),
)
async def events(body: EventsRequest, request: Request) -> EventsAccepted:
    """Up to 500 events; each valid one is in its user's history (or feedback) at once and in
    the log the daily embedding job reads. Bad events are rejected by index, the rest kept."""
    return await deps.events(request).ingest(body.events)
