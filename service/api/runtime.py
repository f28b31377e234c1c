"""What the process starts and stops: Redis, the guard, the serving bundle, the gRPC server;
and how it changes bundles and ends without dropping requests.

The one place the parts are wired together; routers reach the result through
`request.app.state.runtime` (see `service.api.deps`).

* Rollout (`POST /v1/admin/bundle`, or SIGHUP for the configured path, resolved anew so a
  `current` symlink switch plus SIGHUP is a rollout): the new bundle is verified, its
  engine opened and warmed and its use cases built off the event loop, then one reference
  swap makes it serve. Requests in flight finish on the old one, which closes when the last
  of them is done. A bundle that fails any step is refused and the old one keeps serving;
  the old directory is left alone, so rolling back is a rollout to it.
* Shutdown (SIGTERM): not ready first (`/readyz` 503, gRPC health NOT_SERVING) while still
  serving for `GENREC_DRAIN_S`, so load balancers stop sending; then the listener closes,
  admitted requests finish, and everything stops in reverse order.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from model_store.bundle import Bundle, BundleError
from model_store.userstate.connect import EmbeddedRedis, redis_url_or_embedded
from service import metrics
from service.api.auth import Guard
from service.api.serving import Rollout, RolloutBusy, Serving, open_serving, verified_bundle
from service.settings import Settings
from service.userstore import UserStore

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.api.grpc_server import Grpc

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    """Everything the lifespan starts, so shutdown can stop it in reverse."""

    settings: Settings
    serving: Serving | None = None
    store: UserStore | None = None
    embedded: EmbeddedRedis | None = None
    guard: Guard = field(default_factory=lambda: Guard({}, None, None))
    grpc: Grpc | None = None
    draining: bool = False
    started: float = field(default_factory=time.monotonic)
    _rollout: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def grpc_port(self) -> int:
        return 0 if self.grpc is None else self.grpc.port

    async def start(self) -> None:
        from service.api.grpc_server import start_grpc

        s = self.settings
        url, self.embedded = redis_url_or_embedded(s.redis_url, s.redis_db)
        self.store = UserStore(
            url,
            s.redis_timeout_ms / 1000.0,
            s.redis_cooldown_s,
            cluster=s.redis_cluster,
            refresh_s=s.redis_version_refresh_s,
        )
        self.guard = Guard(s.api_keys, s.rate_limit, self.store)
        self._activate(open_serving(s, verified_bundle(s.bundle), self.store))
        self.grpc = await start_grpc(self.lease, self.guard, s.host, s.grpc_port)
        self._listen_for_sighup()
        log.info(
            "ready",
            bundle=self.version,
            engine=s.engine,
            rest=f"http://{s.host}:{s.port}",
            grpc=f"{s.host}:{self.grpc_port}",
            seconds=round(time.monotonic() - self.started, 1),
        )

    @property
    def version(self) -> str | None:
        return None if self.serving is None else self.serving.version

    @contextmanager
    def lease(self) -> Iterator[Serving]:
        """The bundle serving now, held for one request (it finishes there)."""
        if self.serving is None:
            raise RuntimeError("the service is not started")
        with self.serving.lease() as serving:
            yield serving

    async def reload(self, directory: Path) -> Rollout:
        """Rolls out the bundle at `directory` (see the module docstring); BundleError when
        it is refused, RolloutBusy while another rollout runs."""
        if self._rollout.locked():
            raise RolloutBusy("another bundle rollout is under way")
        async with self._rollout:
            began = time.monotonic()
            old = self.serving
            assert old is not None, "reload before start"
            bundle = await asyncio.to_thread(verified_bundle, directory)
            if bundle.version == old.version:
                return _rollout(old.bundle, old.bundle, False, began)
            with old.recommendations.batcher.admission.paused():
                new = await asyncio.to_thread(open_serving, self.settings, bundle, self.store)
            # Paused before the swap, so no request meets the new engine unpaused while
            # the old one still takes turns with it (see `_retire`).
            new.recommendations.batcher.admission.pause()
            self._activate(new)
            self._spawn(self._retire(old, new))
            log.info("bundle rolled out", version=new.version, previous=old.version)
            return _rollout(new.bundle, old.bundle, True, began)

    def _activate(self, serving: Serving) -> None:
        """The swap: from now on requests lease `serving`."""
        self.serving = serving
        manifest = serving.bundle.manifest
        metrics.BUNDLE.info({"version": serving.version, "dataset": str(manifest["dataset"])})

    async def _retire(self, old: Serving, new: Serving) -> None:
        """Closes a replaced bundle once no request uses it (at most a few deadlines on).
        Until it is closed the two engines take turns (closing one holds the other up too),
        so the new one's admission, paused by `reload`, does not judge the engine by those
        turns; it resumes from a fresh measure."""
        patience = 3 * self.settings.deadline_ms / 1000.0 + 5.0
        try:
            drained = await old.drained(patience)
            if not drained:
                log.warning("closing a replaced bundle with requests on it", leases=old.leases)
            await asyncio.to_thread(old.close)
        finally:
            new.recommendations.batcher.admission.resume()
        log.info("replaced bundle closed", version=old.version)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listen_for_sighup(self) -> None:
        """SIGHUP rolls out the configured bundle path, resolved anew."""
        try:
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: self._spawn(self._reload_configured())
            )
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
            log.info("SIGHUP rollouts off: the event loop is not in the main thread")

    async def _reload_configured(self) -> None:
        try:
            await self.reload(self.settings.bundle)
        except (BundleError, RolloutBusy) as e:
            log.error("bundle rollout refused; the old bundle keeps serving", error=str(e))
        except Exception:  # a signal's task: nobody else would hear of it
            log.exception("bundle rollout failed; the old bundle keeps serving")

    def begin_drain(self) -> None:
        """Not ready from now on (the listener stays open; requests are still served).
        Safe to call from a signal handler."""
        self.draining = True
        if self.grpc is not None:
            self.grpc.not_serving()

    async def stop(self) -> None:
        self.draining = True
        if self.grpc is not None:
            await self.grpc.stop(grace=self.settings.deadline_ms / 1000.0 + 1.0)
        for task in list(self._tasks):
            await task
        if self.serving is not None:
            await self.serving.drained(self.settings.deadline_ms / 1000.0 + 1.0)
            self.serving.close()
        if self.store is not None:
            await self.store.close()
        if self.embedded is not None:
            self.embedded.close()


def _rollout(new: Bundle, old: Bundle, changed: bool, began: float) -> Rollout:
    return Rollout(
        bundle_version=new.version,
        path=str(new.dir),
        previous_version=old.version,
        previous_path=str(old.dir),
        changed=changed,
        seconds=round(time.monotonic() - began, 3),
    )


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain before the exit: on SIGTERM the runtime turns not-ready and
    keeps serving for `drain_s`, and only then does uvicorn close the listener and wait
    for the requests it admitted. A second SIGTERM, or SIGINT, exits at once."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain_s = self.runtime.settings.drain_s
        if sig != signal.SIGTERM or self._drain is not None or drain_s <= 0:
            super().handle_exit(sig, frame)
            return
        log.info("SIGTERM: draining", seconds=drain_s)
        self.runtime.begin_drain()
        self._drain = threading.Timer(drain_s, super().handle_exit, (sig, frame))
        self._drain.daemon = True
        self._drain.start()


def run_server(app: FastAPI) -> None:
    """Serves `app` (from `create_app`) until SIGTERM or SIGINT, draining first."""
    runtime: Runtime = app.state.runtime
    s = runtime.settings
    config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        log_level="warning",
        access_log=False,
        # Only listed proxies may name the client (uvicorn would trust 127.0.0.1's): any
        # other caller could pick its own address, and with it a fresh rate limit.
        proxy_headers=bool(s.trusted_proxies),
        forwarded_allow_ips=s.trusted_proxies or None,
        # Admitted requests end by their deadline (the engine answer is dropped then).
        timeout_graceful_shutdown=int(2 * s.deadline_ms / 1000.0) + 5,
    )
    DrainingServer(config, runtime).run()
