"""The FastAPI app, assembled: lifespan (start and stop the runtime), middleware, the error
table's handlers, and the routers. Nothing else lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import logs
from service.api import contract, errors, middleware, ui
from service.api.routes import admin, events, probes, profiles, recommendations
from service.api.runtime import Runtime
from service.settings import Settings


def create_app(settings: Settings | None = None, announce: str | None = None) -> FastAPI:
    """The app; `announce` is printed once the service is ready (the demo's sample request)."""
    runtime = Runtime(settings or Settings())
    logs.configure(runtime.settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        if announce:
            print(announce, flush=True)
        try:
            yield
        finally:
            await runtime.stop()

    # /docs and /redoc from files the image carries: FastAPI's load Swagger UI from a CDN,
    # which a cluster without egress cannot reach (the page stays blank).
    app = FastAPIOffline(
        title="genrec",
        version="1",
        summary="Generative recommendations over Semantic IDs, with constrained decoding.",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # links name operations
    )
    app.state.runtime = runtime
    # The last added is the outermost: the metrics see every answer, the body cap's 413s too;
    # the cap still comes before anything reads the body.
    app.add_middleware(middleware.BodyLimit)
    app.middleware("http")(middleware.observe(runtime))
    errors.install(app)
    routers = (
        recommendations.router, profiles.router, events.router, admin.router, probes.router,
        ui.router,
    )  # fmt: skip
    for router in routers:
        app.include_router(router)
    contract.install(app, keys_enforced=bool(runtime.settings.api_keys))
    return app
