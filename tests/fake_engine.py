"""A fake engine and fake searches for the engine worker's tests (`service.batcher`): the
searches ask one row per prompt per level and record which steps they were part of."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from typing import cast

import numpy as np

from model_store.generation import Beam, BeamSearch, Engine, Prompt, SearchStats, Session

WAIT = 5.0  # seconds: only reached when a test is about to fail


class FakeStep:
    """A search of `levels` levels over its prompts: every level asks one row per prompt."""

    def __init__(self, prompts: Sequence[Prompt], levels: int) -> None:
        self.tokens = [p.token_ids[0] for p in prompts]
        self.session = cast(Session, self)
        self.level = 0
        self.levels = levels
        self.stats = SearchStats()

    @property
    def done(self) -> bool:
        return self.level >= self.levels

    @property
    def asked(self) -> list[np.ndarray]:
        return [np.array([1, 2]) for _ in self.tokens]

    def tell(self, answers: Sequence[np.ndarray], seconds: float = 0.0) -> None:
        self.stats.level_seconds.append(0.5 / (self.level + 1))
        self.level += 1

    def results(self) -> list[list[Beam]]:
        return [[Beam(item=t, sid=(0, 1), logprob=-1.0)] for t in self.tokens]


class FakeEngine:
    """Records each search started and each step. With `block_first` the first step waits
    for `release`; every step takes `step_seconds`."""

    def __init__(
        self,
        error: Exception | None = None,
        *,
        levels: int = 2,
        step_seconds: float = 0.0,
        block_first: bool = True,
    ) -> None:
        self.calls: list[tuple[int, list[int]]] = []  # (beam width, first token of each prompt)
        self.excludes: list[list[Collection[int]]] = []
        self.steps: list[list[tuple[list[int], int]]] = []  # per step: (tokens, level) per search
        self.started = threading.Event()
        self.release = threading.Event()
        if not block_first:
            self.release.set()
        self.error = error
        self.levels = levels
        self.step_seconds = step_seconds

    def start(
        self,
        engine: Engine,
        prompts: Sequence[Prompt],
        beam_width: int,
        excludes: Sequence[Collection[int]],
    ) -> BeamSearch:
        self.calls.append((beam_width, [p.token_ids[0] for p in prompts]))
        self.excludes.append(list(excludes))
        return cast(BeamSearch, FakeStep(prompts, self.levels))

    def score_sessions(
        self, asks: Sequence[tuple[Session, Sequence[np.ndarray]]]
    ) -> list[list[np.ndarray]]:
        searches = [cast(FakeStep, session) for session, _ in asks]
        self.steps.append([(s.tokens, s.level) for s in searches])
        if len(self.steps) == 1:
            self.started.set()
            assert self.release.wait(WAIT)
        time.sleep(self.step_seconds)
        if self.error is not None:
            raise self.error
        return [[np.zeros(2) for _ in c] for _, c in asks]
