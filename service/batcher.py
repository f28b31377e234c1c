"""The batcher: one thread owns the engine and steps every live search together.

Searches advance level by level (`model_store.generation.BeamSearch`), and each engine step
scores the rows of every live search at once, whatever level each is at: a request that
arrives while others are searched joins at the next step instead of waiting for their
whole search (continuous batching of beam rows across requests). The engine's fixed cost
per step (vLLM's scheduling, input preparation, forward launch) is then paid once for all
of them. At most `max_batch` requests are live at once; the rest wait in the queue. A
request whose deadline passed while it waited is dropped before it costs anything. The
engine time between finished searches feeds the admission control (`service.admission`),
which refuses requests the engine could not serve in time.
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

from model_store.generation import Beam, BeamSearch, Engine, Prompt
from service import metrics
from service.admission import Admission

log = structlog.get_logger(__name__)

StartSearch = Callable[[Engine, Sequence[Prompt], int, Sequence[Collection[int]]], BeamSearch]
"""Starts a search: (engine, prompts, beam width, excluded items per prompt)."""


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


@dataclass
class _Cohort:
    """Requests that arrived together with one beam width: one search over their prompts."""

    jobs: list[_Job]
    search: BeamSearch


class Batcher:
    def __init__(
        self,
        engine: Engine,
        start: StartSearch,
        max_batch: int = 16,
        admission: Admission | None = None,
    ) -> None:
        self.engine = engine
        self.admission = admission or Admission(max_queue=1 << 30)  # no limit on the line
        self._start = start
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
        """Serves what is live and queued, then stops the worker."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self, room: int, wait: bool, live: bool) -> list[_Job] | None:
        """Up to `room` queued jobs, waiting for the first when `wait`; None once closing
        with nothing live or taken (the stop mark stays queued until then)."""
        jobs: list[_Job] = []
        while len(jobs) < room:
            try:
                job = self._queue.get(block=wait and not jobs)
            except queue.Empty:
                break
            if job is None:
                if not (live or jobs):
                    return None
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        live: list[_Cohort] = []
        busy = 0.0  # engine-thread seconds since a search last finished
        busy_from: float | None = None  # when the first of those seconds began
        while True:
            room = self._max_batch - sum(len(c.jobs) for c in live)
            taken = self._take(room, wait=not live, live=bool(live))
            if taken is None:
                return
            started = time.monotonic()
            busy_from = started if busy_from is None else busy_from
            live += self._cohorts(taken, started)
            if live:
                live = self._step(live)
            busy += time.monotonic() - started
            finished = sum(len(c.jobs) for c in live if c.search.done)
            if finished:
                self.admission.observe(finished, busy, busy_from)
                busy, busy_from = 0.0, None
                for cohort in live:
                    if cohort.search.done:
                        self._resolve(cohort)
                live = [c for c in live if not c.search.done]

    def _cohorts(self, jobs: list[_Job], now: float) -> list[_Cohort]:
        """Starts the searches of newly taken jobs (one per beam width); those already past
        their deadline, or given up by their caller, are dropped."""
        ready = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller gave up already
            metrics.QUEUE_SECONDS.observe(now - job.enqueued)
            if now >= job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed in the queue"))
            else:
                ready.append(job)
        cohorts = []
        for width in sorted({j.beam_width for j in ready}):
            group = [j for j in ready if j.beam_width == width]
            try:
                prompts = [j.prompt for j in group]
                search = self._start(self.engine, prompts, width, [j.exclude for j in group])
            except Exception as e:
                _fail(group, e)
                continue
            cohorts.append(_Cohort(group, search))
        return cohorts

    def _step(self, live: list[_Cohort]) -> list[_Cohort]:
        """One engine step for every live search that has rows to score; the cohorts still
        live after it (none when the engine failed: that fails every one of them)."""
        asking = [c for c in live if not c.search.done]
        if not asking:
            return live
        metrics.BATCH_SIZE.observe(sum(len(c.jobs) for c in asking))
        started = time.perf_counter()
        try:
            asks = [(c.search.session, c.search.asked) for c in asking]
            answers = self.engine.score_sessions(asks)
        except Exception as e:  # the engine's failure is every live request's failure
            log.warning("engine step failed", error=repr(e), requests=len(asking))
            for cohort in asking:
                _fail(cohort.jobs, e)
            return [c for c in live if c.search.done]
        seconds = time.perf_counter() - started
        metrics.BEAM_STEPS.inc()
        for cohort, answer in zip(asking, answers, strict=True):
            metrics.BEAM_ROWS.inc(sum(1 for a in cohort.search.asked if len(a)))
            metrics.BEAM_LEVEL_SECONDS.labels(str(cohort.search.level)).observe(seconds)
            cohort.search.tell(answer, seconds)
        return live

    @staticmethod
    def _resolve(cohort: _Cohort) -> None:
        results = cohort.search.results()
        for job, beams in zip(cohort.jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(Searched(beams, cohort.search.stats.level_seconds))


def _fail(jobs: Sequence[_Job], error: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)
