"""The projector: a user embedding → soft-token rows in the LLM's hidden size.

Trained jointly with the LLM (`llm.train_llm`), run per request online; it needs torch
only, so a gateway that talks to a remote engine never loads transformers for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model_store.prompts import SOFT_AT_ABSENT, checked_soft_at


class Projector(nn.Module):
    """User embedding → n soft-token embeddings in the LLM's hidden size, and where the
    prompts the LLM was trained on place them (`soft_at`, see `model_store.prompts`)."""

    def __init__(self, user_dim: int, hidden: int, n_soft: int, soft_at: str = "head") -> None:
        super().__init__()
        self.user_dim, self.hidden, self.n_soft = user_dim, hidden, n_soft
        self.soft_at = checked_soft_at(soft_at)
        self.net = nn.Sequential(
            nn.Linear(user_dim, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden * n_soft)
        )

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        return self.net(user).reshape(*user.shape[:-1], self.n_soft, self.hidden)

    def project(self, user: np.ndarray) -> np.ndarray:
        """Numpy in, numpy out: (user_dim,) → (n_soft, hidden); used per request online."""
        with torch.inference_mode():
            return self(torch.from_numpy(np.asarray(user, dtype=np.float32))).numpy()


def save_projector(projector: Projector, directory: Path) -> list[str]:
    save_file(projector.state_dict(), str(directory / "projector.safetensors"))
    meta = {
        "user_dim": projector.user_dim,
        "hidden": projector.hidden,
        "n_soft": projector.n_soft,
        "soft_at": projector.soft_at,
    }
    (directory / "projector.json").write_text(json.dumps(meta))
    return ["projector.safetensors", "projector.json"]


def load_projector(directory: Path) -> Projector:
    meta = json.loads((directory / "projector.json").read_text())
    soft_at = meta.get("soft_at", SOFT_AT_ABSENT)
    projector = Projector(meta["user_dim"], meta["hidden"], meta["n_soft"], soft_at)
    projector.load_state_dict(load_file(str(directory / "projector.safetensors")))
    projector.eval()
    return projector
