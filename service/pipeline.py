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
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from model_store.bundle import Bundle
from model_store.generation import Beam, Engine, Prompt, SearchStats
from model_store.prompts import MODES, context_words
from model_store.recommend import Recommender, Scored
from model_store.vocab import words_of
from service import metrics, rules
from service.rules import Candidate, ItemFacts, RuleInput
from service.schemas import Item, RecommendationRequest, RecommendationResponse, ServedBy
from service.settings import Settings
from service.store import StoreUnavailable, UserState, UserStore
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
    history: list[int]
    context: list[str] | None
    age: int | None


class Pipeline:
    def __init__(
        self, bundle: Bundle, engine: Engine, store: UserStore | None, settings: Settings
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        self.recommender = Recommender(bundle)
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
        self.rules = rules.resolve(settings.rules)
        self.worker = EngineWorker(engine, self._search, settings.max_batch)
        metrics.BUNDLE.info({"version": bundle.version, "dataset": str(bundle.manifest["dataset"])})

    def _search(
        self,
        engine: Engine,
        prompts: Sequence[Prompt],
        width: int,
        stats: SearchStats,
        exclude: Sequence[Collection[int]],
    ) -> list[list[Beam]]:
        return self.recommender.generate(engine, prompts, width, stats, exclude)

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
            return None
        return state

    def _context(
        self, user: int | None, req: RecommendationRequest
    ) -> tuple[list[str] | None, int | None]:
        """Prompt context words and age: the bundle's facts, overridden by the request's."""
        row = dict(self.user_rows[user]) if user is not None else {}
        given = req.context.model_dump(exclude_none=True) if req.context else {}
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

    async def _user_facts(
        self, req: RecommendationRequest, timings: dict[str, float], degraded: list[str]
    ) -> UserFacts:
        user = self.user_index.get(req.user_id)
        state = await self._user_state(req.user_id, timings, degraded)
        embedding = state.embedding if state is not None else None
        if state is not None and state.history is not None:
            history = state.history.tolist()
        elif user is not None:
            history = self.bundle.histories[user].tolist()  # as of the bundle's build
        else:
            history = []
        if embedding is None and not degraded:
            degraded.append("unknown_user" if user is None else "no_embedding")
        if req.current_item is not None:
            current = self.item_index(req.current_item)
            if not history or history[-1] != current:
                history.append(current)
        context, age = self._context(user, req)
        return UserFacts(embedding, [int(i) for i in history], context, age)

    async def _generate(
        self,
        facts: UserFacts,
        req: RecommendationRequest,
        banned: frozenset[int],
        deadline: float,
        timings: dict[str, float],
    ) -> list[Beam]:
        mode = MODES["soft+prompt" if facts.embedding is not None else "prompt"]
        vocab = self.recommender.vocab
        ask = [w for w in words_of(req.prompt or "") if vocab.known(w)]
        with metrics.timed("project", timings):
            prompt = self.recommender.prompt(
                mode, facts.history, facts.embedding, facts.context, ask
            )
        width = max(self.settings.beam_width, req.k)
        with metrics.timed("generate", timings):
            future = self.worker.submit(prompt, width, banned, deadline)
            try:
                return await asyncio.wait_for(
                    asyncio.wrap_future(future), timeout=max(0.0, deadline - time.monotonic())
                )
            except TimeoutError as e:
                raise DeadlineExceeded("engine answered after the deadline") from e

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

    # ------------------------------------------------------------------------ request

    async def recommend(
        self, req: RecommendationRequest, request_id: str | None = None
    ) -> RecommendationResponse:
        start = time.monotonic()
        deadline = start + self.settings.deadline_ms / 1000.0
        timings: dict[str, float] = {}
        degraded: list[str] = []
        excluded = frozenset(i for u in req.exclude if (i := self.uri_index.get(u)) is not None)
        facts = await self._user_facts(req, timings, degraded)
        seen = set(facts.history)
        served_by: ServedBy = "generative" if facts.embedding is not None else "prompt-only"
        candidates: list[Candidate] = []
        # The filtering rules' items are cut from the search itself, so no beam is spent
        # on an item the rules would drop.
        banned = (seen if "no_repeats" in self.settings.rules else set()) | (
            excluded if "exclude" in self.settings.rules else set()
        )
        try:
            beams = await self._generate(facts, req, frozenset(banned), deadline, timings)
            with metrics.timed("rerank", timings):
                ranked = self.recommender.rerank(facts.embedding, facts.history, beams)
            beam_rank = {b.item: r for r, b in enumerate(beams)}
            candidates = [
                Candidate(
                    s.item,
                    s.score,
                    f"{served_by}: beam #{beam_rank[s.item] + 1}, reranked #{r + 1}",
                )
                for r, s in enumerate(ranked)
            ]
        except DeadlineExceeded:
            degraded.append("engine_deadline")
            served_by = "ann"
        except Exception as e:
            metrics.ENGINE_ERRORS.labels(type(e).__name__).inc()
            log.warning("engine failed", error=repr(e))
            degraded.append("engine_error")
            served_by = "ann"
        with metrics.timed("fallback", timings):
            backfill_path, backfill = self._backfill(facts, seen, 3 * req.k + len(excluded))
        if not candidates:
            served_by = backfill_path
        rule_input = RuleInput(
            seen=frozenset(seen),
            excluded=excluded,
            market=req.context.market if req.context else None,
            age=facts.age,
            k=req.k,
            genre_cap=self.settings.genre_cap,
            creator_cap=self.settings.creator_cap,
        )
        with metrics.timed("rules", timings):
            have = {c.item for c in candidates}
            pool = candidates + [c for c in backfill if c.item not in have]
            kept = rules.apply(self.rules, pool, rule_input, self.facts)[: req.k]
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

    def _item(self, c: Candidate) -> Item:
        return Item(
            uri=self.uris[c.item],
            title=self.titles[c.item],
            kind=self.kinds[c.item],
            score=round(c.score, 6),
            semantic_id=self.sids[c.item],
            why=c.why,
        )
