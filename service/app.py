"""REST transport and process lifecycle: the FastAPI app that loads the bundle, connects
Redis, starts the engine and the gRPC server, and serves `/v1/recommendations`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from fastapi import FastAPI, Header, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from model_store.bundle import Bundle, load_bundle
from service import logs, metrics
from service.auth import authorized, needs_key, presented_key
from service.engine import ServingEngine, open_serving_engine
from service.pipeline import Pipeline, UnknownItem
from service.profiles import Profiles, ProfileUnavailable, StaleRevision
from service.schemas import (
    USER_ID,
    ErrorBody,
    PlaylistRequest,
    RecommendationRequest,
    RecommendationResponse,
)
from service.settings import Settings
from service.store import EmbeddedRedis, UserStore, redis_url_or_embedded
from service.taste import TasteEdits, TasteProfile

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024

UserId = Annotated[str, Path(pattern=USER_ID, examples=["196"])]
IfMatch = Annotated[
    str | None,
    Header(description="The revision the edit is based on (from ETag); stale → 412."),
]


@dataclass
class Runtime:
    """Everything the lifespan starts, so shutdown can stop it in reverse."""

    settings: Settings
    bundle: Bundle | None = None
    engine: ServingEngine | None = None
    store: UserStore | None = None
    embedded: EmbeddedRedis | None = None
    pipeline: Pipeline | None = None
    grpc_server: Any = None
    grpc_port: int = 0
    started: float = field(default_factory=time.monotonic)


async def start(runtime: Runtime) -> None:
    from service.grpc_server import start_grpc

    s = runtime.settings
    runtime.bundle = load_bundle(s.bundle)
    url, runtime.embedded = redis_url_or_embedded(s.redis_url, s.redis_db)
    runtime.store = UserStore(url, s.redis_timeout_ms / 1000.0, s.redis_cooldown_s)
    runtime.engine = open_serving_engine(s, runtime.bundle)
    runtime.pipeline = Pipeline(runtime.bundle, runtime.engine, runtime.store, s)
    runtime.pipeline.warm()
    runtime.grpc_server, runtime.grpc_port = await start_grpc(
        runtime.pipeline, s.host, s.grpc_port, s.api_keys
    )
    log.info(
        "ready",
        bundle=runtime.bundle.version,
        engine=s.engine,
        rest=f"http://{s.host}:{s.port}",
        grpc=f"{s.host}:{runtime.grpc_port}",
        seconds=round(time.monotonic() - runtime.started, 1),
    )


async def stop(runtime: Runtime) -> None:
    if runtime.grpc_server is not None:
        await runtime.grpc_server.stop(grace=2.0)
    if runtime.pipeline is not None:
        runtime.pipeline.close()
    if runtime.engine is not None:
        runtime.engine.close()
    if runtime.store is not None:
        await runtime.store.close()
    if runtime.embedded is not None:
        runtime.embedded.close()


def _error(status: int, message: str, detail: object = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=message, detail=detail).model_dump(), status_code=status)


def create_app(settings: Settings | None = None, announce: str | None = None) -> FastAPI:
    """The app; `announce` is printed once the service is ready (the demo's sample request)."""
    runtime = Runtime(settings or Settings())
    logs.configure(runtime.settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await start(runtime)
        if announce:
            print(announce, flush=True)
        try:
            yield
        finally:
            await stop(runtime)

    app = FastAPI(
        title="genrec",
        version="1",
        summary="Generative recommendations over Semantic IDs, with constrained decoding.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        keys = runtime.settings.api_keys
        if needs_key(request.url.path, keys) and not authorized(
            presented_key(request.headers), keys
        ):
            return _error(401, "missing or unknown API key (Authorization: Bearer KEY)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        start = time.perf_counter()
        metrics.INFLIGHT.inc()
        status = 500  # what an exception escaping the app becomes
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            metrics.INFLIGHT.dec()
            route = request.scope.get("route")
            endpoint = f"{request.method} {route.path}" if route is not None else "unmatched"
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return _error(422, "invalid request", detail)

    @app.exception_handler(UnknownItem)
    async def unknown_item(request: Request, exc: UnknownItem) -> JSONResponse:
        return _error(404, str(exc), {"uri": exc.uri})

    @app.post(
        "/v1/recommendations",
        response_model=RecommendationResponse,
        responses={404: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    )
    async def recommendations(
        body: RecommendationRequest, request: Request
    ) -> RecommendationResponse:
        """Top-k items for one user on one surface, steered by their own words if given."""
        pipeline = _pipeline(runtime)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        resp = await pipeline.recommend(body, request_id=request_id[:64])
        log.info(
            "recommendations",
            request_id=resp.request_id,
            user=body.user_id,
            served_by=resp.served_by,
            degraded=resp.degraded,
            ms=resp.timings_ms.get("total"),
        )
        return resp

    @app.post(
        "/v1/playlists",
        response_model=RecommendationResponse,
        responses={413: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    )
    async def playlists(body: PlaylistRequest, request: Request) -> RecommendationResponse:
        """An ordered list following the user's words (genres, moods, eras, kinds), personal."""
        pipeline = _pipeline(runtime)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        return await pipeline.playlist(body, request_id=request_id[:64])

    def _profile_response(profile: TasteProfile) -> JSONResponse:
        return JSONResponse(
            profile.model_dump(mode="json"), headers={"ETag": f'"{profile.revision}"'}
        )

    @app.get(
        "/v1/users/{user_id}/taste-profile",
        response_model=TasteProfile,
        responses={422: {"model": ErrorBody}},
    )
    async def get_taste_profile(user_id: UserId) -> JSONResponse:
        """What the system believes about the user, and their edits (ETag: the revision)."""
        return _profile_response(await Profiles(_pipeline(runtime)).get(user_id))

    @app.patch(
        "/v1/users/{user_id}/taste-profile",
        response_model=TasteProfile,
        responses={412: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    async def patch_taste_profile(
        user_id: UserId, edits: TasteEdits, if_match: IfMatch = None
    ) -> JSONResponse:
        """Adds edits: `more`, `less`, `forget` (genres, creators, item URIs)."""
        profiles = Profiles(_pipeline(runtime))
        await profiles.patch(user_id, edits, _revision(if_match))
        return _profile_response(await profiles.get(user_id))

    @app.delete(
        "/v1/users/{user_id}/taste-profile/edits",
        response_model=TasteProfile,
        responses={412: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    async def reset_taste_profile(user_id: UserId, if_match: IfMatch = None) -> JSONResponse:
        """Forgets every edit."""
        profiles = Profiles(_pipeline(runtime))
        await profiles.reset(user_id, _revision(if_match))
        return _profile_response(await profiles.get(user_id))

    @app.exception_handler(StaleRevision)
    async def stale(request: Request, exc: StaleRevision) -> JSONResponse:
        return _error(412, str(exc), {"revision": exc.current})

    @app.exception_handler(ProfileUnavailable)
    async def unavailable(request: Request, exc: ProfileUnavailable) -> JSONResponse:
        return _error(503, f"taste profile unavailable: {exc}")

    @app.exception_handler(BadRevision)
    async def bad_revision(request: Request, exc: BadRevision) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Bundle loaded and engine warm; Redis reachable, or the answer says degraded."""
        if runtime.pipeline is None or runtime.store is None:
            return JSONResponse({"ready": False}, status_code=503)
        redis_ok = await runtime.store.ping()
        engine_ok = runtime.engine is not None and await run_in_threadpool(runtime.engine.ready)
        return JSONResponse(
            {
                "ready": True,
                "bundle_version": runtime.pipeline.bundle.version,
                "engine": runtime.settings.engine,
                "engine_state": "ok" if engine_ok else "degraded",
                "redis": "ok" if redis_ok else "degraded",
                "grpc_port": runtime.grpc_port,
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = generate_latest(metrics.REGISTRY) + generate_latest(DEFAULT_REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    from service import ui  # the web page at /ui and its two JSON endpoints

    app.include_router(ui.router(runtime))
    return app


class BadRevision(ValueError):
    """An If-Match header that is not a revision number."""


def _revision(if_match: str | None) -> int | None:
    if if_match is None:
        return None
    value = if_match.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise BadRevision(f"If-Match must be a revision number, got {if_match!r}")
    return int(value)


def _pipeline(runtime: Runtime) -> Pipeline:
    if runtime.pipeline is None:
        raise RuntimeError("the service is not started")
    return runtime.pipeline
