"""`/v1/users/{user_id}/taste-profile`: read it, edit it (`If-Match` against lost updates)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse

from service.api import deps
from service.schemas import USER_ID
from service.taste import TastePatch, TasteProfile

router = APIRouter()

UserId = Annotated[str, Path(pattern=USER_ID, examples=["196"])]
IF_MATCH = r'^\s*(W/)?("[0-9]{1,18}"|[0-9]{1,18})\s*$'
"""A revision as the ETag gives it (`"3"`), weak (`W/"3"`) or bare (`3`)."""
IfMatch = Annotated[
    str | None,
    Header(
        pattern=IF_MATCH,
        description="The revision the edit is based on (from ETag); stale → 412.",
        examples=['"0"'],
    ),
]
ETAG = {"ETag": {"description": "The revision, for If-Match.", "schema": {"type": "string"}}}


def _then(*operations: str) -> dict[int | str, dict[str, object]]:
    """The 200's ETag, and links to what a client does next with the same user (and, for
    edits, the revision it just read)."""
    links: dict[str, object] = {}
    for op in operations:
        parameters = {"user_id": "$request.path.user_id"}
        if op != "get_taste_profile":
            parameters["header.if-match"] = "$response.header.ETag"
        links[op] = {"operationId": op, "parameters": parameters}
    return {200: {"headers": ETAG, "links": links}}


@router.get(
    "/v1/users/{user_id}/taste-profile",
    response_model=TasteProfile,
    **deps.guarded("read", 422, extra=_then("patch_taste_profile", "reset_taste_profile")),
)
async def get_taste_profile(user_id: UserId, request: Request) -> JSONResponse:
    """What the system believes about the user, and their edits (ETag: the revision)."""
    return _profile_response(await deps.profiles(request).get(user_id))


@router.patch(
    "/v1/users/{user_id}/taste-profile",
    response_model=TasteProfile,
    **deps.guarded(
        "write", 409, 412, 413, 422, 503, extra=_then("get_taste_profile", "reset_taste_profile")
    ),
)
async def patch_taste_profile(
    user_id: UserId, edits: TastePatch, request: Request, if_match: IfMatch = None
) -> JSONResponse:
    """Adds edits: `more`, `less`, `forget` (genres, creators, item URIs)."""
    profiles = deps.profiles(request)
    await profiles.patch(user_id, edits, revision(if_match))
    return _profile_response(await profiles.get(user_id))


@router.delete(
    "/v1/users/{user_id}/taste-profile/edits",
    response_model=TasteProfile,
    **deps.guarded("write", 409, 412, 422, 503, extra=_then("get_taste_profile")),
)
async def reset_taste_profile(
    user_id: UserId, request: Request, if_match: IfMatch = None
) -> JSONResponse:
    """Forgets every edit."""
    profiles = deps.profiles(request)
    await profiles.reset(user_id, revision(if_match))
    return _profile_response(await profiles.get(user_id))


def revision(if_match: str | None) -> int | None:
    """The revision an `If-Match` header names (validated against IF_MATCH); None when
    absent."""
    if if_match is None:
        return None
    return int(if_match.strip().removeprefix("W/").strip('"'))


def _profile_response(profile: TasteProfile) -> JSONResponse:
    return JSONResponse(profile.model_dump(mode="json"), headers={"ETag": f'"{profile.revision}"'})
