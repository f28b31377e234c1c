"""The user-state reader: what one request knows about its user.

The published state (Redis, one round trip) is joined with the bundle: an unpublished user
falls back to the bundle's history, a state published for another bundle is ignored (its
item indices differ), and the request's own context overrides the bundle's facts. Why the
answer may be lesser is recorded in the trace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import structlog

from model_store.bundle import Bundle
from model_store.catalog import Catalog
from model_store.prompts import context_words
from model_store.userstate.keys import consumed_since
from service import metrics, taste
from service.schemas import RequestContext
from service.taste import TasteEdits
from service.trace import Trace
from service.userstore import StoreUnavailable, UserState, UserStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class UserFacts:
    """What the prompt and the rules use about one user for one request."""

    embedding: np.ndarray | None
    history: list[int]  # everything consumed (the no-repeats rule)
    prompt_history: list[int]  # what the prompt shows: forgotten items out, `more` items in
    newer: int  # prompt_history's most recent items the embedding has not seen
    context: list[str] | None
    age: int | None
    edits: TasteEdits
    revision: int
    disliked: frozenset[int] = frozenset()  # never recommended again
    skipped: frozenset[int] = frozenset()  # demoted


class UserReader:
    def __init__(self, bundle: Bundle, catalog: Catalog, store: UserStore | None) -> None:
        self.bundle = bundle
        self.catalog = catalog
        self.store = store

    async def read(
        self,
        user_id: str,
        trace: Trace,
        context: RequestContext | None = None,
        current_item: str | None = None,
    ) -> UserFacts:
        user = self.catalog.user_index.get(user_id)
        state = await self._state(user_id, trace) or UserState(None, None, None)
        embedding = state.embedding
        history, embedded = self._history(user, state)
        if embedding is None and not trace.degraded:
            known = user is not None or bool(history)  # in the bundle, or has sent events
            trace.degrade("no_embedding" if known else "unknown_user")
        if current_item is not None:
            current = self.catalog.item_index(current_item)
            if not history or history[-1] != current:
                history.append(current)
        edits = _edits(state.edits)
        words, age = self._context(user, context)
        shown = taste.prompt_history(history, edits, self.catalog)
        return UserFacts(
            embedding,
            history,
            shown,
            taste.unseen_by_embedding(shown, history[:embedded], edits, self.catalog),
            words,
            age,
            edits,
            revision=state.revision,
            disliked=frozenset(self.catalog.indices(state.dislikes)),
            skipped=frozenset(self.catalog.indices(state.skips)),
        )

    def _history(self, user: int | None, state: UserState) -> tuple[list[int], int]:
        """The published history (else the bundle's, as of its build), then the events
        logged since the published version was computed; and how many items the first part,
        the one the embedding was computed from, holds."""
        if state.history is not None:
            base = [int(i) for i in state.history]
        elif user is not None:
            base = [int(i) for i in self.bundle.histories[user]]
        else:
            base = []
        checkpoint = state.checkpoint if state.history is not None else None
        return base + self.catalog.indices(consumed_since(state.live, checkpoint)), len(base)

    async def _state(self, user_id: str, trace: Trace) -> UserState | None:
        """The user's published state, or None (and the reason in the trace)."""
        if self.store is None:
            trace.degrade("redis_down")
            return None
        try:
            with trace.stage("redis"):
                state = await self.store.fetch(user_id)
        except StoreUnavailable as e:
            metrics.REDIS_ERRORS.labels("fetch").inc()
            log.warning("redis unavailable", error=str(e))
            trace.degrade("redis_down")
            return None
        if state.version is not None and state.bundle_version != self.bundle.version:
            trace.degrade("stale_embedding")  # published for another bundle: indices differ
            return replace(state, version=None, embedding=None, history=None, checkpoint=None)
        return state

    def _context(
        self, user: int | None, context: RequestContext | None
    ) -> tuple[list[str] | None, int | None]:
        """Prompt context words and age: the bundle's facts, overridden by the request's."""
        row = dict(self.catalog.user_rows[user]) if user is not None else {}
        given = context.model_dump(exclude_none=True) if context else {}
        row.update({k: v for k, v in given.items() if k != "market"})
        if not {"age", "gender", "occupation", "region"} & set(row):
            return None, None
        age = int(row["age"]) if "age" in row else None
        words = context_words(
            age if age is not None else -1,
            str(row.get("gender", "")),
            str(row.get("occupation", "")),
            str(row.get("region", "")),
        )
        return words, age


def _edits(raw: str | None) -> TasteEdits:
    edits = taste.parse_edits(raw)
    if edits is None:
        log.warning("unreadable taste-profile edits ignored")
        return TasteEdits()
    return edits
