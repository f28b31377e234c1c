"""The request pipeline, top to bottom: one object that REST and gRPC both call.

    user state (Redis, one round trip) → soft token (projector) → prompt
    → SID-constrained beam search (engine worker, under the request's deadline)
    → LightGBM reranker → business rules → top k

Every degraded path is explicit: the response's `served_by` says which path answered and
`degraded` says why, and both are counted in Prometheus.

* no embedding (unknown user, nothing published, Redis down, embeddings of another bundle)
  → prompt-only generation (context + history, no soft token);
* engine error or past the deadline → ANN over the user-model item vectors, or popularity
  when there is no user vector either.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from model_store.bundle import Bundle
from model_store.generation import Beam, Engine
from model_store.prompts import MODES, context_words
from model_store.recommend import Recommender, Scored
from model_store.vocab import words_of
from service import metrics, rules, taste
from service.rules import Candidate, ItemFacts, RuleInput, Taste
from service.schemas import (
    Item,
    PlaylistRequest,
    RecommendationRequest,
    RecommendationResponse,
    RequestContext,
    ServedBy,
)
from service.settings import Settings
from service.store import StoreUnavailable, UserState, UserStore
from service.taste import TasteEdits
from service.worker import DeadlineExceeded, EngineWorker

log = structlog.get_logger(__name__)


class UnknownItem(LookupError):
    """A request named an item URI the catalog does not hold."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"unknown item {uri!r}")
        self.uri = uri


@dataclass(frozen=True)
class UserFacts:
    """What the prompt and the rules use about one user for one request."""

    embedding: np.ndarray | None
    history: list[int]  # everything consumed (the no-repeats rule)
    prompt_history: list[int]  # what the prompt shows: forgotten items out, `more` items in
    context: list[str] | None
    age: int | None
    edits: TasteEdits
    revision: int


@dataclass(frozen=True)
class Ask:
    """What one request asks for beyond the user's history."""

    k: int
    words: str = ""  # the user's own words
    beam_width: int = 0  # 0: the configured width
    prompt_weight: float = 0.0  # weight of prompt-to-item content similarity in the ranking
    excluded: frozenset[int] = frozenset()
    market: str | None = None
    current_item: str | None = None


class Pipeline:
    def __init__(
        self, bundle: Bundle, engine: Engine, store: UserStore | None, settings: Settings
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        self.recommender = Recommender(bundle, align=settings.prompt_align)
        self.store = store
        catalog = bundle.catalog
        self.uris: list[str] = catalog["uri"].tolist()
        self.titles: list[str] = catalog["title"].tolist()
        self.kinds: list[str] = catalog["kind"].tolist()
        self.sids = ["-".join(str(c) for c in sid) for sid in catalog["sid"]]
        self.uri_index = {u: i for i, u in enumerate(self.uris)}
        users = bundle.users
        self.user_index = {str(u): i for i, u in enumerate(users["user_id"])}
        self.user_rows = users.to_dict("records")
        markets, min_age = rules.load_availability(
            settings.availability_file, self.uri_index, len(self.uris)
        )
        self.facts = ItemFacts(
            genres=[tuple(g) for g in catalog["genres"]],
            creators=[str(c) for c in catalog["creator"]],
            markets=markets,
            min_age=min_age,
        )
        self.genre_names = frozenset(g for gs in self.facts.genres for g in gs)
        self.items_by_genre = _index(self.facts.genres)
        self.items_by_creator = _index([(c,) if c else () for c in self.facts.creators])
        self.catalog = taste.Catalog(
            uris=self.uris,
            titles=self.titles,
            kinds=self.kinds,
            creators=self.facts.creators,
            genres=self.facts.genres,
            first_code=np.asarray(bundle.sid_codes)[:, 0],
            vectors=bundle.item_vectors,
        )
        self.rules = rules.resolve(settings.rules)
        self.worker = EngineWorker(engine, self.recommender.generate, settings.max_batch)
        metrics.BUNDLE.info({"version": bundle.version, "dataset": str(bundle.manifest["dataset"])})

    def close(self) -> None:
        self.worker.close()

    def item_index(self, uri: str) -> int:
        item = self.uri_index.get(uri)
        if item is None:
            raise UnknownItem(uri)
        return item

    # ------------------------------------------------------------------------ stages

    async def _user_state(
        self, user_id: str, timings: dict[str, float], degraded: list[str]
    ) -> UserState | None:
        """The user's published state, or None (and the reason in `degraded`)."""
        if self.store is None:
            degraded.append("redis_down")
            return None
        try:
            with metrics.timed("redis", timings):
                state = await self.store.fetch(user_id)
        except StoreUnavailable as e:
            metrics.REDIS_ERRORS.labels("fetch").inc()
            log.warning("redis unavailable", error=str(e))
            degraded.append("redis_down")
            return None
        if state.version is not None and state.bundle_version != self.bundle.version:
            degraded.append("stale_embedding")  # published for another bundle: indices differ
            return UserState(None, None, None, state.edits, state.revision)
        return state

    def _context(
        self, user: int | None, context: RequestContext | None
    ) -> tuple[list[str] | None, int | None]:
        """Prompt context words and age: the bundle's facts, overridden by the request's."""
        row = dict(self.user_rows[user]) if user is not None else {}
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

    def _edits(self, raw: str | None) -> TasteEdits:
        if not raw:
            return TasteEdits()
        try:
            return TasteEdits.model_validate_json(raw)
        except ValueError:
            log.warning("unreadable taste-profile edits ignored")
            return TasteEdits()

    async def user_facts(
        self,
        user_id: str,
        context: RequestContext | None,
        current_item: str | None,
        timings: dict[str, float],
        degraded: list[str],
    ) -> UserFacts:
        user = self.user_index.get(user_id)
        state = await self._user_state(user_id, timings, degraded)
        embedding = state.embedding if state is not None else None
        if state is not None and state.history is not None:
            history = state.history.tolist()
        elif user is not None:
            history = self.bundle.histories[user].tolist()  # as of the bundle's build
        else:
            history = []
        if embedding is None and not degraded:
            degraded.append("unknown_user" if user is None else "no_embedding")
        if current_item is not None:
            current = self.item_index(current_item)
            if not history or history[-1] != current:
                history.append(current)
        edits = self._edits(state.edits if state is not None else None)
        forgotten = set(self._indices(edits.forget.items))
        forgotten_genres = set(edits.forget.genres)
        shown = [
            int(i) for i in history
            if int(i) not in forgotten and not forgotten_genres & set(self.facts.genres[int(i)])
        ]  # fmt: skip
        more = [i for i in self._indices(edits.more.items) if i not in shown]
        ctx, age = self._context(user, context)
        return UserFacts(
            embedding,
            [int(i) for i in history],
            shown + more,
            ctx,
            age,
            edits,
            revision=state.revision if state is not None else 0,
        )

    def _indices(self, uris: Sequence[str]) -> list[int]:
        return [i for u in uris if (i := self.uri_index.get(u)) is not None]

    def _taste(self, edits: TasteEdits) -> Taste:
        def genres(names: Sequence[str]) -> frozenset[str]:
            return frozenset(n for n in names if n in self.genre_names)

        return Taste(
            more_genres=genres(edits.more.genres),
            more_creators=frozenset(edits.more.creators),
            more_items=frozenset(self._indices(edits.more.items)),
            less_genres=genres(edits.less.genres),
            less_creators=frozenset(edits.less.creators),
            less_items=frozenset(self._indices(edits.less.items)),
            forget_genres=genres(edits.forget.genres),
            forget_items=frozenset(self._indices(edits.forget.items)),
        )

    async def _generate(
        self, facts: UserFacts, ask: Ask, banned: frozenset[int], deadline: float,
        timings: dict[str, float],
    ) -> list[Beam]:  # fmt: skip
        mode = MODES["soft+prompt" if facts.embedding is not None else "prompt"]
        vocab = self.recommender.vocab
        words = [*words_of(ask.words), *facts.edits.more.genres]
        known = list(dict.fromkeys(w for w in words if vocab.known(w)))
        less = [g for g in facts.edits.less.genres if vocab.known(g)]
        with metrics.timed("project", timings):
            prompt = self.recommender.prompt(
                mode, facts.prompt_history, facts.embedding, facts.context, known, less
            )
        width = max(ask.beam_width or self.settings.beam_width, ask.k)
        with metrics.timed("generate", timings):
            future = self.worker.submit(prompt, width, banned, deadline)
            try:
                searched = await asyncio.wait_for(
                    asyncio.wrap_future(future), timeout=max(0.0, deadline - time.monotonic())
                )
            except TimeoutError as e:
                raise DeadlineExceeded("engine answered after the deadline") from e
        for level, seconds in enumerate(searched.level_seconds):
            timings[f"beam_step_{level}"] = seconds * 1000.0
        return searched.beams

    def _backfill(
        self, facts: UserFacts, seen: set[int], n: int
    ) -> tuple[ServedBy, list[Candidate]]:
        """The non-generative ranking: ANN over the user vector, else popularity."""
        if facts.embedding is not None:
            found: list[Scored] = self.recommender.nearest(facts.embedding, seen, n)
            return "ann", [Candidate(s.item, s.score, f"ann #{r + 1}") for r, s in enumerate(found)]
        items = self.recommender.popular(seen, n)
        return "popularity", [
            Candidate(i, float(-r), f"popularity #{r + 1}") for r, i in enumerate(items)
        ]

    def _more_candidates(
        self, facts: UserFacts, t: Taste, seen: set[int], n: int
    ) -> list[Candidate]:
        """Up to `n` items of the genres and creators the user asked for more of, best for
        the user first: asking for more of something the model rarely writes still shows it."""
        if not (t.more_genres or t.more_creators) or n < 1:
            return []
        groups = [self.items_by_genre.get(g) for g in t.more_genres]
        groups += [self.items_by_creator.get(c) for c in t.more_creators]
        found = [g for g in groups if g is not None]
        if not found:
            return []
        every = np.unique(np.concatenate(found))
        wanted = every[~np.isin(every, np.fromiter(seen, dtype=np.int64))].tolist()
        if facts.embedding is not None:
            scores = self.recommender.table.vectors[wanted] @ facts.embedding
            scores = scores + self.recommender.table.prior[wanted]
        else:
            scores = self.recommender.table.log_popularity[wanted]
        best = np.argsort(-scores, kind="stable")[:n]
        return [Candidate(wanted[j], float(scores[j]), "more of what you asked for") for j in best]

    def warm(self) -> None:
        """Loads the sentence encoder now (seconds), not on the first playlist request."""
        self._prompt_similarity("warm up")

    def _prompt_similarity(self, words: str) -> np.ndarray | None:
        """Cosine similarity of every item's content vector to the user's words."""
        if not words.strip():
            return None
        from model_store.content import encode

        query = encode([words])[0]
        return np.asarray(self.recommender.table.content @ query, dtype=np.float64)

    # ------------------------------------------------------------------------ requests

    async def recommend(
        self, req: RecommendationRequest, request_id: str | None = None
    ) -> RecommendationResponse:
        ask = Ask(
            k=req.k,
            words=req.prompt or "",
            excluded=frozenset(self._indices(req.exclude)),
            market=req.context.market if req.context else None,
            current_item=req.current_item,
        )
        return await self.serve(req.user_id, req.context, ask, request_id)

    async def playlist(
        self, req: PlaylistRequest, request_id: str | None = None
    ) -> RecommendationResponse:
        """An ordered list that follows the prompt's words while staying personal: the words
        go to the LLM, and their content similarity to each item into the ranking."""
        ask = Ask(
            k=req.length,
            words=req.prompt,
            beam_width=max(self.settings.playlist_beam_width, req.length),
            prompt_weight=self.settings.playlist_prompt_weight,
            market=req.context.market if req.context else None,
        )
        return await self.serve(req.user_id, req.context, ask, request_id)

    async def serve(
        self,
        user_id: str,
        context: RequestContext | None,
        ask: Ask,
        request_id: str | None = None,
    ) -> RecommendationResponse:
        start = time.monotonic()
        deadline = start + self.settings.deadline_ms / 1000.0
        timings: dict[str, float] = {}
        degraded: list[str] = []
        facts = await self.user_facts(user_id, context, ask.current_item, timings, degraded)
        seen = set(facts.history)
        served_by: ServedBy = "generative" if facts.embedding is not None else "prompt-only"
        taste_rules = self._taste(facts.edits)
        # The filtering rules' items are cut from the search itself, so no beam is spent
        # on an item the rules would drop.
        banned = (seen if "no_repeats" in self.settings.rules else set()) | (
            ask.excluded if "exclude" in self.settings.rules else set()
        )
        if "taste" in self.settings.rules:
            banned |= taste_rules.forget_items
        beams: list[Beam] = []
        try:
            beams = await self._generate(facts, ask, frozenset(banned), deadline, timings)
        except DeadlineExceeded:
            degraded.append("engine_deadline")
            served_by = "ann"
        except Exception as e:
            metrics.ENGINE_ERRORS.labels(type(e).__name__).inc()
            log.warning("engine failed", error=repr(e))
            degraded.append("engine_error")
            served_by = "ann"
        with metrics.timed("fallback", timings):
            backfill_path, backfill = self._backfill(facts, seen, 3 * ask.k + len(ask.excluded))
        if not beams:
            served_by = backfill_path
        with metrics.timed("rerank", timings):
            candidates = self._rank(facts, beams, ask, seen, served_by)
        asked = frozenset(w for w in words_of(ask.words) if w in self.genre_names)
        rule_input = RuleInput(
            seen=frozenset(seen),
            excluded=ask.excluded,
            market=ask.market,
            age=facts.age,
            k=ask.k,
            genre_cap=self.settings.genre_cap,
            creator_cap=self.settings.creator_cap,
            taste=taste_rules,
            asked_genres=asked,
        )
        with metrics.timed("rules", timings):
            more = self._more_candidates(facts, taste_rules, seen, ask.k // 2)
            pool = _first_of_each(candidates + more + backfill)
            kept = rules.apply(self.rules, pool, rule_input, self.facts)[: ask.k]
        for reason in degraded:
            metrics.FALLBACKS.labels(reason).inc()
        metrics.SERVED.labels(served_by).inc()
        timings["total"] = (time.monotonic() - start) * 1000.0
        return RecommendationResponse(
            request_id=request_id or uuid.uuid4().hex,
            bundle_version=self.bundle.version,
            served_by=served_by,
            degraded=degraded,
            items=[self._item(c) for c in kept],
            timings_ms={k: round(v, 3) for k, v in timings.items()},
        )

    def _rank(
        self, facts: UserFacts, beams: list[Beam], ask: Ask, seen: set[int], path: ServedBy
    ) -> list[Candidate]:
        """Reranker order of the generated items; with a prompt weight, the items closest to
        the user's words join the pool and the order mixes both (standardised scores)."""
        similarity = self._prompt_similarity(ask.words) if ask.prompt_weight else None
        pool = list(beams)
        if similarity is not None:
            have = {b.item for b in beams} | seen | ask.excluded
            close = [int(i) for i in np.argsort(-similarity)[: 3 * ask.k + len(have)]]
            pool += [Beam(i, (), float("nan")) for i in close if i not in have][: 2 * ask.k]
        if not pool:
            return []
        ranked = self.recommender.rerank(facts.embedding, facts.history, pool)
        beam_rank = {b.item: r for r, b in enumerate(beams)}
        scores = np.array([s.score for s in ranked])
        if similarity is not None:
            sims = similarity[[s.item for s in ranked]]
            scores = _z(scores) + ask.prompt_weight * _z(sims)
        order = np.argsort(-scores, kind="stable")
        out = []
        for r, j in enumerate(order):
            s = ranked[int(j)]
            source = (
                f"{path}: beam #{beam_rank[s.item] + 1}" if s.item in beam_rank else "prompt match"
            )
            out.append(Candidate(s.item, float(scores[j]), f"{source}, ranked #{r + 1}"))
        return out

    def _item(self, c: Candidate) -> Item:
        return Item(
            uri=self.uris[c.item],
            title=self.titles[c.item],
            kind=self.kinds[c.item],
            score=round(c.score, 6),
            semantic_id=self.sids[c.item],
            why=c.why,
        )


def _index(keys_per_item: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Key (a genre, a creator) → the items that have it, ascending."""
    items: dict[str, list[int]] = {}
    for item, keys in enumerate(keys_per_item):
        for key in keys:
            items.setdefault(key, []).append(item)
    return {key: np.asarray(v, dtype=np.int64) for key, v in items.items()}


def _first_of_each(cands: Sequence[Candidate]) -> list[Candidate]:
    """Each item once, where it first appears."""
    seen: set[int] = set()
    out = []
    for c in cands:
        if c.item not in seen:
            seen.add(c.item)
            out.append(c)
    return out


def _z(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / (spread if spread > 1e-9 else 1.0)
