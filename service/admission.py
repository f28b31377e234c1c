"""Admission control in front of the engine: refuse at once what would only time out.

Every request that will search takes a place in line when it starts. The engine worker
measures how long its searches take per request (an exponentially weighted mean of batch
seconds over batch size), so the wait a new request faces is the requests ahead of it
times that cost. When that wait is more than a share of the request's remaining budget
(`max_wait_share` of the time to its deadline: the rest is slack for the search's own
variance and for ranking), or the line is full, the request is refused with
:class:`Overloaded` (HTTP 503 with `Retry-After`, gRPC `UNAVAILABLE`) instead of
queueing behind work the engine cannot finish in time: the requests it admits keep their
latency, and the caller learns when to come back. A request with nobody ahead is always
admitted: it costs no one else anything, and its search keeps the measure current (a
measure only refusals followed would never come down again). A fresh measure refuses
nobody until it has seen a few batches.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service import metrics

SMOOTHING = 0.2
"""Weight of the newest batch in the per-request cost (about the last ten batches)."""
SETTLE_BATCHES = 5
"""Batches a fresh measure needs before it refuses anyone: until then the cost is their
plain mean, so one slow batch after a start or a rollout (a cold path, a closing engine)
cannot refuse the requests behind it on its own."""


def whole_seconds(seconds: float) -> int:
    """Seconds for a `Retry-After`: whole, and at least 1."""
    return max(1, math.ceil(seconds))


class Overloaded(Exception):
    """The engine cannot serve this request before its deadline (or its line is full)."""

    def __init__(self, reason: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> int:
        """Whole seconds for `Retry-After`: at least 1."""
        return whole_seconds(self.retry_after_s)


def expected_wait(ahead: int, per_request_s: float) -> float:
    """Seconds until a new request's search is done: everyone ahead, then itself."""
    return (ahead + 1) * per_request_s


class Admission:
    """The line in front of one engine: its length, the measured cost, the refusals."""

    def __init__(self, max_queue: int, max_wait_share: float = 1.0) -> None:
        self.max_queue = max_queue
        self.max_wait_share = max_wait_share
        self.per_request_s = 0.0  # nothing measured yet: only the line's length limits
        self.batches = 0  # measured since the last forget
        self._fresh_from = -math.inf  # time.monotonic() of the last forget
        self.ahead = 0
        self._paused = False
        self._lock = threading.Lock()

    def observe(self, requests: int, seconds: float, began: float | None = None) -> None:
        """One engine batch of `requests` took `seconds` from `began` (`time.monotonic()`;
        called by the engine worker). A batch begun before the last :meth:`forget` belongs
        to what was forgotten (a batch that waited out a replaced engine's close would
        otherwise open the fresh measure)."""
        if requests <= 0:
            return
        cost = seconds / requests
        with self._lock:
            if began is not None and began <= self._fresh_from:
                return
            self.batches += 1
            weight = max(SMOOTHING, 1.0 / min(self.batches, SETTLE_BATCHES))
            self.per_request_s += weight * (cost - self.per_request_s)

    @property
    def settled(self) -> bool:
        return self.batches >= SETTLE_BATCHES

    def forget(self) -> None:
        """Drops the measured cost (a cold engine's first search says little of the next)."""
        with self._lock:
            self.per_request_s = 0.0
            self.batches = 0
            self._fresh_from = time.monotonic()

    def check(self, deadline: float, now: float | None = None) -> None:
        """Raises :class:`Overloaded` if a request due at `deadline` should not wait."""
        now = time.monotonic() if now is None else now
        wait = expected_wait(self.ahead, self.per_request_s)
        if self.ahead >= self.max_queue:
            reason, why = "queue_full", f"{self.ahead} requests are waiting for the engine"
        elif self._judges and self.ahead > 0 and wait > self.max_wait_share * (deadline - now):
            reason = "deadline"
            why = f"the engine's expected wait {wait:.2f} s would not leave the request's deadline"
        else:
            return
        metrics.SHED.labels(reason).inc()
        raise Overloaded(reason, wait, f"overloaded: {why}; retry later")

    @property
    def _judges(self) -> bool:
        """Whether the measure may refuse: settled, and not across a pause."""
        return self.settled and not self._paused

    @contextmanager
    def paused(self) -> Iterator[None]:
        """While a new engine starts beside this one (a rollout), this engine waits for it
        (vLLM's process lock): the wait says nothing of the engine's cost, and refusing would
        turn a rollout into errors. Requests queue instead; one still waiting at its deadline
        falls back to ANN. The measure taken across the pause is dropped after it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def pause(self) -> None:
        """Starts a pause (see :meth:`paused`) that another step ends with :meth:`resume`."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.forget()

    @contextmanager
    def admitted(self, deadline: float) -> Iterator[None]:
        """Holds a place in line for the request's duration, or refuses it."""
        self.check(deadline)
        self.ahead += 1
        metrics.ADMITTED.inc()
        try:
            yield
        finally:
            self.ahead -= 1
            metrics.ADMITTED.dec()
