"""The web page at `/ui` (plain HTML + JS + CSS from `service/static/`, no build step) and the
two JSON endpoints only it needs: a list of user ids, and a 2-D map of the shared embedding
space (a PCA of the item vectors, with the user's embedding projected onto it).

Everything else the page shows comes from the public API: the taste profile (and its
edits, with `If-Match`), recommendations and playlists.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from model_store.bundle import Bundle
from service.api import deps
from service.api.errors import error_response
from service.schemas import MAX_K, USER_ID, RecommendationRequest
from service.trace import Trace

STATIC = FilePath(__file__).parents[1] / "static"
MAX_USERS = 1000


class UserList(BaseModel):
    users: list[str] = Field(description="User ids of the bundle, in bundle order.")
    total: int = Field(description="How many users the bundle has.")
    genres: list[str] = Field(description="Every genre of the catalog (for taste edits).")
    bundle_version: str


class Point(BaseModel):
    x: float
    y: float


class MapItem(Point):
    uri: str
    title: str


class UserMap(BaseModel):
    bundle_version: str
    explained_variance: list[float] = Field(description="Share of item variance per axis.")
    items: list[MapItem] = Field(description="Every catalog item, in catalog order.")
    user: Point | None = Field(description="The user's embedding; None without one.")
    history: list[str] = Field(description="URIs the user consumed.")
    recommended: list[str] = Field(description="URIs of the user's top k (k=0: none asked).")
    degraded: list[str] = Field(description="Why the user's point or history may be missing.")


@dataclass(frozen=True)
class Projection:
    """A 2-D PCA of the item vectors: `mean` and `axes` (2, d) project any vector."""

    mean: np.ndarray
    axes: np.ndarray
    explained: list[float]
    coords: np.ndarray  # (n items, 2)

    def project(self, vector: np.ndarray) -> np.ndarray:
        return np.asarray((np.asarray(vector, np.float64) - self.mean) @ self.axes.T)


def pca_2d(vectors: np.ndarray) -> Projection:
    """PCA by SVD; each axis's sign is fixed so its largest loading is positive, so equal
    vectors always give the same picture."""
    x = np.asarray(vectors, dtype=np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:2].copy()
    if axes.shape[0] < 2:  # one-dimensional vectors: a flat second axis
        axes = np.vstack([axes, np.zeros_like(axes)])
    for row in axes:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1.0
    variance = s**2
    explained = [float(v / variance.sum()) if variance.sum() > 0 else 0.0 for v in variance[:2]]
    return Projection(mean, axes, explained, (x - mean) @ axes.T)


class Projections:
    """The 2-D map of each bundle, computed once, off the event loop."""

    def __init__(self) -> None:
        self._done: dict[str, Projection] = {}
        self._lock = asyncio.Lock()

    async def of(self, bundle: Bundle) -> Projection:
        async with self._lock:
            if bundle.version not in self._done:
                self._done[bundle.version] = await run_in_threadpool(pca_2d, bundle.item_vectors)
            return self._done[bundle.version]


PROJECTIONS = Projections()
router = APIRouter()


@router.get("/", include_in_schema=False)
async def home() -> RedirectResponse:
    """A browser pointed at the gateway lands on its page."""
    return RedirectResponse("/ui")


@router.get("/ui", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/static/{name}", include_in_schema=False, response_model=None)
async def static(
    name: Annotated[str, Path(pattern=r"^[a-z][a-z0-9_\-]*\.(js|css|png|ico)$")],
) -> FileResponse | JSONResponse:
    path = STATIC / name
    if not path.is_file():
        return error_response(404, f"no static file {name!r}")
    return FileResponse(path, headers={"Cache-Control": "no-cache"})


@router.get("/v1/ui/users", response_model=UserList, **deps.guarded("read", 422))
async def users(
    request: Request, limit: Annotated[int, Query(ge=1, le=MAX_USERS)] = 50
) -> UserList:
    """Some user ids of the bundle (the first `limit`), and the catalog's genres."""
    service = deps.recommendations(request)
    catalog = service.catalog
    return UserList(
        users=catalog.user_ids[:limit],
        total=len(catalog.user_ids),
        genres=sorted(catalog.genre_names),
        bundle_version=service.bundle.version,
    )


@router.get("/v1/ui/map", response_model=UserMap, **deps.guarded("read", 422, 503))
async def user_map(
    request: Request,
    user_id: Annotated[str | None, Query(pattern=USER_ID, examples=["196"])] = None,
    k: Annotated[int, Query(ge=0, le=MAX_K)] = 10,
) -> UserMap:
    """Every catalog item in 2-D (PCA of the item vectors), the user's embedding projected
    the same way, their history and (k > 0) their current top k recommendations."""
    service = deps.recommendations(request)
    catalog = service.catalog
    pca = await PROJECTIONS.of(service.bundle)
    user: Point | None = None
    history: list[str] = []
    recommended: list[str] = []
    trace = Trace()
    if user_id is not None:
        facts = await service.users.read(user_id, trace)
        if facts.embedding is not None:
            x, y = pca.project(facts.embedding)
            user = Point(x=round(float(x), 5), y=round(float(y), 5))
        history = [catalog.uris[i] for i in facts.history]
        if k:
            resp = await service.recommend(RecommendationRequest(user_id=user_id, k=k))
            recommended = [item.uri for item in resp.items]
    items = [
        MapItem(uri=uri, title=title, x=round(float(x), 5), y=round(float(y), 5))
        for uri, title, (x, y) in zip(catalog.uris, catalog.titles, pca.coords, strict=True)
    ]
    return UserMap(
        bundle_version=service.bundle.version,
        explained_variance=[round(v, 4) for v in pca.explained],
        items=items,
        user=user,
        history=history,
        recommended=recommended,
        degraded=trace.degraded,
    )
