"""Unit tests of `service.batcher.Batcher` with a fake search that blocks so requests queue."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future
from typing import cast

import pytest

from model_store.generation import Beam, Engine, Prompt, SearchStats
from service.batcher import Batcher, DeadlineExceeded, Searched

WAIT = 5.0  # seconds: only reached when a test is about to fail


class FakeSearch:
    """Records each call; the first call blocks until `release` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[int, list[int]]] = []  # (beam width, first token of each prompt)
        self.excludes: list[list[Collection[int]]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.error = error

    def __call__(
        self,
        engine: Engine,
        prompts: Sequence[Prompt],
        beam_width: int,
        stats: SearchStats,
        excludes: Sequence[Collection[int]],
    ) -> list[list[Beam]]:
        self.calls.append((beam_width, [p.token_ids[0] for p in prompts]))
        self.excludes.append(list(excludes))
        stats.level_seconds.extend([0.5, 0.25])
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(WAIT)
        if self.error is not None:
            raise self.error
        return [[Beam(item=p.token_ids[0], sid=(0, 1), logprob=-1.0)] for p in prompts]


@pytest.fixture
def fake() -> Iterator[FakeSearch]:
    search = FakeSearch()
    yield search
    search.release.set()


def start(search: FakeSearch, max_batch: int = 16) -> Batcher:
    return Batcher(cast(Engine, object()), search, max_batch)


def prompt(token: int) -> Prompt:
    return Prompt(token_ids=(token,))


def later(seconds: float = WAIT) -> float:
    return time.monotonic() + seconds


def block(batcher: Batcher, search: FakeSearch) -> Future[Searched]:
    """Starts a first search (token 0) that holds the worker until `search.release`."""
    first = batcher.submit(prompt(0), 4, (), later())
    assert search.started.wait(WAIT)
    return first


def test_queued_requests_are_searched_together_up_to_max_batch(fake: FakeSearch) -> None:
    batcher = start(fake, max_batch=3)
    first = block(batcher, fake)
    futures = [batcher.submit(prompt(t), 4, {t * 10}, later()) for t in range(1, 6)]
    fake.release.set()
    results = [f.result(WAIT) for f in futures]
    assert first.result(WAIT).beams[0].item == 0
    assert fake.calls == [(4, [0]), (4, [1, 2, 3]), (4, [4, 5])]
    assert fake.excludes[1] == [{10}, {20}, {30}]
    assert [r.beams[0].item for r in results] == [1, 2, 3, 4, 5]
    assert results[0].level_seconds == [0.5, 0.25]
    batcher.close()


def test_different_beam_widths_are_searched_in_separate_groups(fake: FakeSearch) -> None:
    batcher = start(fake)
    block(batcher, fake)
    widths = {1: 2, 2: 5, 3: 2, 4: 1}
    futures = [batcher.submit(prompt(t), w, (), later()) for t, w in widths.items()]
    fake.release.set()
    assert [f.result(WAIT).beams[0].item for f in futures] == [1, 2, 3, 4]
    assert fake.calls[1:] == [(1, [4]), (2, [1, 3]), (5, [2])]
    batcher.close()


def test_a_request_whose_deadline_passed_in_the_queue_is_not_searched(fake: FakeSearch) -> None:
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
    search = FakeSearch()
    batcher = start(search)
    with pytest.raises(DeadlineExceeded):
        batcher.submit(prompt(1), 4, (), time.monotonic() - 1).result(WAIT)
    assert search.calls == []
    batcher.close()


def test_a_search_failure_is_every_waiting_requests_failure() -> None:
    error = RuntimeError("engine fell over")
    search = FakeSearch(error)
    batcher = start(search)
    futures = [block(batcher, search)]
    futures += [batcher.submit(prompt(t), 4, (), later()) for t in (1, 2)]
    search.release.set()
    assert [f.exception(WAIT) for f in futures] == [error] * 3
    assert search.calls == [(4, [0]), (4, [1, 2])]
    search.error = None  # the worker survives a failed search
    assert batcher.submit(prompt(3), 4, (), later()).result(WAIT).beams[0].item == 3
    batcher.close()


def test_async_search_returns_the_beams(fake: FakeSearch) -> None:
    fake.release.set()
    batcher = start(fake)
    searched = asyncio.run(batcher.search(prompt(7), 3, {1}, later()))
    assert searched.beams == [Beam(item=7, sid=(0, 1), logprob=-1.0)]
    assert fake.calls == [(3, [7])]
    batcher.close()


def test_async_search_raises_when_the_deadline_passes_during_the_search(
    fake: FakeSearch,
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


def test_close_serves_what_is_queued_then_stops_the_thread(fake: FakeSearch) -> None:
    batcher = start(fake)
    block(batcher, fake)
    queued = batcher.submit(prompt(1), 4, (), later())
    closer = threading.Thread(target=batcher.close, args=(WAIT,))
    closer.start()
    fake.release.set()
    closer.join(WAIT)
    assert queued.result(0).beams[0].item == 1
    assert not batcher._thread.is_alive()
