"""Probes and the Prometheus scrape: `/healthz`, `/readyz`, `/metrics` (never need a key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from service import metrics
from service.api import deps

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Bundle loaded and engine warm; Redis reachable, or the answer says degraded."""
    rt = deps.runtime(request)
    if rt.recommendations is None or rt.store is None:
        return JSONResponse({"ready": False}, status_code=503)
    redis_ok = await rt.store.ping()
    engine_ok = rt.engine is not None and await run_in_threadpool(rt.engine.ready)
    return JSONResponse(
        {
            "ready": True,
            "bundle_version": rt.recommendations.bundle.version,
            "engine": rt.settings.engine,
            "engine_state": "ok" if engine_ok else "degraded",
            "redis": "ok" if redis_ok else "degraded",
            "grpc_port": rt.grpc_port,
        }
    )


@router.get("/metrics")
async def prometheus() -> Response:
    body = generate_latest(metrics.REGISTRY) + generate_latest(DEFAULT_REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
