"""`/v1/admin/bundle`: roll a new bundle out without a restart (the `admin` scope)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from service.api import deps
from service.api.serving import Rollout, under_root
from service.schemas import Strict

router = APIRouter()


class BundleRequest(Strict):
    path: str = Field(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._\-/]{0,254}$",
        description="A bundle directory under GENREC_BUNDLE_ROOT (symlinks resolved).",
        examples=["ml-100k-2024-06-01"],
    )


@router.post(
    "/v1/admin/bundle", response_model=Rollout, **deps.guarded("admin", 403, 404, 409, 413, 422)
)
async def rollout_bundle(body: BundleRequest, request: Request) -> Rollout:
    """Verifies every checksum of the bundle, opens and warms its engine, then swaps it in;
    requests in flight finish on the old one. A refused bundle (422) changes nothing; the
    answer names the previous bundle, and rolling it out again is the rollback."""
    rt = deps.runtime(request)
    return await rt.reload(under_root(rt.settings.bundle_root, body.path))
