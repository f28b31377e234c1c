"""The in-process vLLM engine: a ``vllm.LLM`` inside this process scores the search's rows.

Every live row becomes one ``prompt_embeds`` request that generates a single token and
returns the log-probabilities of that row's candidates only, the rows of every search in
one call, fed straight to vLLM's engine core (:mod:`~model_store.engines.vllm_core`).
Prefix caching serves the full 32-token blocks that rows share (the prompt's, for every
beam of it), so a row recomputes only its last partial block.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model_store.engines.base import (
    MAX_LOGPROB_TOKEN_IDS,
    EmbeddingEngine,
    EmbeddingRows,
    Row,
    load_input_embeddings,
)
from model_store.engines.vllm_core import CoreDriver, Generate, Logprobs, through_front_end
from model_store.generation import Prompt, Session

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)

_PROCESS_LOCK = threading.RLock()
"""vLLM keeps per-process state (the forward context of the running step, the distributed
groups): in-process engines take turns, so two can live together (a gateway rolling out a
new bundle opens the new engine while the old one still serves)."""
_open = [0]  # in-process engines open in this process, under _PROCESS_LOCK


class VLLMEngine(EmbeddingEngine):
    """A ``vllm.LLM`` scoring each live row as one single-token request.

    `**llm_kwargs` go to ``vllm.LLM`` and override the defaults set here. `kv_cache_gib`
    bounds the KV cache (prefix-cache hits included): a small model needs ~2 KiB a token.
    `threads` is torch's intra-op thread count for this process (see :func:`pin_threads`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        block_size: int = 32,
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
        dtype: str = "float32",
        kv_cache_gib: float = 1.0,
        seed: int = 0,
        warmup: bool = True,
        threads: int | None = 1,
        **llm_kwargs: Any,
    ) -> None:
        if threads is not None:
            pin_threads(threads)
        from vllm import LLM

        options: dict[str, Any] = {
            "enable_prompt_embeds": True,
            "enable_prefix_caching": True,
            # Without this a generation_config.json could slip top_k/top_p defaults in.
            "generation_config": "vllm",
            # The default, pinned: log-softmax of the unprocessed logits over the whole vocabulary.
            "logprobs_mode": "raw_logprobs",
            # Prompts come as embeddings and answers as token ids: a tokenizer would only be
            # asked for its EOS id on every request (~85 us each, through transformers).
            "skip_tokenizer_init": True,
            "dtype": dtype,
            "block_size": block_size,
            "max_num_seqs": max_num_seqs,
            "enforce_eager": enforce_eager,
            "seed": seed,
            # An explicit KV-cache size: by default the CPU backend claims 92% of the node's
            # memory (gpu_memory_utilization) and refuses to start when others use more than 8%.
            "kv_cache_memory_bytes": int(kv_cache_gib * 2**30),
        }
        options.update(llm_kwargs)
        self.model_dir = Path(model_dir)
        self.table = load_input_embeddings(self.model_dir)
        if options["skip_tokenizer_init"]:
            quiet_tokenizer_warmup()
        with _PROCESS_LOCK:
            self.llm: LLM | None = LLM(model=str(self.model_dir), **options)
            _open[0] += 1
            self._generate, self.direct = _fastest_path(self.llm, self.table)
            if warmup:
                self.warm()

    def ready(self) -> bool:
        """In-process: ready while not closed."""
        return self.llm is not None

    def _require_generate(self) -> Generate:
        if self.llm is None:
            raise RuntimeError("the engine is closed")
        return self._generate

    def open(self, prompts: Sequence[Prompt]) -> VLLMSession:
        return VLLMSession(self._require_generate(), self.table, self.embed(prompts))

    def score_sessions(
        self, asks: Sequence[tuple[Session, Sequence[np.ndarray]]]
    ) -> list[list[np.ndarray]]:
        """The rows of several searches (of this engine) in one `generate` call."""
        batches = []
        for session, candidates in asks:
            if not isinstance(session, VLLMSession):
                raise TypeError("a session of another engine")
            batches.append(session.requests(candidates))
        return _generate_all(self._require_generate(), batches)

    def close(self) -> None:
        """Shuts the engine core down (and its worker processes when multiprocessing)."""
        if self.llm is None:
            return
        with _PROCESS_LOCK:
            llm, self.llm = self.llm, None
            _open[0] -= 1
            _shutdown(llm.llm_engine.engine_core, others_open=_open[0] > 0)
        del llm


class WithoutTokenizerWarmup(logging.Filter):
    """Drops vLLM's warning that it could not warm up a chat template without a tokenizer.

    The engine loads no tokenizer on purpose (`skip_tokenizer_init`: prompts are
    embeddings), yet ``LLM`` still renders a warm-up chat and logs the tokenizer's absence
    as a warning with a traceback on every start, which reads like a fault. Every other
    record of that logger passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            record.getMessage() == "Chat template warmup failed"
            and "skip_tokenizer_init" in str(error)
        )


VLLM_RENDERER_LOGGER = "vllm.renderers.base"


def quiet_tokenizer_warmup() -> None:
    """Installs :class:`WithoutTokenizerWarmup` on vLLM's renderer logger (once)."""
    logger = logging.getLogger(VLLM_RENDERER_LOGGER)
    if not any(isinstance(f, WithoutTokenizerWarmup) for f in logger.filters):
        logger.addFilter(WithoutTokenizerWarmup())


def pin_threads(threads: int) -> None:
    """Sets torch's intra-op threads, the way vLLM itself no longer can.

    A search is hundreds of tiny ops (a row's matmuls are microseconds of work). With more
    than one OpenMP thread each op ends in a barrier with threads that, beside a busy event
    loop or another process, are off the CPU: every op then waits a scheduling slice. vLLM
    means to go down to one thread for serving, but its CPU worker replaces
    ``torch.set_num_threads`` with a no-op first, so the call is lost and torch keeps one
    thread per core. ``torch._C.set_num_threads`` is the original, which nothing replaces.
    """
    if threads < 1:
        raise ValueError("threads must be at least 1")
    torch._C.set_num_threads(threads)


PROBE_TOKENS = 70
"""The opening probe's prompt: longer than two KV-cache blocks of vLLM's usual sizes."""


def _fastest_path(llm: LLM, table: torch.Tensor) -> tuple[Generate, bool]:
    """The engine core driven directly when it answers a probe exactly as ``LLM.generate``
    does; the front end otherwise (with a warning saying why). The probe's rows share a
    prompt longer than a KV-cache block, as a search's rows do."""
    front_end = through_front_end(llm)
    vocab = int(table.shape[0])
    prompt = table[torch.arange(PROBE_TOKENS) % vocab]
    probe: list[Row] = [(prompt, table[:0]), (prompt, table[:1]), (prompt, table[1:3])]
    candidates = [np.arange(min(3, vocab))] * len(probe)
    n = len(candidates[0]) + 1
    try:
        direct = CoreDriver(llm).generate
        for want, got in zip(front_end(probe, candidates), direct(probe, candidates), strict=True):
            if not (
                np.array_equal(want[0][1:n], got[0][1:n])
                and np.allclose(want[1][1:n], got[1][1:n], atol=1e-5)
            ):
                raise ValueError(f"its log-probs differ: {got[1][1:n]} against {want[1][1:n]}")
        return direct, True
    except Exception as e:  # another vLLM version: keep the public path
        reason = f"{type(e).__name__}: {e}"
    log.warning(
        "vLLM's engine core is not driven directly (%s): rows go through LLM.generate", reason
    )
    return front_end, False


def _shutdown(client: Any, others_open: bool) -> None:
    """Shuts one engine core down. An in-process core's shutdown also tears down vLLM's
    process-wide distributed state, which every other in-process engine shares (a gateway
    rolling out a new bundle serves from the new engine while it closes the old one): while
    others are open, only this core's own executor and scheduler are released."""
    from vllm.v1.engine.core_client import InprocClient

    if not (others_open and isinstance(client, InprocClient)):
        client.shutdown()
        return
    if client._finalizer.detach() is None:  # already shut down
        return
    core = client.engine_core
    core.structured_output_manager.clear_backend()
    core.model_executor.shutdown()
    core.scheduler.shutdown()


@dataclass
class _Requests:
    """The vLLM requests of one session's rows: a row with more candidates than vLLM's cap
    of 128 `logprob_token_ids` becomes several requests over the same embeddings."""

    n_rows: int
    rows: list[Row] = field(default_factory=list)
    pieces: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (row, candidates)

    def answers(self, outputs: Sequence[Logprobs]) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in range(self.n_rows)]
        for (r, piece), (ids, values) in zip(self.pieces, outputs, strict=True):
            parts[r].append(_candidate_logprobs(ids, values, piece))
        return [np.concatenate(p) if p else np.zeros(0, dtype=np.float32) for p in parts]


def _generate_all(generate: Generate, batches: Sequence[_Requests]) -> list[list[np.ndarray]]:
    """Every batch's requests in one call (one scheduler pass and one forward per step for
    all of them), answers split back per batch.

    (A request with `logprobs=-1` cannot share the call: when any request in a batch sets
    `logprob_token_ids`, vLLM 0.32's sampler returns those for every request.)
    """
    rows = [r for b in batches for r in b.rows]
    if not rows:
        return [b.answers([]) for b in batches]
    candidates = [piece for b in batches for _, piece in b.pieces]
    with _PROCESS_LOCK:
        outputs = generate(rows, candidates)
    answers, start = [], 0
    for b in batches:
        answers.append(b.answers(outputs[start : start + len(b.rows)]))
        start += len(b.rows)
    return answers


class VLLMSession(EmbeddingRows):
    """A search's rows, each scored as vLLM requests over its prompt embeddings."""

    def __init__(
        self, generate: Generate, table: torch.Tensor, prompts: list[torch.Tensor]
    ) -> None:
        super().__init__(table, prompts)
        self._generate = generate

    def requests(self, candidates: Sequence[np.ndarray]) -> _Requests:
        wanted = self._checked(candidates)
        row_inputs = self._row_inputs()
        batch = _Requests(len(wanted))
        for r, cands in enumerate(wanted):
            if not len(cands):
                continue
            row = row_inputs(r)
            for start in range(0, len(cands), MAX_LOGPROB_TOKEN_IDS):
                piece = cands[start : start + MAX_LOGPROB_TOKEN_IDS]
                batch.rows.append(row)
                batch.pieces.append((r, piece))
        return batch

    def logprobs(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One `generate` call for all rows."""
        return _generate_all(self._generate, [self.requests(candidates)])[0]


def _candidate_logprobs(ids: np.ndarray, values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates' log-probs from the first generated position of a request.

    With `logprob_token_ids` the entries are [sampled token, *candidates in request order]
    (the engine core's rows padded beyond); anything else is matched by token id.
    """
    n = len(candidates) + 1
    if len(ids) >= n and np.array_equal(ids[1:n], candidates):
        return values[1:n]
    found = dict(zip(ids.tolist(), values.tolist(), strict=True))
    missing = [int(c) for c in candidates if int(c) not in found]
    if missing:
        raise RuntimeError(f"vLLM returned no log-probability for tokens {missing[:5]}")
    return np.array([found[int(c)] for c in candidates], dtype=np.float32)
