"""Rows straight into vLLM's engine core, past the ``LLM`` front end's per-request work.

A search's rows are alike: prompt embeddings, one generated token, and one of a few
parameter sets (a trie node's children). ``LLM.generate`` still renders every row, validates
and copies its parameters and builds a ``RequestOutput`` for it: a fifth of a search's CPU
time on a small model, paid per row under the gateway's GIL.
:class:`CoreDriver` builds one engine-core request per parameter set through vLLM's own input
processor (so validation and defaults stay vLLM's), then per row only swaps in the row's id
and embeddings, hands it to the engine core and reads the candidates' log-probs from the
core's outputs. Scheduling, KV and prefix cache, model runner and sampler are vLLM's as
before. The in-process engine checks this path against ``LLM.generate`` when it opens and
falls back to the front end when they differ (another vLLM version may shape them otherwise).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import torch

from model_store.engines.base import Row, embeddings

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

Logprobs = tuple[np.ndarray, np.ndarray]
"""A request's first position: (token ids, log-probs), the sampled token first, then the
requested candidates (in request order when vLLM keeps it)."""

Generate = Callable[[Sequence[Row], Sequence[np.ndarray]], list[Logprobs]]
"""Scores single-token requests, each its row and the candidates (at most
:data:`~model_store.engines.base.MAX_LOGPROB_TOKEN_IDS`) whose log-probs it reports."""


def sampling_params(candidates: np.ndarray) -> SamplingParams:
    """Greedy single-token request reporting the raw log-probs of `candidates` (≤ 128).

    A trie node's children are the same candidates in every search, so the parameters are
    made once per candidate set (vLLM copies them per request)."""
    return _params_for(_key(candidates))


def _key(candidates: np.ndarray) -> bytes:
    return np.ascontiguousarray(candidates, dtype=np.int64).tobytes()


@functools.lru_cache(maxsize=1 << 14)
def _params_for(candidates: bytes) -> SamplingParams:
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprob_token_ids=np.frombuffer(candidates, dtype=np.int64).tolist(),
        detokenize=False,
        flat_logprobs=True,  # a few flat lists per request instead of one object per token
        skip_clone=True,
    )


def through_front_end(llm: LLM) -> Generate:
    """The public path: one ``LLM.generate`` call for all requests."""

    def generate(rows: Sequence[Row], candidates: Sequence[np.ndarray]) -> list[Logprobs]:
        inputs: list[Any] = [{"prompt_embeds": embeddings(r)} for r in rows]
        params = [sampling_params(c) for c in candidates]
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return [_flat(o.outputs[0].logprobs) for o in outputs]

    return generate


def _flat(logprobs: Any) -> Logprobs:
    if logprobs is None or len(logprobs) == 0:
        raise RuntimeError("vLLM returned no log-probabilities")
    start, end = logprobs.start_indices[0], logprobs.end_indices[0]
    return (
        np.asarray(logprobs.token_ids[start:end], dtype=np.int64),
        np.asarray(logprobs.logprobs[start:end], dtype=np.float32),
    )


MAX_IDLE_STEPS = 10_000
"""Engine-core steps in a row without any output before a call gives up (a request the
scheduler can never run would otherwise keep the engine thread spinning)."""


class CoreDriver:
    """Feeds single-token prompt-embeddings requests to an ``LLM``'s engine core directly.

    Callers serialise their calls (the engine's process lock): every request added is
    stepped to its end before a call returns, so no other caller sees its outputs.
    """

    def __init__(self, llm: LLM, templates: int = 1 << 14) -> None:
        self._engine = llm.llm_engine
        self._core = self._engine.engine_core
        hashes = PromptBlockHashes.install(self._core)
        self._adding = hashes.adding if hashes is not None else _hashed_by_vllm
        self._ids = itertools.count()
        self._placeholder = torch.zeros(1, int(self._engine.model_config.get_hidden_size()))
        self._template = functools.lru_cache(maxsize=templates)(self._make_template)

    def _make_template(self, candidates: bytes) -> Any:
        """A request for `candidates` as vLLM's input processor makes it (parameters checked,
        defaults applied), over a one-row placeholder that every row replaces."""
        placeholder: Any = {"prompt_embeds": self._placeholder}
        return self._engine.input_processor.process_inputs(
            "template",
            placeholder,
            _params_for(candidates),
            supported_tasks=self._engine.get_supported_tasks(),
        )

    def generate(self, rows: Sequence[Row], candidates: Sequence[np.ndarray]) -> list[Logprobs]:
        names = [f"row-{next(self._ids)}" for _ in rows]
        wanted, found = set(names), dict[str, Logprobs]()
        now, idle = time.time(), 0
        try:
            for name, row, cands in zip(names, rows, candidates, strict=True):
                request = msgspec.structs.replace(
                    self._template(_key(cands)),
                    request_id=name,
                    external_req_id=name,
                    prompt_embeds=embeddings(row),
                    arrival_time=now,
                )
                with self._adding(name, row[0]):
                    self._core.add_request(request)
            while len(found) < len(names):
                outputs = self._core.get_output().outputs
                idle = 0 if outputs else idle + 1
                if idle > MAX_IDLE_STEPS:
                    raise RuntimeError("vLLM's engine core stopped answering")
                for out in outputs:
                    if out.finished and out.request_id in wanted:
                        found[out.request_id] = _first_position(out.new_logprobs)
        finally:
            if len(found) < len(names):  # an error on the way: leave nothing behind
                self._core.abort_requests([n for n in names if n not in found])
        return [found[n] for n in names]


class PromptBlockHashes:
    """vLLM's block hasher, with the blocks of a prompt hashed once for all its rows.

    With prompt embeddings, vLLM fingerprints every full KV-cache block of every request by
    SHA-256 over the block's embeddings: ~60 µs of a row's ~300 here, though a search's rows
    all begin with their prompt's blocks. A row whose full blocks lie within its prompt
    (its own few tokens fill none) gets the hashes of the prompt's first such row: the same
    bytes, hashed by vLLM's own function. Any other request is vLLM's to hash.
    """

    def __init__(self, inner: Callable[[Any], list[Any]], block_size: int) -> None:
        self._inner = inner
        self._block_size = block_size
        self._adding: dict[str, torch.Tensor] = {}  # request id -> its prompt, while added
        self._known: dict[int, list[Any]] = {}  # id of a live prompt -> its blocks' hashes

    @classmethod
    def install(cls, client: Any) -> PromptBlockHashes | None:
        """The hasher of an in-process engine core (installed once per core); None when
        the core is in another process or caches no prefixes."""
        core: Any = getattr(client, "engine_core", None)
        hasher = getattr(core, "request_block_hasher", None)
        size = getattr(getattr(core, "scheduler", None), "hash_block_size", None)
        if isinstance(hasher, cls):
            return hasher
        if hasher is None or not isinstance(size, int):
            return None
        installed = core.request_block_hasher = cls(hasher, size)
        return installed

    @contextlib.contextmanager
    def adding(self, request_id: str, prompt: torch.Tensor) -> Iterator[None]:
        """While `request_id` is added, its blocks are its prompt's."""
        self._adding[request_id] = prompt
        try:
            yield
        finally:
            del self._adding[request_id]

    def __call__(self, request: Any) -> list[Any]:
        prompt = self._adding.get(request.request_id)
        if (
            prompt is None
            or request.block_hashes
            or request.num_tokens // self._block_size != len(prompt) // self._block_size
        ):
            return self._inner(request)
        known = self._known.get(id(prompt))
        if known is None:  # tensors compare by value, so they are keyed by id while alive
            known = self._known[id(prompt)] = self._inner(request)
            weakref.finalize(prompt, self._known.pop, id(prompt), None)
        return list(known)


def _hashed_by_vllm(request_id: str, prompt: torch.Tensor) -> contextlib.nullcontext[None]:
    """`PromptBlockHashes.adding` where none is installed: vLLM hashes every row itself."""
    return contextlib.nullcontext()


def _first_position(lists: Any) -> Logprobs:
    """Row 0 of the core's `LogprobsLists` (padded to the batch's longest candidate list)."""
    if lists is None or len(lists.logprobs) == 0:
        raise RuntimeError("vLLM returned no log-probabilities")
    return (
        np.asarray(lists.logprob_token_ids[0], dtype=np.int64),
        np.asarray(lists.logprobs[0], dtype=np.float32),
    )
