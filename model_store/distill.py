"""Distilling the user model into the LLM's Semantic-ID levels.

The LLM learns each next item from one hard label, and reads the user's long-term taste
only through one soft token. The user model (the soft token's source) knows a whole
distribution over next items. This module turns that distribution into a target per SID
level: at the position that writes level l of item t, the teacher's item probabilities
restricted to items sharing t's first l codes and summed per level-l code; the LLM's
distribution over the level's tokens is pulled towards it (KL divergence). The soft token
then has a reason to carry what the user model knows, and every level learns which
siblings are near misses rather than plain errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from model_store.vocab import TokenLayout


@dataclass(frozen=True)
class Teacher:
    """The user model's next-item scorer, from the vectors the bundle exports: `retrieval`
    rows are [item vector, bias × temperature] (`user_model.retrieval_vectors`), and the
    training logits are state · vector / temperature + bias."""

    retrieval: np.ndarray  # (n_items, dim + 1)
    temperature: float

    def probs(self, states: torch.Tensor) -> torch.Tensor:
        """(n, n_items) next-item probabilities after each state."""
        retrieval = torch.from_numpy(np.asarray(self.retrieval, dtype=np.float32))
        logits = (states @ retrieval[:, :-1].T + retrieval[:, -1]) / self.temperature
        return torch.softmax(logits, dim=-1)


class LevelTargets:
    """Per SID level, the teacher's distribution over the level's codes given the true
    prefix, and the LLM's matching log-probabilities."""

    def __init__(self, teacher: Teacher, codes: np.ndarray, layout: TokenLayout) -> None:
        self.levels = codes.shape[1]
        self.teacher = teacher
        sizes = codes.max(axis=0) + 1
        self.offsets = [int(o) for o in layout.level_offsets]
        self.sizes = [int(s) for s in sizes]
        # prefix[l][i]: a key equal for items whose first l codes agree (level 0: all equal).
        keys = np.zeros(len(codes), dtype=np.int64)
        self.prefix, self.members = [], []
        for level in range(self.levels):
            self.prefix.append(torch.from_numpy(keys.copy()))
            member = np.zeros((len(codes), self.sizes[level]), dtype=np.float32)
            member[np.arange(len(codes)), codes[:, level]] = 1.0
            self.members.append(torch.from_numpy(member))
            keys = keys * int(sizes[level]) + codes[:, level]

    @classmethod
    def from_sid_ids(
        cls, teacher: Teacher, item_sid_ids: np.ndarray, layout: TokenLayout
    ) -> LevelTargets:
        """From the (n_items, L) SID token table, as the LLM's training data holds it."""
        codes = [
            layout.code(level, item_sid_ids[:, level]) for level in range(item_sid_ids.shape[1])
        ]
        return cls(teacher, np.stack(codes, axis=1), layout)

    @torch.no_grad()
    def targets(self, states: torch.Tensor, items: torch.Tensor) -> list[torch.Tensor]:
        """Per level, (n, size) code distributions for next items `items` after `states`."""
        probs = self.teacher.probs(states)
        out = []
        for level in range(self.levels):
            same = self.prefix[level][None, :] == self.prefix[level][items][:, None]
            mass = (probs * same) @ self.members[level]
            out.append(mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-12))
        return out

    def loss(
        self,
        logits: torch.Tensor,
        positions: torch.Tensor,
        states: torch.Tensor,
        items: torch.Tensor,
    ) -> torch.Tensor:
        """Mean KL(teacher ‖ LLM) over levels and items. `positions[n, l]` = (row, index)
        of the logits that write level l of item n (flattened: row × length + index)."""
        flat = logits.reshape(-1, logits.shape[-1])
        total = logits.new_zeros(())
        for level, target in enumerate(self.targets(states, items)):
            start = self.offsets[level]
            rows = flat[positions[:, level], start : start + self.sizes[level]]
            student = F.log_softmax(rows.float(), dim=-1)
            total = total + F.kl_div(student, target, reduction="batchmean")
        return total / self.levels
