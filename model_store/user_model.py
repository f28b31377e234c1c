"""User model: a causal transformer over item sequences (SASRec-like).

Trained with a full softmax over cosine similarities, so user states and item vectors are
L2-normalised into one space: a user is comparable (and plottable) with items by dot
product. Its user states become the daily user embeddings in Redis and the soft token's
input; its item vectors feed the Semantic IDs and the ANN fallback.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from model_store.progress import progress_bar


@dataclass(frozen=True)
class UserModelConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.5
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 0.05
    seed: int = 0


class UserModel(nn.Module):
    """Item sequence → one L2-normalised state per position (index 0 is padding)."""

    def __init__(self, n_items: int, cfg: UserModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 2 * cfg.dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        # A per-item prior (popularity) kept apart from the direction, so vectors stay unit-length.
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        # Same small scale for items and positions, so neither drowns the other at the input.
        nn.init.normal_(self.item.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, padded: torch.Tensor) -> torch.Tensor:
        """`padded`: (batch, max_len) item index + 1, left-padded with 0."""
        length = padded.shape[1]
        positions = torch.arange(length, device=padded.device)
        x = self.item(padded) + self.position(positions)[None]
        h = self.encoder(x, mask=self._attention_mask(padded))
        return F.normalize(self.norm(h), dim=-1)

    def _attention_mask(self, padded: torch.Tensor) -> torch.Tensor:
        """Causal and padding mask in one, (batch * heads, L, L) additive.

        Every position may attend to itself, so no row is fully masked: a fully masked
        padding row gives NaN in inference mode, which then leaks into real positions.
        """
        length = padded.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        real_key = (padded != 0)[:, None, :]
        allowed = (causal[None] & real_key) | torch.eye(length, dtype=torch.bool)[None]
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        return additive.repeat_interleave(self.cfg.heads, dim=0)

    def item_vectors(self) -> torch.Tensor:
        return F.normalize(self.item.weight[1:], dim=-1)

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """Next-item logits: cosine / temperature plus the item prior."""
        return states @ self.item_vectors().T / self.cfg.temperature + self.item_bias


def _left_pad(windows: Sequence[np.ndarray], length: int) -> torch.Tensor:
    out = np.zeros((len(windows), length), dtype=np.int64)
    for row, w in enumerate(windows):
        w = w[-length:]
        if len(w):
            out[row, length - len(w) :] = w + 1
    return torch.from_numpy(out)


def _training_windows(train: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of max_len + 1 items from each sequence's end backwards."""
    windows = []
    for seq in train:
        end = len(seq)
        while end >= 2:
            windows.append(seq[max(0, end - max_len - 1) : end])
            end -= max_len
    return windows


def train_user_model(
    train: Sequence[np.ndarray], n_items: int, cfg: UserModelConfig, show_progress: bool = True
) -> UserModel:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = UserModel(n_items, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    windows = _training_windows(train, cfg.max_len)
    bar = progress_bar(cfg.epochs, "user model", show_progress)
    for _ in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(windows))
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            batch = [windows[i] for i in order[start : start + cfg.batch_size]]
            inputs = _left_pad([w[:-1] for w in batch], cfg.max_len)
            targets = _left_pad([w[1:] for w in batch], cfg.max_len) - 1
            states = model(inputs)
            logits = model.scores(states)
            mask = targets >= 0
            loss = F.cross_entropy(logits[mask], targets[mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        bar.advance(loss=total / max(1, len(windows)))
    bar.close()
    model.eval()
    return model


@torch.inference_mode()
def user_states(model: UserModel, histories: Sequence[np.ndarray], batch: int = 1024) -> np.ndarray:
    """The normalised state after each history (zeros for an empty history)."""
    out = np.zeros((len(histories), model.cfg.dim), dtype=np.float32)
    for start in range(0, len(histories), batch):
        chunk = histories[start : start + batch]
        states = model(_left_pad(chunk, model.cfg.max_len))[:, -1].numpy()
        empty = np.array([len(h) == 0 for h in chunk])
        states[empty] = 0.0
        out[start : start + len(chunk)] = states
    return out


@torch.inference_mode()
def item_vectors(model: UserModel) -> np.ndarray:
    return model.item_vectors().numpy().astype(np.float32)


@torch.inference_mode()
def retrieval_vectors(model: UserModel) -> np.ndarray:
    """Item vectors with the prior (bias × temperature) as one more column: the query
    `retrieval_query(user)` scores the training logits (user · vector / temperature + bias)
    times the temperature by inner product, the same ranking."""
    bias = model.item_bias.detach().numpy()[:, None] * model.cfg.temperature
    return np.concatenate([item_vectors(model), bias], axis=1).astype(np.float32)


def retrieval_query(user: np.ndarray) -> np.ndarray:
    """[user, 1]: the prior column counts once (see `retrieval_vectors`)."""
    return np.append(np.asarray(user, dtype=np.float32), np.float32(1.0))


def save_user_model(model: UserModel, directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(directory / "user_model.safetensors"))
    config = {"n_items": model.n_items, **asdict(model.cfg)}
    (directory / "user_model.json").write_text(json.dumps(config, indent=2))
    return ["user_model.safetensors", "user_model.json"]


def load_user_model(directory: Path) -> UserModel:
    config = json.loads((directory / "user_model.json").read_text())
    n_items = config.pop("n_items")
    model = UserModel(n_items, UserModelConfig(**config))
    model.load_state_dict(load_file(str(directory / "user_model.safetensors")))
    model.eval()
    return model
