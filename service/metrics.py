"""Prometheus metrics of the gateway, one registry per process.

Latencies are in seconds (the Prometheus convention) with millisecond-scale buckets,
because a whole request is tens of milliseconds and a stage can be well under one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

REGISTRY = CollectorRegistry(auto_describe=True)

REQUEST_SECONDS = Histogram(
    "genrec_request_seconds",
    "Request latency by endpoint (REST path or gRPC method).",
    ["endpoint"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
REQUESTS = Counter(
    "genrec_requests",
    "Requests by endpoint and outcome code (HTTP status or gRPC code name).",
    ["endpoint", "code"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "genrec_stage_seconds",
    "Time per pipeline stage: redis, words, project, generate, rerank, rules, fallback.",
    ["stage"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
SERVED = Counter(
    "genrec_served",
    "Responses by the path that served them (generative, prompt-only, ann, popularity).",
    ["path"],
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "genrec_fallbacks",
    "Degraded answers by reason (unknown_user, no_embedding, redis_down, stale_embedding, "
    "engine_error, engine_deadline).",
    ["reason"],
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "genrec_redis_errors", "Redis calls that failed or were skipped.", ["op"], registry=REGISTRY
)
ENGINE_ERRORS = Counter(
    "genrec_engine_errors", "Engine calls that failed, by kind.", ["kind"], registry=REGISTRY
)
BEAM_STEPS = Counter(
    "genrec_beam_steps", "Engine calls made by the beam search (one per SID level).",
    registry=REGISTRY,
)  # fmt: skip
BEAM_ROWS = Counter(
    "genrec_beam_rows", "Rows (beams) scored by the engine across all steps.", registry=REGISTRY
)
BEAM_LEVEL_SECONDS = Histogram(
    "genrec_beam_level_seconds",
    "Time of one beam-search step (one SID level of one engine batch), by level.",
    ["level"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "genrec_engine_batch_requests",
    "Requests searched together in one engine batch.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
    registry=REGISTRY,
)
QUEUE_SECONDS = Histogram(
    "genrec_engine_queue_seconds",
    "Time a request waited for the engine.",
    buckets=BUCKETS,
    registry=REGISTRY,
)
EVENTS = Counter(
    "genrec_events",
    "Listening events by type and result (accepted, duplicate, rejected, unavailable).",
    ["type", "result"],
    registry=REGISTRY,
)
EVENT_LOG_LENGTH = Gauge(
    "genrec_event_log_length",
    "Entries in the event log not yet consumed by a daily embedding run (as last counted).",
    registry=REGISTRY,
)
EMBEDDING_AGE = Gauge(
    "genrec_embedding_age_seconds",
    "Age of the user-embedding version the gateway serves (seconds since it was published).",
    registry=REGISTRY,
)
_embedding_published = [float("nan")]  # seconds since the epoch, once a version is seen
EMBEDDING_AGE.set_function(lambda: time.time() - _embedding_published[0])


def embedding_published(at: float) -> None:
    """Records when the embedding version the gateway just read was published."""
    _embedding_published[0] = at


INFLIGHT = Gauge("genrec_inflight_requests", "Requests being served right now.", registry=REGISTRY)
ADMITTED = Gauge(
    "genrec_admitted_requests",
    "Requests admitted to the engine's line and not yet answered.",
    registry=REGISTRY,
)
SHED = Counter(
    "genrec_shed",
    "Requests refused at once: deadline (the engine's expected wait is past the deadline), "
    "queue_full, rate_limit (the API key's rate).",
    ["reason"],
    registry=REGISTRY,
)
BUNDLE = Info("genrec_bundle", "The bundle being served.", registry=REGISTRY)


@contextmanager
def timed(stage: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Observes the block's duration as `stage`, and records it in `timings` (ms) if given."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        STAGE_SECONDS.labels(stage).observe(elapsed)
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + elapsed * 1000.0
