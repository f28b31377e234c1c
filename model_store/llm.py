"""The generative LLM (Qwen2 architecture, HF format) and its soft-token projector.

Trained jointly on packed windows of each user's items (see `prompts.py` for the layout):
the loss falls on the Semantic-ID tokens only. A window's soft token is a user-model state
of that user: at `soft_at="head"` the state *before* the window, a long-term embedding
that lags the recent items written after it; at `soft_at="now"` the state after a random
number of the window's items, written at that point of the window, so the items before
it are learnt without it and those after it with a state that is fresh for the first and
older for each one after (as a daily embedding is for the events of the day). Soft token,
context and synthesised words are dropped at random so one model serves every ablation
mode.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from model_store.distill import LevelTargets, Teacher
from model_store.progress import progress_bar
from model_store.projector import Projector
from model_store.prompts import SOFT_AT_ABSENT, checked_soft_at, prompt_ids
from model_store.vocab import BOS, EOS, PAD, USER, Vocab

CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class LLMConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 512
    n_soft: int = 1
    window: int = 21  # items per training window (history of up to window - 1 items)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    p_drop_soft: float = 0.3
    p_drop_context: float = 0.3
    p_ask: float = 0.2
    p_less: float = 0.1  # also name a genre absent from the window's later items
    bf16: bool = False  # autocast the forward pass to bfloat16 (fp32 master weights)
    distill: float = 0.0  # weight of the user model's per-level targets (`distill.py`): off,
    # as on the test split it lowered the served pipeline (BENCHMARKS.md)
    # where the soft token stands (prompts.SOFT_AT); "now" lowered the LLM's own rankings on
    # the test split with served unchanged (BENCHMARKS.md), so "head" stays
    soft_at: str = field(default="head", metadata={"absent": SOFT_AT_ABSENT})
    # SID token embeddings start as a random projection of the RQ codebooks ("codebooks":
    # soft and soft+prompt gained HR@30 on the test split, served unchanged; BENCHMARKS.md)
    # or at random, as bundles built before this field were
    sid_init: str = field(default="codebooks", metadata={"absent": "random"})
    seed: int = 0

    def __post_init__(self) -> None:
        checked_soft_at(self.soft_at)
        if self.sid_init not in SID_INITS:
            raise ValueError(f"sid_init must be one of {SID_INITS}, got {self.sid_init!r}")


SID_INITS = ("random", "codebooks")


def init_sid_embeddings(
    model: PreTrainedModel, vocab: Vocab, codebooks: np.ndarray, seed: int
) -> None:
    """Each level's SID tokens start as its RQ codebook under one random projection to the
    hidden size (distances kept, Johnson-Lindenstrauss), scaled to the embedding's own
    spread: codes near each other in the items' space start near each other (the LM head
    is tied, so they also start scored alike). The uniqueness level has no codebook."""
    table = model.get_input_embeddings().weight
    if not isinstance(table, torch.Tensor):
        raise TypeError("the model's input embedding has no weight matrix")
    hidden = int(table.shape[1])
    rng = np.random.default_rng(seed)
    projection = rng.normal(0.0, 1.0, (codebooks.shape[2], hidden)) / np.sqrt(hidden)
    with torch.no_grad():
        spread = float(table.std())
        for level, book in enumerate(codebooks):
            rows = book @ projection
            rows *= spread / max(float(rows.std()), 1e-12)
            tokens = torch.from_numpy(vocab.layout.token(level, np.arange(len(book))))
            table[tokens] = torch.as_tensor(rows, dtype=table.dtype)


def new_model(vocab: Vocab, cfg: LLMConfig) -> Qwen2ForCausalLM:
    if cfg.hidden % cfg.heads or cfg.hidden // cfg.heads not in CPU_ATTENTION_HEAD_DIMS:
        raise ValueError(f"head_dim {cfg.hidden / cfg.heads} is not one vLLM's CPU attention runs")
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=vocab.id(BOS),
        eos_token_id=vocab.id(EOS),
        pad_token_id=vocab.id(PAD),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
    )
    config._attn_implementation = "eager"  # several times faster than sdpa to train on CPU
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config)


class BaseModelError(ValueError):
    """A `--base-model` that is not a causal LM this project can extend and serve."""


def check_base_model(base_dir: Path) -> None:
    """Reads the base model's config only (a fraction of a second): the build calls it
    first, so a wrong `--base-model` fails before its first stage, not after minutes."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    if not (base_dir / "config.json").is_file():
        raise BaseModelError(f"{base_dir}: not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(base_dir))
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"{base_dir}: {e}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise BaseModelError(f"{base_dir}: a {config.model_type} model is no causal LM")
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    if head_dim not in CPU_ATTENTION_HEAD_DIMS:
        raise BaseModelError(
            f"{base_dir}: head_dim {head_dim} is not one vLLM's CPU attention runs"
        )


def extend_base_model(base_dir: Path, vocab: Vocab) -> tuple[PreTrainedModel, Vocab, object]:
    """Load a pretrained causal LM and append our words and SID tokens to its vocabulary.

    Returns the model, the extended vocabulary (base tokens first, SID tokens last and
    contiguous) and the base tokenizer with the new tokens added, for saving.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_vocab = tokenizer.get_vocab()
    base_tokens = [t for t, _ in sorted(base_vocab.items(), key=lambda kv: kv[1])]
    sid_start = vocab.sid_start
    new_words = [t for t in vocab.tokens[:sid_start] if t not in base_vocab]
    sids = list(vocab.tokens[sid_start:])
    tokenizer.add_tokens(new_words + sids)
    extended = Vocab(
        (*base_tokens, *new_words, *sids), vocab.level_sizes, len(base_tokens) + len(new_words)
    )
    rows = int(model.config.vocab_size)
    if rows < len(extended):
        model.resize_token_embeddings(len(extended))
    return model, extended, tokenizer


@dataclass
class TrainingData:
    """Everything the trainer reads, all indexed by user."""

    train: Sequence[np.ndarray]  # per-user item indices in time order
    states: Sequence[np.ndarray]  # per-user (len(train), dim): user state after items [0..p)
    context: Sequence[list[str]]  # per-user context words
    item_sid_ids: np.ndarray  # (n_items, L) SID token ids
    item_genres: Sequence[Sequence[str]]
    teacher: Teacher | None = None  # the user model, for `LLMConfig.distill`

    @cached_property
    def all_genres(self) -> set[str]:
        return {g for gs in self.item_genres for g in gs}


@dataclass(frozen=True)
class Example:
    """One training window: prompt + items as tokens, labels on the items' SID tokens."""

    ids: list[int]
    labels: list[int]
    soft: np.ndarray | None  # the soft token's user state (None: soft token dropped)
    item_starts: np.ndarray  # the position of each window item's first SID token
    items: np.ndarray  # the window's items
    states: np.ndarray  # the user state before each of them (the distillation teacher's)


def _window_example(
    vocab: Vocab,
    data: TrainingData,
    cfg: LLMConfig,
    user: int,
    start: int,
    rng: np.random.Generator,
) -> Example:
    items = data.train[user][start : start + cfg.window]
    point = _soft_point(cfg, start, len(items), rng)
    n_soft = cfg.n_soft if point is not None else 0
    keep_context = rng.random() >= cfg.p_drop_context
    ask: list[str] = []
    less: list[str] = []
    later = Counter(g for i in items[len(items) // 2 :] for g in data.item_genres[int(i)])
    if later and rng.random() < cfg.p_ask:
        ask = [later.most_common(1)[0][0]]
    if rng.random() < cfg.p_less:
        absent = sorted(data.all_genres - set(later))
        if absent:
            less = [absent[int(rng.integers(len(absent)))]]
    ids = prompt_ids(
        vocab,
        data.item_sid_ids,
        items,
        n_soft=n_soft,
        context=data.context[user] if keep_context else None,
        ask=ask,
        less=less,
        soft_at=cfg.soft_at,
        newer=len(items) - (point or 0),
    )
    levels = data.item_sid_ids.shape[1]
    among = n_soft if cfg.soft_at == "now" else 0  # soft tokens written among the items
    item_starts = len(ids) - among - levels * len(items) + levels * np.arange(len(items))
    item_starts[point or 0 :] += among
    labels = [-100] * len(ids)
    for s in item_starts:
        labels[s : s + levels] = ids[s : s + levels]
    soft = data.states[user][start + point] if point is not None else None
    states = data.states[user][start : start + len(items)]
    return Example(ids, labels, soft, item_starts, items, states)


def _soft_point(cfg: LLMConfig, start: int, n_items: int, rng: np.random.Generator) -> int | None:
    """After how many of the window's items the soft token's state is taken (None: the
    soft token is dropped). A state needs an item before it: none before a user's first."""
    if cfg.soft_at == "head":
        return 0 if start > 0 and rng.random() >= cfg.p_drop_soft else None
    earliest = 1 if start == 0 else 0
    if n_items <= earliest or rng.random() < cfg.p_drop_soft:
        return None
    return int(rng.integers(earliest, n_items))


def _epoch_examples(
    vocab: Vocab, data: TrainingData, cfg: LLMConfig, rng: np.random.Generator
) -> list[Example]:
    examples = []
    for user, seq in enumerate(data.train):
        if len(seq) == 0:
            continue
        offset = int(rng.integers(0, cfg.window)) if len(seq) > cfg.window else 0
        for start in range(-offset, len(seq), cfg.window):
            examples.append(_window_example(vocab, data, cfg, user, max(0, start), rng))
    return examples


def _batch_tensors(
    batch: Sequence[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    length = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.ids)] = 1
    softs = [e.soft for e in batch if e.soft is not None]
    users = torch.from_numpy(np.stack(softs)) if softs else None
    return ids, labels, mask, users


def _distill_inputs(
    batch: Sequence[Example], length: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, states, items) for `LevelTargets.loss`: the flat index of the logits
    that write each level of each window item (the token before it), its state, its id."""
    positions = [
        row * length + start + np.arange(levels) - 1
        for row, e in enumerate(batch)
        for start in e.item_starts
    ]
    states = np.concatenate([e.states for e in batch])
    items = np.concatenate([e.items for e in batch])
    return (
        torch.from_numpy(np.stack(positions).astype(np.int64)),
        torch.from_numpy(np.asarray(states, dtype=np.float32)),
        torch.from_numpy(items.astype(np.int64)),
    )


def embed_with_soft(
    model: PreTrainedModel, ids: torch.Tensor, soft: torch.Tensor | None, user_id: int
) -> torch.Tensor:
    """Token embeddings with the `<user>` positions replaced by soft-token rows, in order."""
    embeds = model.get_input_embeddings()(ids)
    if soft is None:
        return embeds
    placeholder = (ids == user_id).unsqueeze(-1)
    rows = soft.reshape(-1, soft.shape[-1]).to(embeds.dtype)
    filled = torch.zeros_like(embeds).masked_scatter(placeholder, rows)
    return torch.where(placeholder, filled, embeds)


def train_llm(
    model: PreTrainedModel,
    projector: Projector,
    vocab: Vocab,
    data: TrainingData,
    cfg: LLMConfig,
    show_progress: bool = True,
) -> list[float]:
    """Joint next-SID training of LLM and projector; returns the mean loss per epoch."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    params = list(model.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    windows = sum(math.ceil(len(s) / cfg.window) + (len(s) > cfg.window) for s in data.train)
    steps_per_epoch = math.ceil(windows / cfg.batch_size)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    )
    user_id, pad_id = vocab.id(USER), vocab.id(PAD)
    levels = data.item_sid_ids.shape[1]
    targets = None
    if cfg.distill > 0 and data.teacher is not None:
        targets = LevelTargets.from_sid_ids(data.teacher, data.item_sid_ids, vocab.layout)
    losses = []
    bar = progress_bar(cfg.epochs, "generative LLM", show_progress)
    model.train()
    projector.train()
    for _ in range(cfg.epochs):
        examples = _epoch_examples(vocab, data, cfg, rng)
        order = rng.permutation(len(examples))
        total, count = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = [examples[i] for i in order[start : start + cfg.batch_size]]
            ids, labels, mask, users = _batch_tensors(batch, pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                soft = projector(users) if users is not None else None
                embeds = embed_with_soft(model, ids, soft, user_id)
                out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
                loss = out.loss
                if targets is not None:
                    where = _distill_inputs(batch, ids.shape[1], levels)
                    loss = loss + cfg.distill * targets.loss(out.logits, *where)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"LLM training diverged (loss {loss.item()}); lower --lr")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            total += loss.item()
            count += 1
        losses.append(total / max(1, count))
        bar.advance(loss=losses[-1])
    bar.close()
    model.eval()
    projector.eval()
    return losses


def save_llm(
    model: PreTrainedModel, vocab: Vocab, directory: Path, tokenizer: object | None = None
) -> None:
    """HF directory loadable by transformers and vLLM, with a neutral generation config."""
    model.save_pretrained(str(directory), safe_serialization=True)
    vocab.save(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))  # type: ignore[attr-defined]
    neutral = {
        "bos_token_id": vocab.id(BOS),
        "eos_token_id": vocab.id(EOS),
        "pad_token_id": vocab.id(PAD),
        "do_sample": False,
    }
    (directory / "generation_config.json").write_text(json.dumps(neutral, indent=2))


def load_llm(directory: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    model.eval()
    return model
