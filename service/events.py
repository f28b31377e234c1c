"""Listening events in: validated one by one, deduplicated by id, logged and made visible
to the user's next request in one Redis step.

A bad event (malformed, unknown item) is rejected by its index and the rest are kept, so a
device that batches events never loses the good ones to one bad one. Unknown users are
welcome: events are how new users arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from model_store.catalog import Catalog
from service import metrics
from service.schemas import USER_ID, ItemUri, Real, Strict
from service.userstore import LoggedEvent, StoreUnavailable, Unavailable, UserStore

MAX_EVENTS = 500
LOG_COUNT_EVERY_S = 60.0
"""How often, at most, the gateway counts the event log for `genrec_event_log_length` (while
events arrive): 16384 pipelined XLENs, a few milliseconds of Redis a minute per gateway."""
MAX_AHEAD_S = 24 * 3600.0
"""How far in the future an event's `ts` may lie (a device's clock running ahead); beyond it
the event is rejected, since the daily run orders and windows events by it."""
EVENT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"
EventType = Literal["play", "finish", "skip", "like", "dislike"]


class Event(Strict):
    event_id: str = Field(pattern=EVENT_ID, description="Unique per event; repeats count once.")
    user_id: str = Field(pattern=USER_ID, examples=["196"])
    item: ItemUri = Field(examples=["ml-100k:movie:50"])
    type: EventType
    ts: Real | None = Field(
        None,
        ge=0,
        description="Seconds since the epoch; the time of arrival when absent or 0 (as in gRPC).",
    )


class EventsRequest(Strict):
    events: list[Annotated[Event | Any, Field(union_mode="left_to_right")]] = Field(
        min_length=1,
        max_length=MAX_EVENTS,
        description="Events as `Event` objects; a malformed one is rejected by its index.",
    )


class Rejected(BaseModel):
    index: int
    error: str


class EventsAccepted(BaseModel):
    accepted: int = Field(description="Events logged now.")
    duplicates: int = Field(description="Events whose id was seen before (counted once).")
    rejected: list[Rejected]


class EventsUnavailable(Unavailable):
    """Events cannot be stored: Redis is down."""


_EVENT = TypeAdapter(Event)


class Events:
    def __init__(self, catalog: Catalog, store: UserStore | None, dedup_s: int) -> None:
        self.catalog = catalog
        self.store = store
        self.dedup_s = dedup_s
        self._counted_at = -LOG_COUNT_EVERY_S
        self._counting: asyncio.Task[None] | None = None

    async def ingest(self, raw: Sequence[Any]) -> EventsAccepted:
        """Validates each event, then logs the valid ones in one round trip."""
        valid, rejected = self._validate(raw)
        if self.store is None:
            raise EventsUnavailable("no Redis configured")
        duplicates = 0
        if valid:
            try:
                ids = await self.store.append_events(valid, self.dedup_s)
            except StoreUnavailable as e:
                metrics.EVENTS.labels("any", "unavailable").inc(len(valid))
                raise EventsUnavailable(str(e), e.retry_after_s) from e
            self._count_log_soon(self.store)
            for event, entry in zip(valid, ids, strict=True):
                metrics.EVENTS.labels(event.type, "accepted" if entry else "duplicate").inc()
            duplicates = sum(entry is None for entry in ids)
        return EventsAccepted(
            accepted=len(valid) - duplicates, duplicates=duplicates, rejected=rejected
        )

    def _count_log_soon(self, store: UserStore) -> None:
        """Counts the event log in the background, at most every `LOG_COUNT_EVERY_S`: the
        gauge is exact (the shards' lengths summed), and no answer waits for it."""
        now = time.monotonic()
        if now - self._counted_at < LOG_COUNT_EVERY_S:
            return
        self._counted_at = now
        self._counting = asyncio.get_running_loop().create_task(self._count_log(store))

    @staticmethod
    async def _count_log(store: UserStore) -> None:
        with contextlib.suppress(StoreUnavailable):  # the gauge keeps its last count
            metrics.EVENT_LOG_LENGTH.set(await store.event_log_length())

    def _validate(self, raw: Sequence[Any]) -> tuple[list[LoggedEvent], list[Rejected]]:
        now = time.time()
        valid: list[LoggedEvent] = []
        rejected: list[Rejected] = []
        for index, item in enumerate(raw):
            try:
                event = item if isinstance(item, Event) else _EVENT.validate_python(item)
            except ValidationError as e:
                rejected.append(Rejected(index=index, error=_first_error(e)))
                continue
            if event.item not in self.catalog.uri_index:
                rejected.append(Rejected(index=index, error=f"unknown item {event.item!r}"))
                continue
            if event.ts is not None and event.ts > now + MAX_AHEAD_S:
                rejected.append(Rejected(index=index, error="ts: more than a day in the future"))
                continue
            ts = event.ts or now  # 0 is gRPC's unset value: the same on both protocols
            valid.append(LoggedEvent(event.event_id, event.user_id, event.item, event.type, ts))
        if rejected:
            metrics.EVENTS.labels("any", "rejected").inc(len(rejected))
        return valid, rejected


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])
