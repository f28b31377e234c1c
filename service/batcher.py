"""The batcher: one thread owns the engine and searches queued requests together.

Requests that arrive while a search runs wait in the queue; the next search takes all of
them (up to `max_batch`) as one batched beam search, so concurrent requests share every
engine call instead of taking turns. A request whose deadline passed while it waited is
dropped before it costs anything. Each batch's time feeds the admission control
(`service.admission`), which refuses requests the engine could not serve in time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog

from model_store.generation import Beam, Engine, Prompt, SearchStats
from service import metrics
from service.admission import Admission

log = structlog.get_logger(__name__)

Search = Callable[
    [Engine, Sequence[Prompt], int, SearchStats, Sequence[Collection[int]]], list[list[Beam]]
]


@dataclass(frozen=True)
class Searched:
    """One request's beams, and the time of each SID level of the search it was part of."""

    beams: list[Beam]
    level_seconds: list[float]


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before the engine got to it."""


@dataclass
class _Job:
    prompt: Prompt
    beam_width: int
    exclude: Collection[int]
    deadline: float  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Searched] = field(default_factory=Future)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        search: Search,
        max_batch: int = 16,
        admission: Admission | None = None,
    ) -> None:
        self.engine = engine
        self.admission = admission or Admission(max_queue=1 << 30)  # no limit on the line
        self._search = search
        self._max_batch = max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def submit(
        self, prompt: Prompt, beam_width: int, exclude: Collection[int], deadline: float
    ) -> Future[Searched]:
        """Queues one search; `exclude` are items it must not return (consumed ones)."""
        job = _Job(prompt, beam_width, exclude, deadline)
        self._queue.put(job)
        return job.future

    async def search(
        self, prompt: Prompt, beam_width: int, exclude: Collection[int], deadline: float
    ) -> Searched:
        """Waits for the request's search, or raises :class:`DeadlineExceeded` at `deadline`."""
        future = self.submit(prompt, beam_width, exclude, deadline)
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(future), timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError as e:
            raise DeadlineExceeded("engine answered after the deadline") from e

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _take_batch(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            now = time.monotonic()
            searched = 0
            live = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # the caller gave up already
                metrics.QUEUE_SECONDS.observe(now - job.enqueued)
                if now >= job.deadline:
                    job.future.set_exception(DeadlineExceeded("deadline passed in the queue"))
                else:
                    live.append(job)
            for width in sorted({j.beam_width for j in live}):
                searched += self._search_group([j for j in live if j.beam_width == width], width)
            self.admission.observe(searched, time.monotonic() - now)

    def _search_group(self, jobs: list[_Job], width: int) -> int:
        """Searches `jobs` together; how many were searched (none when the engine failed)."""
        metrics.BATCH_SIZE.observe(len(jobs))
        stats = SearchStats()
        try:
            prompts = [j.prompt for j in jobs]
            results = self._search(self.engine, prompts, width, stats, [j.exclude for j in jobs])
        except Exception as e:  # the engine's failure is every waiting request's failure
            log.warning("engine search failed", error=repr(e), requests=len(jobs))
            for job in jobs:
                job.future.set_exception(e)
            return 0
        metrics.BEAM_STEPS.inc(stats.engine_calls)
        metrics.BEAM_ROWS.inc(sum(stats.rows_scored))
        for level, seconds in enumerate(stats.level_seconds):
            metrics.BEAM_LEVEL_SECONDS.labels(str(level)).observe(seconds)
        for job, beams in zip(jobs, results, strict=True):
            job.future.set_result(Searched(beams, stats.level_seconds))
        return len(jobs)
