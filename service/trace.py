"""One request's trace: stage timings and degraded reasons, carried down the request.

Every step that costs time or degrades the answer records it here instead of filling
out-parameters; the response and the Prometheus metrics are read off the finished trace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from service import metrics


@dataclass
class Trace:
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage
    degraded: list[str] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the block as stage `name` (in the trace and in `genrec_stage_seconds`)."""
        with metrics.timed(name, self.timings):
            yield

    def record(self, name: str, seconds: float) -> None:
        """A duration measured elsewhere (a beam level in the engine worker)."""
        self.timings[name] = seconds * 1000.0

    def degrade(self, reason: str) -> None:
        self.degraded.append(reason)

    def finish(self, served_by: str) -> dict[str, float]:
        """Counts the outcome in Prometheus and returns the timings (ms, with the total)."""
        for reason in self.degraded:
            metrics.FALLBACKS.labels(reason).inc()
        metrics.SERVED.labels(served_by).inc()
        self.timings["total"] = (time.monotonic() - self.started) * 1000.0
        return {k: round(v, 3) for k, v in self.timings.items()}
