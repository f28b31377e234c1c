"""What the process starts and stops: bundle, Redis, engine, the use cases, the gRPC server.

The one place the parts are wired together; routers reach the result through
`request.app.state.runtime` (see `service.api.deps`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from model_store.bundle import Bundle, load_bundle
from model_store.engines import open_engine
from model_store.engines.base import EngineError
from model_store.generation import Engine
from model_store.userstate.connect import EmbeddedRedis, redis_url_or_embedded
from service.events import Events
from service.profiles import Profiles
from service.recommendations import Recommendations
from service.settings import Settings
from service.userstore import UserStore

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    """Everything the lifespan starts, so shutdown can stop it in reverse."""

    settings: Settings
    bundle: Bundle | None = None
    engine: Engine | None = None
    store: UserStore | None = None
    embedded: EmbeddedRedis | None = None
    recommendations: Recommendations | None = None
    profiles: Profiles | None = None
    events: Events | None = None
    grpc_server: Any = None
    grpc_port: int = 0
    started: float = field(default_factory=time.monotonic)

    async def start(self) -> None:
        from service.api.grpc_server import start_grpc

        s = self.settings
        self.bundle = load_bundle(s.bundle)
        url, self.embedded = redis_url_or_embedded(s.redis_url, s.redis_db)
        self.store = UserStore(url, s.redis_timeout_ms / 1000.0, s.redis_cooldown_s)
        self.engine = open_serving_engine(s, self.bundle)
        self.recommendations = Recommendations.create(self.bundle, self.engine, self.store, s)
        self.recommendations.warm()
        self.profiles = Profiles(
            self.recommendations.users, self.store, self.recommendations.catalog
        )
        self.events = Events(
            self.recommendations.catalog, self.store, int(s.event_dedup_hours * 3600)
        )
        self.grpc_server, self.grpc_port = await start_grpc(
            self.recommendations, self.events, s.host, s.grpc_port, s.api_keys
        )
        log.info(
            "ready",
            bundle=self.bundle.version,
            engine=s.engine,
            rest=f"http://{s.host}:{s.port}",
            grpc=f"{s.host}:{self.grpc_port}",
            seconds=round(time.monotonic() - self.started, 1),
        )

    async def stop(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2.0)
        if self.recommendations is not None:
            self.recommendations.close()
        if self.engine is not None:
            self.engine.close()
        if self.store is not None:
            await self.store.close()
        if self.embedded is not None:
            self.embedded.close()


def open_serving_engine(settings: Settings, bundle: Bundle) -> Engine:
    """The configured engine, warmed up (the first generation compiles kernels). A remote
    server that does not answer yet is not fatal: requests fall back until it does."""
    if settings.engine == "inprocess":
        return open_engine("vllm", bundle.llm_dir, kv_cache_gib=settings.kv_cache_gib)
    engine = open_engine(
        "remote",
        bundle.llm_dir,
        base_url=settings.engine_url,
        timeout_s=settings.deadline_ms / 1000.0,
    )
    try:
        engine.warm()
    except EngineError as e:
        log.warning("engine server not answering at start", url=settings.engine_url, error=str(e))
    return engine
