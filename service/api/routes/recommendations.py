"""`/v1/recommendations` (product surfaces) and `/v1/playlists` (prompted lists)."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter, Request

from service.api import deps
from service.schemas import PlaylistRequest, RecommendationRequest, RecommendationResponse

log = structlog.get_logger(__name__)
router = APIRouter()

PROFILE_LINK: dict[int | str, dict[str, Any]] = {
    200: {
        "links": {
            "taste_profile": {
                "operationId": "get_taste_profile",
                "parameters": {"user_id": "$request.body#/user_id"},
            }
        }
    }
}
"""What a client looks at next: the taste profile of the user it was served for."""


@router.post(
    "/v1/recommendations",
    response_model=RecommendationResponse,
    **deps.guarded("read", 404, 413, 422, 503, extra=PROFILE_LINK),
)
async def recommendations(body: RecommendationRequest, request: Request) -> RecommendationResponse:
    """Top-k items for one user on one surface, steered by their own words if given."""
    resp = await deps.recommendations(request).recommend(body, deps.request_id(request))
    log.info(
        "recommendations",
        request_id=resp.request_id,
        user=body.user_id,
        served_by=resp.served_by,
        degraded=resp.degraded,
        ms=resp.timings_ms.get("total"),
    )
    return resp


@router.post(
    "/v1/playlists",
    response_model=RecommendationResponse,
    **deps.guarded("read", 413, 422, 503, extra=PROFILE_LINK),
)
async def playlists(body: PlaylistRequest, request: Request) -> RecommendationResponse:
    """An ordered list following the user's words (genres, moods, eras, kinds), personal."""
    return await deps.recommendations(request).playlist(body, deps.request_id(request))
