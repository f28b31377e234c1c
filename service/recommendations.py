"""The use case REST and gRPC both call: one request, top to bottom, once.

    user state (Redis, one round trip) → prompt (soft token from the projector)
    → SID-constrained beam search (the batcher, under the request's deadline)
    → LightGBM reranker → business rules → top k

Every degraded path is explicit: the response's `served_by` says which path answered and
`degraded` says why, and both are counted in Prometheus.

* no embedding (unknown user, nothing published, Redis down, embeddings of another bundle)
  → prompt-only generation (context + history, no soft token);
* engine error or past the deadline → ANN over the user-model item vectors, or popularity
  when there is no user vector either.

A request the engine could not serve before its deadline is not degraded but refused at
once (`service.admission.Overloaded`), so the ones admitted keep their latency.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import structlog

from model_store.bundle import Bundle
from model_store.catalog import Catalog
from model_store.engines.base import EngineError
from model_store.generation import Beam, Engine, Prompt
from model_store.prompts import MODES
from model_store.recommend import Recommender
from model_store.vocab import words_of
from service import metrics, rules, taste
from service.admission import SETTLE_BATCHES, Admission
from service.batcher import Batcher, DeadlineExceeded
from service.ranking import Ranker, Words, first_of_each
from service.rules import Candidate, ItemFacts, RuleInput, Rules
from service.schemas import (
    Item,
    PlaylistRequest,
    RecommendationRequest,
    RecommendationResponse,
    RequestContext,
    ServedBy,
)
from service.settings import Settings
from service.trace import Trace
from service.users import UserFacts, UserReader
from service.userstore import UserStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Ask:
    """What one request asks for beyond the user's history."""

    k: int
    words: str = ""  # the user's own words
    beam_width: int = 0  # 0: the configured width (widened for a large k: `search_width`)
    prompt_weight: float = 0.0  # weight of prompt-to-item content similarity in the ranking
    excluded: frozenset[int] = frozenset()
    market: str | None = None
    current_item: str | None = None


class Recommendations:
    """Recommendations and playlists over one bundle; see the module docstring."""

    def __init__(
        self,
        *,
        bundle: Bundle,
        catalog: Catalog,
        core: Recommender,
        users: UserReader,
        batcher: Batcher,
        ranker: Ranker,
        rules: Rules,
        facts: ItemFacts,
        settings: Settings,
    ) -> None:
        self.bundle, self.catalog, self.core = bundle, catalog, core
        self.users, self.batcher, self.ranker = users, batcher, ranker
        self.rules, self.facts, self.settings = rules, facts, settings

    @classmethod
    def create(
        cls, bundle: Bundle, engine: Engine, store: UserStore | None, settings: Settings
    ) -> Recommendations:
        """Builds the catalog and the request-path parts once for `bundle`."""
        catalog = Catalog.from_bundle(bundle)
        core = Recommender(bundle, align=settings.prompt_align)
        markets, min_age = rules.load_availability(
            settings.availability_file, catalog.uri_index, len(catalog)
        )
        admission = Admission(settings.max_queue, settings.max_wait_share)
        return cls(
            bundle=bundle,
            catalog=catalog,
            core=core,
            users=UserReader(bundle, catalog, store),
            batcher=Batcher(engine, core.start_search, settings.max_batch, admission),
            ranker=Ranker(core, catalog),
            rules=Rules(settings.rules),
            facts=ItemFacts(catalog.genres, catalog.creators, markets, min_age),
            settings=settings,
        )

    def warm(self) -> None:
        """Loads the sentence encoder and searches through the engine worker, so the first
        request is not the slow one and admission starts from a warm engine's settled cost
        (the cold first search is not part of it)."""
        self.ranker.warm()
        prompt = self.core.prompt(MODES["prompt"], [], None, None)
        width = self.settings.beam_width
        for search in range(1 + SETTLE_BATCHES):
            if search <= 1:
                self.batcher.admission.forget()
            try:
                self.batcher.submit(prompt, width, (), time.monotonic() + 60.0).result()
            except EngineError as e:  # a remote engine not up yet: requests fall back meanwhile
                log.warning("engine warm-up search failed", error=str(e))
                return

    def close(self) -> None:
        self.batcher.close()

    async def recommend(
        self, req: RecommendationRequest, request_id: str | None = None
    ) -> RecommendationResponse:
        ask = Ask(
            k=req.k,
            words=req.prompt or "",
            excluded=frozenset(self.catalog.indices(req.exclude)),
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
            beam_width=self.settings.playlist_beam_width,
            prompt_weight=self.settings.playlist_prompt_weight,
            market=req.context.market if req.context else None,
        )
        return await self.serve(req.user_id, req.context, ask, request_id)

    async def serve(
        self, user_id: str, context: RequestContext | None, ask: Ask, request_id: str | None = None
    ) -> RecommendationResponse:
        trace = Trace()
        with self.batcher.admission.admitted(self._deadline(trace)):
            facts = await self.users.read(user_id, trace, context, ask.current_item)
            words = self._read_words(ask, trace)
            request = self._rule_input(facts, ask, words)
            seen = set(facts.history)
            beams, served_by = await self._generate(facts, words, ask, request, trace)
        with trace.stage("fallback"):
            path, backfill = self.ranker.backfill(facts, seen, 3 * ask.k + len(ask.excluded))
        if not beams:
            served_by = path
        with trace.stage("rerank"):
            ranked = self.ranker.rank(facts, beams, served_by, words, ask.prompt_weight, ask.k,
                                      leave_out=frozenset(seen) | ask.excluded)  # fmt: skip
        with trace.stage("rules"):
            more = self.ranker.more_of(facts, request.taste, seen, ask.k // 2)
            pool = first_of_each(ranked + more + backfill)
            kept = self.rules.apply(pool, request, self.facts)[: ask.k]
        return RecommendationResponse(
            request_id=request_id or uuid.uuid4().hex,
            bundle_version=self.bundle.version,
            served_by=served_by,
            degraded=trace.degraded,
            items=[self._item(c) for c in kept],
            timings_ms=trace.finish(served_by),
        )

    def _read_words(self, ask: Ask, trace: Trace) -> Words:
        with trace.stage("words"):
            return self.ranker.read_words(ask.words)

    def _deadline(self, trace: Trace) -> float:
        return trace.started + self.settings.deadline_ms / 1000.0

    def _rule_input(self, facts: UserFacts, ask: Ask, words: Words) -> RuleInput:
        return RuleInput(
            seen=frozenset(facts.history),
            excluded=ask.excluded,
            market=ask.market,
            age=facts.age,
            k=ask.k,
            genre_cap=self.settings.genre_cap,
            creator_cap=self.settings.creator_cap,
            taste=taste.resolve(facts.edits, self.catalog),
            asked_genres=words.intent.genres,
            disliked=facts.disliked,
            skipped=facts.skipped,
        )

    async def _generate(
        self, facts: UserFacts, words: Words, ask: Ask, request: RuleInput, trace: Trace
    ) -> tuple[list[Beam], ServedBy]:
        """The generated items and the path they stand for; on an engine failure or a
        missed deadline, none and `ann` (the backfill then decides ann or popularity)."""
        with trace.stage("project"):
            prompt = self._prompt(facts, words)
        width = self.settings.search_width(ask.k, ask.beam_width)
        try:
            with trace.stage("generate"):
                searched = await self.batcher.search(
                    prompt, width, self.rules.cut_from_search(request), self._deadline(trace)
                )
        except DeadlineExceeded:
            trace.degrade("engine_deadline")
            return [], "ann"
        except Exception as e:
            metrics.ENGINE_ERRORS.labels(type(e).__name__).inc()
            log.warning("engine failed", error=repr(e))
            trace.degrade("engine_error")
            return [], "ann"
        for level, seconds in enumerate(searched.level_seconds):
            trace.record(f"beam_step_{level}", seconds)
        return searched.beams, "generative" if facts.embedding is not None else "prompt-only"

    def _prompt(self, facts: UserFacts, words: Words) -> Prompt:
        """Soft token + context + history as SIDs + the user's words, the genres they ask
        for (named or meant) and `more` genres; `less` genres are written as words to avoid."""
        mode = MODES["soft+prompt" if facts.embedding is not None else "prompt"]
        vocab = self.core.vocab
        asked = [*words_of(words.text), *sorted(words.intent.genres), *facts.edits.more.genres]
        known = list(dict.fromkeys(w for w in asked if vocab.known(w)))
        less = [g for g in facts.edits.less.genres if vocab.known(g)]
        return self.core.prompt(
            mode, facts.prompt_history, facts.embedding, facts.context, known, less, facts.newer
        )

    def _item(self, c: Candidate) -> Item:
        catalog = self.catalog
        return Item(
            uri=catalog.uris[c.item],
            title=catalog.titles[c.item],
            kind=catalog.kinds[c.item],
            score=round(c.score, 6),
            semantic_id=catalog.sids[c.item],
            why=c.why,
        )
