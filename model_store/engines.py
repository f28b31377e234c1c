"""Next-token scoring engines for the SID-constrained beam search in `generation.py`.

Two implementations of :class:`~model_store.generation.Engine`, numerically interchangeable:

* :class:`TorchEngine`: plain PyTorch over a Hugging Face causal LM, one batched prefill per
  search and one single-token step per level on a KV cache whose rows follow the beams. It
  is exact and has no start-up cost, which is what the offline evaluation wants when it
  searches thousands of prompts.
* :class:`VLLMEngine`: a ``vllm.LLM`` held by the caller. Every live row becomes one
  ``prompt_embeds`` request that generates a single token and returns the log-probabilities
  of that row's candidates only, all rows of a level in one ``generate`` call. Prefix
  caching serves the full 32-token blocks that rows share (the prompt's, for every beam of
  it), so a row recomputes only its last partial block. This is the serving path.

Both build the prompt's input embeddings the same way (:func:`prompt_embeddings`): the token
embeddings with the placeholder positions replaced by the prompt's soft rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, cast

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from model_store.generation import (
    Beam,
    Engine,
    Prompt,
    SearchStats,
    Session,
    TokenLayout,
    beam_search,
)

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

    from model_store.trie import SIDTrie

EMBED_KEY = "model.embed_tokens.weight"
"""Name of the input-embedding matrix in a Qwen2 (and most HF decoder) checkpoint."""

MAX_LOGPROB_TOKEN_IDS = 128
"""vLLM's cap on `SamplingParams.logprob_token_ids`; rows with more are split in requests."""


def prompt_embeddings(prompt: Prompt, table: torch.Tensor) -> torch.Tensor:
    """(len, hidden) input embeddings of `prompt`: token rows, soft rows at the placeholders.

    One function for both engines so that they feed the model bit-identical inputs.
    """
    if not prompt.token_ids:
        raise ValueError("a prompt needs at least one token")
    ids = torch.tensor(prompt.token_ids, dtype=torch.long)
    if prompt.soft is None:
        if int(ids.min()) < 0:
            raise ValueError("prompt holds placeholder positions but no soft rows")
        return table[ids]
    positions = torch.tensor(prompt.soft_positions(), dtype=torch.long)
    soft = torch.as_tensor(np.asarray(prompt.soft)).to(table.dtype)
    if soft.ndim != 2 or soft.shape != (len(positions), table.shape[1]):
        raise ValueError(
            f"soft has shape {tuple(soft.shape)}, expected ({len(positions)}, {table.shape[1]})"
        )
    out = table[ids.clamp(min=0)]
    out[positions] = soft
    return out


class ClosingEngine:
    """Engines are context managers that `close()` on exit."""

    def close(self) -> None:
        """Releases what the engine holds; nothing by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddingEngine(ClosingEngine):
    """What engines fed with prompt embeddings share: the model's input-embedding table
    (`self.table`), the prompts' embeddings, and a warm-up request."""

    table: torch.Tensor

    def open(self, prompts: Sequence[Prompt]) -> Session:
        raise NotImplementedError

    def embed(self, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        if not prompts:
            raise ValueError("no prompts")
        return [prompt_embeddings(p, self.table) for p in prompts]

    def warm(self) -> None:
        """One tiny prompt-embeds request, so the first real search is not the slow one."""
        vocab = int(self.table.shape[0])
        self.open([Prompt(tuple(range(min(4, vocab))))]).logprobs([np.arange(min(2, vocab))])


class EmbeddingRows:
    """Live rows of one search as (prompt embeddings, SID tokens so far): engines that take
    prompt embeddings rebuild each row's input from these, so `extend` is bookkeeping only."""

    def __init__(self, table: torch.Tensor, prompts: list[torch.Tensor]) -> None:
        self._table = table
        self._prompts = prompts
        self._owner = np.arange(len(prompts))
        self._tokens = np.zeros((len(prompts), 0), dtype=np.int64)

    @property
    def rows(self) -> int:
        return len(self._owner)

    def _checked(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(candidates) != self.rows:
            raise ValueError(f"{len(candidates)} candidate lists for {self.rows} rows")
        return [np.asarray(c, dtype=np.int64) for c in candidates]

    def _row_embeddings(self) -> Callable[[int], torch.Tensor]:
        """Row r's input: its prompt's embeddings, then its SID tokens' embeddings."""
        suffix = self._table[torch.from_numpy(self._tokens)]  # (rows, level, hidden)
        return lambda r: torch.cat([self._prompts[self._owner[r]], suffix[r]])

    def extend(self, parents: np.ndarray, tokens: np.ndarray) -> None:
        parents = np.asarray(parents, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        if parents.shape != tokens.shape or parents.ndim != 1:
            raise ValueError("parents and tokens must be 1-d and of equal length")
        self._owner = self._owner[parents]
        self._tokens = np.concatenate([self._tokens[parents], tokens[:, None]], axis=1)


# ---------------------------------------------------------------------------- PyTorch


class TorchEngine(ClosingEngine):
    """Exact batched scoring with a Hugging Face causal LM and its KV cache."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        weight = model.get_input_embeddings().weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError("the model's input embedding has no weight matrix")
        self.table = weight.detach()

    @classmethod
    def from_dir(cls, path: str | Path, attn_implementation: str = "sdpa") -> TorchEngine:
        """Loads a `save_pretrained` directory in float32, the precision vLLM serves it in."""
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=attn_implementation
        )
        return cls(model)

    def open(self, prompts: Sequence[Prompt]) -> TorchSession:
        return TorchSession(self.model, self.table, prompts)


class TorchSession:
    """One search's KV cache; row r of the cache is live row r of the search.

    Prompts are left-padded so every row's last position is the last column, which lets a
    level be one forward of one token per row. Position ids count real tokens only, so a
    padded row sees exactly the positions it would see alone.
    """

    def __init__(
        self, model: PreTrainedModel, table: torch.Tensor, prompts: Sequence[Prompt]
    ) -> None:
        if not prompts:
            raise ValueError("no prompts")
        self._model = model
        self._table = table
        with torch.inference_mode():
            embeds = [prompt_embeddings(p, table) for p in prompts]
            lengths = torch.tensor([len(e) for e in embeds], dtype=torch.long)
            width = int(lengths.max())
            batch = table.new_zeros((len(embeds), width, table.shape[1]))
            mask = torch.zeros((len(embeds), width), dtype=torch.long)
            for i, e in enumerate(embeds):
                batch[i, width - len(e) :] = e
                mask[i, width - len(e) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self._cache = DynamicCache(config=model.config)
            self._mask = mask
            self._next_position = lengths
            self._forward(batch, positions)

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """Runs the new columns through the model and keeps the last position's scores."""
        out = self._model(
            inputs_embeds=embeds,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._logits = out.logits[:, -1].float()
        self._log_norm = torch.logsumexp(self._logits, dim=-1)

    @property
    def rows(self) -> int:
        return int(self._logits.shape[0])

    def logprobs(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(candidates) != self.rows:
            raise ValueError(f"{len(candidates)} candidate lists for {self.rows} rows")
        sizes = np.array([len(c) for c in candidates], dtype=np.int64)
        if sizes.sum() == 0:
            return [np.zeros(0, dtype=np.float32) for _ in candidates]
        flat = torch.from_numpy(np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates]))
        row = torch.repeat_interleave(torch.arange(self.rows), torch.from_numpy(sizes))
        with torch.inference_mode():
            values = (self._logits[row, flat] - self._log_norm[row]).numpy()
        return np.split(values, np.cumsum(sizes)[:-1])

    def extend(self, parents: np.ndarray, tokens: np.ndarray) -> None:
        index = torch.from_numpy(np.asarray(parents, dtype=np.int64))
        new = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        if index.shape != new.shape or index.ndim != 1:
            raise ValueError("parents and tokens must be 1-d and of equal length")
        with torch.inference_mode():
            self._cache.reorder_cache(cast(torch.LongTensor, index))
            ones = torch.ones((len(index), 1), dtype=self._mask.dtype)
            self._mask = torch.cat([self._mask[index], ones], dim=1)
            positions = self._next_position[index]
            self._next_position = positions + 1
            self._forward(self._table[new][:, None], positions[:, None])


def search_in_chunks(
    engine: Engine,
    prompts: Sequence[Prompt],
    trie: SIDTrie,
    layout: TokenLayout,
    beam_width: int,
    chunk: int = 256,
    stats: SearchStats | None = None,
) -> list[list[Beam]]:
    """`beam_search` over `chunk` prompts at a time: bounds the KV cache (chunk × beam rows)."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    results: list[list[Beam]] = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        results.extend(beam_search(engine, part, trie, layout, beam_width, stats))
    return results


# ---------------------------------------------------------------------------- vLLM


def load_input_embeddings(model_dir: str | Path) -> torch.Tensor:
    """The (vocab, hidden) input-embedding matrix, read straight from the safetensors files.

    vLLM takes prompt embeddings, not token ids, for prompts with soft rows, so the engine
    builds them itself without loading the rest of the model a second time.
    """
    directory = Path(model_dir)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        filename = json.loads(index.read_text())["weight_map"][EMBED_KEY]
    else:
        filename = "model.safetensors"
    with safe_open(str(directory / filename), framework="pt") as f:
        table: torch.Tensor = f.get_tensor(EMBED_KEY)
    return table.float()


class VLLMEngine(EmbeddingEngine):
    """A ``vllm.LLM`` scoring each live row as one single-token request.

    `**llm_kwargs` go to ``vllm.LLM`` and override the defaults set here. `kv_cache_gib`
    bounds the KV cache (prefix-cache hits included): a small model needs ~2 KiB a token.
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
        **llm_kwargs: Any,
    ) -> None:
        from vllm import LLM

        options: dict[str, Any] = {
            "enable_prompt_embeds": True,
            "enable_prefix_caching": True,
            # Without this a generation_config.json could slip top_k/top_p defaults in.
            "generation_config": "vllm",
            # The default, pinned: log-softmax of the unprocessed logits over the whole vocabulary.
            "logprobs_mode": "raw_logprobs",
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
        self.llm: LLM | None = LLM(model=str(self.model_dir), **options)
        if warmup:
            self.warm()

    def ready(self) -> bool:
        """In-process: ready while not closed."""
        return self.llm is not None

    def _require_llm(self) -> LLM:
        if self.llm is None:
            raise RuntimeError("the engine is closed")
        return self.llm

    def open(self, prompts: Sequence[Prompt]) -> VLLMSession:
        return VLLMSession(self._require_llm(), self.table, self.embed(prompts))

    def close(self) -> None:
        """Shuts the engine core down (and its worker processes when multiprocessing)."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        llm.llm_engine.engine_core.shutdown()
        del llm


def _sampling_params(candidates: np.ndarray) -> SamplingParams:
    """Greedy single-token request reporting the raw log-probs of `candidates` (≤ 128)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprob_token_ids=[int(c) for c in candidates],
        detokenize=False,
        flat_logprobs=True,  # a few flat lists per request instead of one object per token
        skip_clone=True,
    )


class VLLMSession(EmbeddingRows):
    """A search's rows, each scored as vLLM requests over its prompt embeddings."""

    def __init__(self, llm: LLM, table: torch.Tensor, prompts: list[torch.Tensor]) -> None:
        super().__init__(table, prompts)
        self._llm = llm

    def logprobs(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One `generate` call for all rows; a row with more candidates than vLLM's cap of 128
        `logprob_token_ids` becomes several requests over the same embeddings.

        (A request with `logprobs=-1` cannot share the call: when any request in a batch sets
        `logprob_token_ids`, vLLM 0.32's sampler returns those for every request.)
        """
        wanted = self._checked(candidates)
        row_embeddings = self._row_embeddings()
        requests: list[Any] = []
        params: list[SamplingParams] = []
        pieces: list[tuple[int, np.ndarray]] = []  # (row, candidate ids) of each request
        for r, cands in enumerate(wanted):
            if not len(cands):
                continue
            embeds = row_embeddings(r)
            for start in range(0, len(cands), MAX_LOGPROB_TOKEN_IDS):
                piece = cands[start : start + MAX_LOGPROB_TOKEN_IDS]
                requests.append({"prompt_embeds": embeds})
                params.append(_sampling_params(piece))
                pieces.append((r, piece))
        parts: list[list[np.ndarray]] = [[] for _ in wanted]
        if requests:
            outputs = self._llm.generate(requests, params, use_tqdm=False)
            for (r, piece), output in zip(pieces, outputs, strict=True):
                parts[r].append(_candidate_logprobs(output.outputs[0].logprobs, piece))
        return [np.concatenate(p) if p else np.zeros(0, dtype=np.float32) for p in parts]


def _candidate_logprobs(logprobs: Any, candidates: np.ndarray) -> np.ndarray:
    """Candidates' log-probs from the first generated position of a vLLM output.

    With `logprob_token_ids` the entries are [sampled token, *candidates in request order];
    anything else is matched by token id.
    """
    if logprobs is None or len(logprobs) == 0:
        raise RuntimeError("vLLM returned no log-probabilities")
    start, end = logprobs.start_indices[0], logprobs.end_indices[0]
    ids = np.asarray(logprobs.token_ids[start:end], dtype=np.int64)
    values = np.asarray(logprobs.logprobs[start:end], dtype=np.float32)
    if len(ids) == len(candidates) + 1 and np.array_equal(ids[1:], candidates):
        return values[1:]
    found = dict(zip(ids.tolist(), values.tolist(), strict=True))
    missing = [int(c) for c in candidates if int(c) not in found]
    if missing:
        raise RuntimeError(f"vLLM returned no log-probability for tokens {missing[:5]}")
    return np.array([found[int(c)] for c in candidates], dtype=np.float32)


# ---------------------------------------------------------------------------- selection


@contextmanager
def open_engine(
    kind: Literal["torch", "vllm"] | str, model_dir: str | Path, **kwargs: Any
) -> Iterator[TorchEngine | VLLMEngine]:
    """The engine of `kind` over `model_dir`, shut down on exit.

    With vLLM the engine core runs in a separate, spawned process unless the environment
    sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process: starts ~3x faster); a script that
    keeps the default must guard its entry point with ``if __name__ == "__main__":``.
    """
    engine: TorchEngine | VLLMEngine
    if kind == "torch":
        engine = TorchEngine.from_dir(model_dir, **kwargs)
    elif kind == "vllm":
        engine = VLLMEngine(model_dir, **kwargs)
    else:
        raise ValueError(f"unknown engine {kind!r}: expected 'torch' or 'vllm'")
    try:
        yield engine
    finally:
        engine.close()
