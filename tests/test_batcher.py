"""Unit tests of `service.batcher.Batcher` with a fake engine whose first step blocks, so
requests queue, and fake two-level searches that record which steps they were part of."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future
from typing import cast

import numpy as np
import pytest

from model_store.generation import Beam, BeamSearch, Engine, Prompt, SearchStats, Session
from service.batcher import Batcher, DeadlineExceeded, Searched

WAIT = 5.0  # seconds: only reached when a test is about to fail
LEVELS = 2


class FakeStep:
    """A two-level search over its prompts: every level asks one row per prompt."""

    def __init__(self, prompts: Sequence[Prompt], stats: SearchStats) -> None:
        self.tokens = [p.token_ids[0] for p in prompts]
        self.session = cast(Session, self)
        self.level = 0
        self.stats = stats

    @property
    def done(self) -> bool:
        return self.level >= LEVELS

    @property
    def asked(self) -> list[np.ndarray]:
        return [np.array([1, 2]) for _ in self.tokens]

    def tell(self, answers: Sequence[np.ndarray], seconds: float = 0.0) -> None:
        self.stats.level_seconds.append(0.5 / (self.level + 1))
        self.level += 1

    def results(self) -> list[list[Beam]]:
        return [[Beam(item=t, sid=(0, 1), logprob=-1.0)] for t in self.tokens]


class FakeEngine:
    """Records each search started and each step; the first step blocks until `release`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[int, list[int]]] = []  # (beam width, first token of each prompt)
        self.excludes: list[list[Collection[int]]] = []
        self.steps: list[list[tuple[list[int], int]]] = []  # per step: (tokens, level) per search
        self.started = threading.Event()
        self.release = threading.Event()
        self.error = error

    def start(
        self,
        engine: Engine,
        prompts: Sequence[Prompt],
        beam_width: int,
        excludes: Sequence[Collection[int]],
        stats: SearchStats,
    ) -> BeamSearch:
        self.calls.append((beam_width, [p.token_ids[0] for p in prompts]))
        self.excludes.append(list(excludes))
        return cast(BeamSearch, FakeStep(prompts, stats))

    def score_sessions(
        self, asks: Sequence[tuple[Session, Sequence[np.ndarray]]]
    ) -> list[list[np.ndarray]]:
        searches = [cast(FakeStep, session) for session, _ in asks]
        self.steps.append([(s.tokens, s.level) for s in searches])
        if len(self.steps) == 1:
            self.started.set()
            assert self.release.wait(WAIT)
        if self.error is not None:
            raise self.error
        return [[np.zeros(2) for _ in c] for _, c in asks]


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    yield engine
    engine.release.set()


def start(engine: FakeEngine, max_batch: int = 16) -> Batcher:
    return Batcher(cast(Engine, engine), engine.start, max_batch)


def prompt(token: int) -> Prompt:
    return Prompt(token_ids=(token,))


def later(seconds: float = WAIT) -> float:
    return time.monotonic() + seconds


def block(batcher: Batcher, engine: FakeEngine) -> Future[Searched]:
    """Starts a first search (token 0) whose first step holds the worker until released."""
    first = batcher.submit(prompt(0), 4, (), later())
    assert engine.started.wait(WAIT)
    return first


def test_arrivals_join_the_next_step_of_live_searches_up_to_max_batch(
    fake: FakeEngine,
) -> None:
    batcher = start(fake, max_batch=3)
    first = block(batcher, fake)
    futures = [batcher.submit(prompt(t), 4, {t * 10}, later()) for t in range(1, 6)]
    fake.release.set()
    results = [f.result(WAIT) for f in futures]
    assert first.result(WAIT).beams[0].item == 0
    assert fake.calls == [(4, [0]), (4, [1, 2]), (4, [3]), (4, [4, 5])]
    assert fake.excludes[1] == [{10}, {20}]
    # 1 and 2 arrived during search 0's first level: they share its second level's step
    assert fake.steps[:3] == [[([0], 0)], [([0], 1), ([1, 2], 0)], [([1, 2], 1), ([3], 0)]]
    assert [r.beams[0].item for r in results] == [1, 2, 3, 4, 5]
    assert results[0].level_seconds == [0.5, 0.25]
    batcher.close()


def test_different_beam_widths_are_searched_in_separate_groups(fake: FakeEngine) -> None:
    batcher = start(fake)
    block(batcher, fake)
    widths = {1: 2, 2: 5, 3: 2, 4: 1}
    futures = [batcher.submit(prompt(t), w, (), later()) for t, w in widths.items()]
    fake.release.set()
    assert [f.result(WAIT).beams[0].item for f in futures] == [1, 2, 3, 4]
    assert fake.calls[1:] == [(1, [4]), (2, [1, 3]), (5, [2])]
    batcher.close()


def test_a_request_whose_deadline_passed_in_the_queue_is_not_searched(fake: FakeEngine) -> None:
    batcher = start(fake)
    block(batcher, fake)
    late = batcher.submit(prompt(1), 4, (), later(0.05))
    alive = batcher.submit(prompt(2), 4, (), later())
    time.sleep(0.1)
    fake.release.set()
    with pytest.raises(DeadlineExceeded):
        late.result(WAIT)
    assert alive.result(WAIT).beams[0].item == 2
    assert fake.calls == [(4, [0]), (4, [2])]
    batcher.close()


def test_a_request_already_late_never_reaches_the_search() -> None:
    search = FakeEngine()
    batcher = start(search)
    with pytest.raises(DeadlineExceeded):
        batcher.submit(prompt(1), 4, (), time.monotonic() - 1).result(WAIT)
    assert search.calls == []
    batcher.close()


def test_an_engine_failure_is_every_live_requests_failure() -> None:
    error = RuntimeError("engine fell over")
    search = FakeEngine(error)
    batcher = start(search)
    futures = [block(batcher, search)]
    futures += [batcher.submit(prompt(t), 4, (), later()) for t in (1, 2)]
    search.release.set()
    assert [f.exception(WAIT) for f in futures] == [error] * 3
    assert search.calls == [(4, [0]), (4, [1, 2])]
    search.error = None  # the worker survives a failed search
    assert batcher.submit(prompt(3), 4, (), later()).result(WAIT).beams[0].item == 3
    batcher.close()


def test_async_search_returns_the_beams(fake: FakeEngine) -> None:
    fake.release.set()
    batcher = start(fake)
    searched = asyncio.run(batcher.search(prompt(7), 3, {1}, later()))
    assert searched.beams == [Beam(item=7, sid=(0, 1), logprob=-1.0)]
    assert fake.calls == [(3, [7])]
    batcher.close()


def test_async_search_raises_when_the_deadline_passes_during_the_search(
    fake: FakeEngine,
) -> None:
    batcher = start(fake)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        asyncio.run(batcher.search(prompt(1), 4, (), later(0.1)))
    assert time.monotonic() - started < WAIT / 2  # it did not wait for the search to end
    assert fake.started.wait(WAIT)
    assert fake.calls == [(4, [1])]
    fake.release.set()
    batcher.close()


def test_close_serves_what_is_queued_then_stops_the_thread(fake: FakeEngine) -> None:
    batcher = start(fake)
    block(batcher, fake)
    queued = batcher.submit(prompt(1), 4, (), later())
    closer = threading.Thread(target=batcher.close, args=(WAIT,))
    closer.start()
    fake.release.set()
    closer.join(WAIT)
    assert queued.result(0).beams[0].item == 1
    assert not batcher._thread.is_alive()
