"""`/v1/users/{user_id}/taste-profile`: read it, edit it (`If-Match` against lost updates)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse

from service.api import deps
from service.api.errors import BadRevision, responses
from service.schemas import USER_ID
from service.taste import TasteEdits, TasteProfile

router = APIRouter()

UserId = Annotated[str, Path(pattern=USER_ID, examples=["196"])]
IfMatch = Annotated[
    str | None,
    Header(description="The revision the edit is based on (from ETag); stale → 412."),
]


@router.get(
    "/v1/users/{user_id}/taste-profile",
    response_model=TasteProfile,
    responses=responses(422),
)
async def get_taste_profile(user_id: UserId, request: Request) -> JSONResponse:
    """What the system believes about the user, and their edits (ETag: the revision)."""
    return _profile_response(await deps.profiles(request).get(user_id))


@router.patch(
    "/v1/users/{user_id}/taste-profile",
    response_model=TasteProfile,
    responses=responses(412, 422, 503),
)
async def patch_taste_profile(
    user_id: UserId, edits: TasteEdits, request: Request, if_match: IfMatch = None
) -> JSONResponse:
    """Adds edits: `more`, `less`, `forget` (genres, creators, item URIs)."""
    profiles = deps.profiles(request)
    await profiles.patch(user_id, edits, revision(if_match))
    return _profile_response(await profiles.get(user_id))


@router.delete(
    "/v1/users/{user_id}/taste-profile/edits",
    response_model=TasteProfile,
    responses=responses(412, 422, 503),
)
async def reset_taste_profile(
    user_id: UserId, request: Request, if_match: IfMatch = None
) -> JSONResponse:
    """Forgets every edit."""
    profiles = deps.profiles(request)
    await profiles.reset(user_id, revision(if_match))
    return _profile_response(await profiles.get(user_id))


def revision(if_match: str | None) -> int | None:
    """The revision an `If-Match` header names (`"3"`, `W/"3"` or `3`); None when absent."""
    if if_match is None:
        return None
    value = if_match.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise BadRevision(f"If-Match must be a revision number, got {if_match!r}")
    return int(value)


def _profile_response(profile: TasteProfile) -> JSONResponse:
    return JSONResponse(profile.model_dump(mode="json"), headers={"ETag": f'"{profile.revision}"'})
