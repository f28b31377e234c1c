"""Distilling the user model into the LLM's SID levels: the per-level targets are the
teacher's distribution given the true prefix, and the loss reads the logits that write
each level (the token before it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_store import llm
from model_store.distill import LevelTargets, Teacher
from model_store.vocab import Vocab

# Five items over 2 levels: codes (level 0, level 1). Items 0-2 share level-0 code 0.
CODES = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]])


TEMPERATURE = 0.5


def _scorer(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit item vectors and an item prior: logits = state · vectors / T + bias."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(CODES), 4))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, rng.normal(size=len(CODES))


def _teacher(seed: int = 0) -> Teacher:
    vectors, bias = _scorer(seed)
    return Teacher(np.concatenate([vectors, bias[:, None] * TEMPERATURE], axis=1), TEMPERATURE)


def _vocab() -> Vocab:
    return Vocab.build(["hello"], [2, 3])


def test_the_targets_are_the_teachers_distribution_given_the_true_prefix() -> None:
    targets = LevelTargets(_teacher(), CODES, _vocab().layout)
    vectors, bias = _scorer()
    state = np.random.default_rng(1).normal(size=4)
    logits = state @ vectors.T / TEMPERATURE + bias
    p = np.exp(logits - logits.max())
    p /= p.sum()
    level0, level1 = targets.targets(
        torch.tensor(np.stack([state, state]), dtype=torch.float32), torch.tensor([1, 4])
    )
    np.testing.assert_allclose(level0[0].numpy(), [p[:3].sum(), p[3:].sum()], rtol=1e-5)
    np.testing.assert_allclose(level1[0].numpy(), p[:3] / p[:3].sum(), rtol=1e-5)
    np.testing.assert_allclose(level1[1].numpy(), [*(p[3:] / p[3:].sum()), 0.0], rtol=1e-5)


def test_the_loss_is_zero_only_when_the_llm_agrees_with_the_teacher() -> None:
    vocab = _vocab()
    targets = LevelTargets(_teacher(), CODES, vocab.layout)
    states = torch.randn(2, 4)
    items = torch.tensor([2, 3])
    wanted = targets.targets(states, items)
    logits = torch.zeros(1, 4, len(vocab))
    offsets = vocab.layout.level_offsets
    positions = torch.tensor([[0, 1], [2, 3]])  # item n level l written from position 2n + l
    for n in range(2):
        for level, target in enumerate(wanted):
            size = target.shape[1]
            logits[0, 2 * n + level, offsets[level] : offsets[level] + size] = torch.log(
                target[n].clamp_min(1e-30)
            )
    assert targets.loss(logits, positions, states, items).item() == pytest.approx(0.0, abs=1e-4)
    logits.requires_grad_(True)
    shifted = logits + torch.randn_like(logits)
    loss = targets.loss(shifted, positions, states, items)
    assert loss.item() > 0.01
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("soft_at", ["head", "now"])
def test_each_position_is_the_token_before_the_level_it_writes(soft_at: str) -> None:
    vocab = _vocab()
    sid_ids = vocab.sid_ids(CODES)
    states = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    data = llm.TrainingData(
        train=[np.array([4, 0, 2, 1, 3, 2])],
        states=[states],
        context=[["hello"]],
        item_sid_ids=sid_ids,
        item_genres=[[]] * len(CODES),
    )
    cfg = llm.LLMConfig(window=4, p_drop_soft=0.0, p_ask=0.0, p_less=0.0, soft_at=soft_at)
    rng = np.random.default_rng(0)
    batch = [llm._window_example(vocab, data, cfg, 0, start, rng) for start in (0, 2)]
    ids, _, _, _ = llm._batch_tensors(batch, pad_id=0)
    positions, got_states, items = llm._distill_inputs(batch, ids.shape[1], levels=2)
    assert items.tolist() == [4, 0, 2, 1, 2, 1, 3, 2]
    np.testing.assert_array_equal(got_states.numpy(), np.concatenate([states[:4], states[2:6]]))
    written = ids.reshape(-1)[positions + 1]  # the token each position's logits predict
    np.testing.assert_array_equal(written.numpy(), sid_ids[items.numpy()])
