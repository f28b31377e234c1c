"""Taste-profile reads and edits over Redis, with optimistic concurrency.

A PATCH names the revision it read (`If-Match`); a stale one is refused (HTTP 412), so two
editors never silently overwrite each other. Without `If-Match` the patch is merged into
whatever is stored, atomically (compare-and-set, retried on a concurrent write).
"""

from __future__ import annotations

from collections.abc import Callable

from model_store.catalog import Catalog
from service.taste import TasteEdits, TasteProfile, build_profile
from service.trace import Trace
from service.users import UserReader
from service.userstore import StoreUnavailable, Unavailable, UserStore

MERGE_ATTEMPTS = 5


class StaleRevision(Exception):
    """The edits changed since the caller read them."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"revision {expected} is stale; the profile is at revision {current}")
        self.current = current


class ProfileUnavailable(Unavailable):
    """Edits cannot be read or stored: Redis is down."""


class ProfileContended(Exception):
    """Edits without a revision lost every compare-and-set to concurrent writers: a
    conflict for the caller to retry, not an outage."""


class UnknownNames(ValueError):
    """An edit names genres, creators or items the catalog does not have (a typo, or a URI
    of another catalog): refused rather than stored and shown back."""

    def __init__(self, unknown: dict[str, list[str]]) -> None:
        named = "; ".join(f"{kind} {', '.join(map(repr, v))}" for kind, v in unknown.items())
        super().__init__(f"not in this catalog: {named}")
        self.unknown = unknown


class Profiles:
    def __init__(self, users: UserReader, store: UserStore | None, catalog: Catalog) -> None:
        self.users = users
        self.store = store
        self.catalog = catalog

    async def get(self, user_id: str) -> TasteProfile:
        """The derived profile; `degraded` says so when Redis is down (edits unknown)."""
        trace = Trace()
        facts = await self.users.read(user_id, trace)
        profile = build_profile(
            user_id, self.catalog, facts.history, facts.embedding, facts.edits, facts.revision
        )
        profile.degraded = [d for d in trace.degraded if d in ("redis_down", "stale_embedding")]
        return profile

    async def patch(self, user_id: str, patch: TasteEdits, if_match: int | None) -> int:
        """Merges `patch` into the stored edits; the new revision."""
        unknown = self._unknown(patch)
        if unknown:
            raise UnknownNames(unknown)
        return await self._update(user_id, if_match, lambda current: current.apply(patch))

    def _unknown(self, patch: TasteEdits) -> dict[str, list[str]]:
        """What `patch` names that the catalog does not have, by kind (empty: nothing)."""
        sets = (patch.more, patch.less, patch.forget)
        known = {
            "genres": self.catalog.genre_names,
            "creators": self.catalog.creator_names,
            "items": self.catalog.uri_index,
        }
        unknown = {
            kind: sorted({n for t in sets for n in getattr(t, kind) if n not in names})
            for kind, names in known.items()
        }
        return {kind: names for kind, names in unknown.items() if names}

    async def reset(self, user_id: str, if_match: int | None) -> int:
        """Clears every edit (a new revision, so readers of the old one see the change)."""
        return await self._update(user_id, if_match, lambda _: TasteEdits())

    async def _update(
        self, user_id: str, if_match: int | None, change: Callable[[TasteEdits], TasteEdits]
    ) -> int:
        """Read, change, compare-and-set; with `if_match`, only from that revision, else
        retried a few times over concurrent writes. The new revision (the same one when the
        change changes nothing: a repeated PATCH is idempotent)."""
        store = self.store
        if store is None:
            raise ProfileUnavailable("no Redis configured")
        try:
            for _ in range(MERGE_ATTEMPTS):
                revision, raw = await store.get_edits(user_id)
                if if_match is not None and if_match != revision:
                    raise StaleRevision(if_match, revision)
                current = TasteEdits.model_validate_json(raw) if raw else TasteEdits()
                changed = change(current)
                if changed == current:  # nothing new: no write, no new revision
                    return revision
                written, new_revision = await store.set_edits(
                    user_id, revision, changed.model_dump_json()
                )
                if written:
                    return new_revision
                if if_match is not None:
                    raise StaleRevision(if_match, new_revision)
        except StoreUnavailable as e:
            raise ProfileUnavailable(str(e), e.retry_after_s) from e
        raise ProfileContended(
            f"the profile changed under {MERGE_ATTEMPTS} concurrent edits in a row; try again"
        )
