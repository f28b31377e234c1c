"""Unit tests of `service.batcher.Batcher` with a fake engine whose first step blocks, so
requests queue, and fake two-level searches that record which steps they were part of
(`tests.fake_engine`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import cast

import pytest

from model_store.generation import Beam, Engine, Prompt
from service.batcher import Batcher, DeadlineExceeded, Searched
from tests.fake_engine import WAIT, FakeEngine


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
    # A second, not 0.1 s: the worker must take the job before its deadline (one still
    # queued then is cancelled and never started), and a busy machine can hold it that long.
    with pytest.raises(DeadlineExceeded):
        asyncio.run(batcher.search(prompt(1), 4, (), later(1.0)))
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
