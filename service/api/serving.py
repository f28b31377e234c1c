"""One bundle's request path, opened and closed as a unit: bundle, engine and use cases.

A rollout opens a whole new :class:`Serving` next to the one serving now and swaps the
runtime's reference (`service.api.runtime`); each request leases the one it started on, so
it finishes there, and the old one closes once its last lease is returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydantic import BaseModel, Field

from model_store.bundle import Bundle, BundleError, load_bundle
from model_store.engines import open_engine
from model_store.engines.base import EngineError
from model_store.generation import Engine
from service.events import Events
from service.profiles import Profiles
from service.recommendations import Recommendations
from service.settings import Settings
from service.userstore import UserStore

log = structlog.get_logger(__name__)


class BundleNotFound(BundleError):
    """No bundle directory at the requested path under the bundle root."""


class OutsideRoot(BundleError):
    """The requested path leaves `GENREC_BUNDLE_ROOT` (`..`, an absolute path, a symlink)."""


class RolloutBusy(Exception):
    """Another rollout is under way; one at a time."""


class Rollout(BaseModel):
    """What a rollout did: the version serving now and the one before (for a rollback)."""

    bundle_version: str
    path: str
    previous_version: str
    previous_path: str
    changed: bool = Field(description="False: that bundle was serving already.")
    seconds: float = Field(description="Verifying, opening and warming the new bundle.")


@dataclass
class Serving:
    """Everything that belongs to one bundle; `leases` counts the requests using it."""

    bundle: Bundle
    engine: Engine
    recommendations: Recommendations
    profiles: Profiles
    events: Events
    leases: int = 0
    opened: float = field(default_factory=time.monotonic)

    @property
    def version(self) -> str:
        return self.bundle.version

    @contextmanager
    def lease(self) -> Iterator[Serving]:
        """Holds this bundle open for one request (event-loop thread only)."""
        self.leases += 1
        try:
            yield self
        finally:
            self.leases -= 1

    async def drained(self, timeout_s: float) -> bool:
        """Waits until no request holds a lease (True), or `timeout_s` passes (False)."""
        end = time.monotonic() + timeout_s
        while self.leases > 0 and time.monotonic() < end:
            await asyncio.sleep(0.02)
        return self.leases == 0

    def close(self) -> None:
        """Stops the engine worker (after what it has queued), then the engine."""
        self.recommendations.close()
        self.engine.close()


def verified_bundle(directory: Path) -> Bundle:
    """The bundle at `directory` after checking every checksum (BundleError otherwise).
    The path is resolved first, so a later switch of a `current` symlink cannot change
    where this bundle's lazily loaded files are read from."""
    return load_bundle(directory.resolve())


def open_serving(settings: Settings, bundle: Bundle, store: UserStore | None) -> Serving:
    """Opens and warms an engine over a verified bundle and builds the use cases;
    BundleError when any of it fails, with nothing left open. Blocking (seconds):
    rollouts call it off the event loop."""
    opened: list[Engine | Recommendations] = []
    try:
        engine = open_serving_engine(settings, bundle)
        opened.append(engine)
        recommendations = Recommendations.create(bundle, engine, store, settings)
        opened.append(recommendations)
        recommendations.warm()
    except Exception as e:
        for part in reversed(opened):
            part.close()
        raise BundleError(f"{bundle.dir}: cannot serve it: {type(e).__name__}: {e}") from e
    catalog = recommendations.catalog
    return Serving(
        bundle=bundle,
        engine=engine,
        recommendations=recommendations,
        profiles=Profiles(recommendations.users, store, catalog),
        events=Events(catalog, store, int(settings.event_dedup_hours * 3600)),
    )


def open_serving_engine(settings: Settings, bundle: Bundle) -> Engine:
    """The configured engine, warmed up (the first generation compiles kernels). A remote
    server that does not answer yet is not fatal: requests fall back until it does."""
    if settings.engine == "inprocess":
        return open_engine(
            "vllm",
            bundle.llm_dir,
            kv_cache_gib=settings.kv_cache_gib,
            threads=settings.engine_threads,
            enforce_eager=not settings.engine_compile,
        )
    urls = settings.engine_urls or [settings.engine_url]
    engine = open_engine(
        "remote", bundle.llm_dir, base_url=urls, timeout_s=settings.deadline_ms / 1000.0
    )
    try:
        engine.warm()
    except EngineError as e:
        log.warning("engine server not answering at start", urls=urls, error=str(e))
    return engine


def under_root(root: Path | None, relative: str) -> Path:
    """The bundle directory `relative` names under `root`, symlinks resolved; refused when
    rollouts are off, when it leaves the root, or when there is no directory there."""
    if root is None:
        # 403, not 404: no root means every path lies outside it (a missing bundle is 404)
        raise OutsideRoot("rollouts over the API are off (no GENREC_BUNDLE_ROOT)")
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise OutsideRoot(f"{relative!r} is outside the bundle root")
    if target == base or not target.is_dir():
        raise BundleNotFound(f"no bundle directory {relative!r} under the bundle root")
    return target
