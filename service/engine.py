"""Engine selection: vLLM inside the gateway, or a vLLM server over HTTP; one interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog

from model_store.bundle import Bundle
from model_store.generation import Prompt, Session
from service.settings import Settings

log = structlog.get_logger(__name__)


class ServingEngine(Protocol):
    def open(self, prompts: Sequence[Prompt]) -> Session: ...

    def ready(self) -> bool:
        """Whether it answers now (a remote server's health check; in-process: not closed)."""
        ...

    def close(self) -> None: ...


def open_serving_engine(settings: Settings, bundle: Bundle) -> ServingEngine:
    """The configured engine, warmed up (the first generation compiles kernels)."""
    if settings.engine == "remote":
        from service.remote_engine import EngineError, RemoteEngine

        engine = RemoteEngine(
            settings.engine_url, bundle.llm_dir, timeout_s=settings.deadline_ms / 1000.0
        )
        try:
            engine.warmup()
        except EngineError as e:  # serve anyway: requests fall back to ANN until it answers
            log.warning(
                "engine server not answering at start", url=settings.engine_url, error=str(e)
            )
        return engine
    from model_store.engines import VLLMEngine

    return VLLMEngine(bundle.llm_dir, kv_cache_gib=settings.kv_cache_gib, warmup=True)
