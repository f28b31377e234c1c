"""Probes and the Prometheus scrape: `/healthz`, `/readyz`, `/metrics` (never need a key).

The probes also answer HEAD (load balancers' health checks often send it), with the
status code GET would give and no body; HEAD stays out of the API schema."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from pydantic import BaseModel, Field

from service import metrics
from service.api import deps

router = APIRouter()


class Readiness(BaseModel):
    ready: bool
    draining: bool = Field(False, description="SIGTERM received: finishing, then exiting.")
    bundle_version: str | None = Field(None, description="The bundle serving now.")
    bundle_path: str | None = None
    engine: str | None = None
    engine_state: str | None = Field(None, description="`ok` or `degraded`.")
    redis: str | None = Field(None, description="`ok` or `degraded`.")
    grpc_port: int | None = None


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Starting, or draining to exit."}},
)
async def readyz(request: Request) -> JSONResponse:
    """Bundle loaded and engine warm, and not shutting down; Redis reachable, or the answer
    says degraded."""
    rt = deps.runtime(request)
    serving = rt.serving
    if serving is None or rt.store is None or rt.draining:
        body = Readiness(ready=False, draining=rt.draining, bundle_version=rt.version)
        return JSONResponse(body.model_dump(), status_code=503)
    redis_ok = await rt.store.ping()
    engine_ok = await run_in_threadpool(serving.engine.ready)
    ready = Readiness(
        ready=True,
        bundle_version=serving.version,
        bundle_path=str(serving.bundle.dir),
        engine=rt.settings.engine,
        engine_state="ok" if engine_ok else "degraded",
        redis="ok" if redis_ok else "degraded",
        grpc_port=rt.grpc_port,
    )
    return JSONResponse(ready.model_dump())


router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus() -> Response:
    """The Prometheus text exposition."""
    body = generate_latest(metrics.REGISTRY) + generate_latest(DEFAULT_REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
