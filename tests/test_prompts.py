"""Where the soft token stands: at "head" before everything, at "now" at the point of the
history its state describes, in the prompts the gateway writes and the windows training
learns from alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_store import llm
from model_store.bundle import Bundle
from model_store.projector import Projector, load_projector, save_projector
from model_store.prompts import MODES, prompt_ids
from model_store.recommend import Recommender
from model_store.vocab import BOS, HIST, USER, Vocab

CODES = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])


def _vocab() -> Vocab:
    return Vocab.build(["hello"], [2, 2])


def test_a_now_soft_token_stands_before_the_items_its_embedding_has_not_seen() -> None:
    vocab = _vocab()
    sid = vocab.sid_ids(CODES)
    user, hist, bos = vocab.id(USER), vocab.id(HIST), vocab.id(BOS)
    history = [3, 1, 2]
    head = prompt_ids(vocab, sid, history, n_soft=1)
    assert head[:3] == [bos, user, hist]
    assert head[3:] == sid[history].reshape(-1).tolist()
    for newer, cut in [(0, 6), (1, 4), (3, 0), (9, 0)]:
        now = prompt_ids(vocab, sid, history, n_soft=1, soft_at="now", newer=newer)
        assert now[:2] == [bos, hist]
        assert now[2:] == [*head[3 : 3 + cut], user, *head[3 + cut :]]
    assert prompt_ids(vocab, sid, history, soft_at="now") == [bos, hist, *head[3:]]
    with pytest.raises(ValueError, match="soft_at"):
        prompt_ids(vocab, sid, history, soft_at="tail")


def test_a_now_window_gives_the_soft_token_the_state_at_its_point() -> None:
    vocab = _vocab()
    sid = vocab.sid_ids(CODES)
    states = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # state after items [0..p)
    data = llm.TrainingData(
        train=[np.array([0, 1, 2, 3, 2, 1, 0, 3])],
        states=[states],
        context=[["hello"]],
        item_sid_ids=sid,
        item_genres=[[]] * len(CODES),
    )
    cfg = llm.LLMConfig(window=4, p_drop_soft=0.0, p_ask=0.0, p_less=0.0, soft_at="now")
    rng = np.random.default_rng(0)
    points = set()
    for start in [0, 4] * 20:
        e = llm._window_example(vocab, data, cfg, 0, start, rng)
        at = e.ids.index(vocab.id(USER))
        before = int(np.searchsorted(e.item_starts, at))  # window items written before it
        points.add(before)
        assert start + before > 0  # never the state of an empty history
        np.testing.assert_array_equal(e.soft, states[start + before])
        labelled = [i for i, label in enumerate(e.labels) if label != -100]
        assert at not in labelled and len(labelled) == 2 * len(e.items)
        assert [e.ids[i] for i in labelled] == sid[e.items].reshape(-1).tolist()
    assert points == {0, 1, 2, 3}


def test_the_projector_keeps_where_its_soft_token_stands(tmp_path: Path) -> None:
    save_projector(Projector(4, 8, 1, soft_at="now"), tmp_path)
    assert load_projector(tmp_path).soft_at == "now"
    meta = json.loads((tmp_path / "projector.json").read_text())
    del meta["soft_at"]  # a bundle built before the choice existed
    (tmp_path / "projector.json").write_text(json.dumps(meta))
    assert load_projector(tmp_path).soft_at == "head"


def test_the_served_prompt_of_a_now_bundle_keeps_its_length_and_places_the_soft_token(
    tiny_bundle: Path,
) -> None:
    rec = Recommender(Bundle(tiny_bundle))
    history = [int(i) for i in rec.bundle.histories[0]][-20:]
    user = rec.bundle.user_embeddings[0]
    head = rec.prompt(MODES["soft+prompt"], history, user, ["age:25-34"])
    rec.projector.soft_at = "now"
    user_id = rec.vocab.id(USER)
    for newer in (0, 2):
        now = rec.prompt(MODES["soft+prompt"], history, user, ["age:25-34"], newer=newer)
        assert len(now.token_ids) == len(head.token_ids)  # the same block-aligned length
        after = len(now.token_ids) - 1 - now.token_ids.index(user_id)
        assert after == newer * rec.sid_len  # the newer items' tokens follow the soft token
        assert now.soft_positions() == [now.token_ids.index(user_id)]
