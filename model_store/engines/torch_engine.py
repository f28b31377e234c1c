"""The torch engine: plain PyTorch over a Hugging Face causal LM and its KV cache.

One batched prefill per search and one single-token step per level on a KV cache whose rows
follow the beams. It is exact and has no start-up cost, which is what the offline evaluation
wants when it searches thousands of prompts; the parity tests hold vLLM to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from model_store.engines.base import BaseEngine, prompt_embeddings
from model_store.generation import Prompt


class TorchEngine(BaseEngine):
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
