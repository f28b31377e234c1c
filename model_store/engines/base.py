"""What every engine shares: prompt embeddings, the input-embedding table, row bookkeeping.

Engines fed with prompt embeddings (in-process vLLM, remote vLLM) build each row's input
from the prompt's embeddings and the row's SID tokens; the torch engine feeds the same
embeddings to its model. One function builds them (:func:`prompt_embeddings`), so every
engine gives the model bit-identical inputs. Only `torch` and `safetensors` are imported
here: a gateway with a remote engine loads neither vLLM nor transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import torch
from safetensors import safe_open

from model_store.generation import Prompt, Session

EMBED_KEY = "model.embed_tokens.weight"
"""Name of the input-embedding matrix in a Qwen2 (and most HF decoder) checkpoint."""

MAX_LOGPROB_TOKEN_IDS = 128
"""vLLM's cap on `SamplingParams.logprob_token_ids`; rows with more are split in requests."""


def prompt_embeddings(prompt: Prompt, table: torch.Tensor) -> torch.Tensor:
    """(len, hidden) input embeddings of `prompt`: token rows, soft rows at the placeholders.

    One function for every engine, so that they all feed the model bit-identical inputs.
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


Row = tuple[torch.Tensor, torch.Tensor]
"""A row's input embeddings: its prompt's (the same tensor for every row of one prompt),
then its own SID tokens' (none at the first level)."""


def embeddings(row: Row) -> torch.Tensor:
    """A row's whole input, its prompt and then its own tokens."""
    prompt, own = row
    return torch.cat([prompt, own]) if len(own) else prompt


class EngineError(RuntimeError):
    """The server could not give scores: unreachable, timed out, HTTP error or bad reply.

    One type so the gateway can catch every remote failure in one place and degrade.
    """


class BaseEngine:
    """What every engine does besides scoring: warm up, say whether it is ready, close
    (also as a context manager)."""

    def open(self, prompts: Sequence[Prompt]) -> Session:
        raise NotImplementedError

    def score_sessions(
        self, asks: Sequence[tuple[Session, Sequence[np.ndarray]]]
    ) -> list[list[np.ndarray]]:
        """Each session's rows in turn; engines with a fixed cost per call batch them."""
        return [session.logprobs(candidates) for session, candidates in asks]

    def warm(self) -> None:
        """Makes the first real search fast; nothing by default."""

    def ready(self) -> bool:
        """Whether the engine answers now; engines without a remote part always do."""
        return True

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


class EmbeddingEngine(BaseEngine):
    """What engines fed with prompt embeddings share: the model's input-embedding table
    (`self.table`), the prompts' embeddings, and a warm-up request."""

    table: torch.Tensor

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

    def _row_inputs(self) -> Callable[[int], Row]:
        """Row r's input: its prompt's embeddings, then its SID tokens' embeddings."""
        suffix = self._table[torch.from_numpy(self._tokens)]  # (rows, level, hidden)
        return lambda r: (self._prompts[self._owner[r]], suffix[r])

    def extend(self, parents: np.ndarray, tokens: np.ndarray) -> None:
        parents = np.asarray(parents, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        if parents.shape != tokens.shape or parents.ndim != 1:
            raise ValueError("parents and tokens must be 1-d and of equal length")
        self._owner = self._owner[parents]
        self._tokens = np.concatenate([self._tokens[parents], tokens[:, None]], axis=1)


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
