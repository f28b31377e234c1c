"""Prompt layout, shared by training, evaluation and the gateway.

    <bos> [<user> × n_soft] [<ctx> context words] [<ask> user words] [<less> words]
    <hist> SID SID SID ...                                        (soft token at "head")

    <bos> [<ctx> context words] [<ask> user words] [<less> words]
    <hist> SID SID ... [<user> × n_soft] SID ...                  (soft token at "now")

Training packs a window of a user's items after `<hist>`, so every item is learnt as the
next item of the ones before it; at inference the history is the user's recent items and
the model writes the next Semantic ID. Soft token, context and words are each optional:
training drops them at random so one model serves every ablation mode.

Where the soft token stands is a bundle's choice (`LLMConfig.soft_at`). At "head" it sits
before the history whatever point in time its state describes: training gives it the state
before the window, so the model learns it as a summary that lags the history written after
it. At "now" it stands in the history at the point its state was computed: after the items
the embedding has seen and before those logged since, so the model can tell a fresh state
(the next item's best predictor) from a stale one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_store.vocab import ASK, BOS, CTX, HIST, LESS, USER, Vocab, words_of

SOFT_AT = ("head", "now")
"""Where the soft token stands in a prompt (see the module docstring)."""
SOFT_AT_ABSENT = "head"
"""The layout of bundles built before `soft_at` existed."""


def checked_soft_at(soft_at: str) -> str:
    """`soft_at`, or ValueError when it names no layout."""
    if soft_at not in SOFT_AT:
        raise ValueError(f"soft_at {soft_at!r}: expected one of {SOFT_AT}")
    return soft_at


_AGE_BUCKETS = (
    (18, "age:under-18"),
    (25, "age:18-24"),
    (35, "age:25-34"),
    (45, "age:35-44"),
    (50, "age:45-49"),
    (56, "age:50-55"),
)


def age_word(age: int) -> str:
    if age < 0:
        return "age:unknown"
    return next((word for limit, word in _AGE_BUCKETS if age < limit), "age:56-plus")


def context_words(age: int, gender: str, occupation: str, region: str) -> list[str]:
    """A user's facts as prompt words (e.g. ['age:25-34', 'gender:m', 'occ:writer', 'region:9'])."""
    return [
        age_word(age),
        f"gender:{gender.lower() or 'unknown'}",
        f"occ:{occupation.lower() or 'unknown'}",
        f"region:{region.lower() or 'unknown'}",
    ]


@dataclass(frozen=True)
class Mode:
    """Which parts of the prompt one ablation mode uses."""

    soft: bool
    context: bool
    history: int  # most recent items written into the prompt


MODES: dict[str, Mode] = {
    "baseline": Mode(soft=False, context=False, history=1),
    "prompt": Mode(soft=False, context=True, history=20),
    "soft": Mode(soft=True, context=False, history=1),
    "soft+prompt": Mode(soft=True, context=True, history=20),
}


def prompt_ids(
    vocab: Vocab,
    item_sid_ids: np.ndarray,
    history: Sequence[int] | np.ndarray,
    *,
    n_soft: int = 0,
    context: Sequence[str] | None = None,
    ask: str | Sequence[str] = (),
    less: Sequence[str] = (),
    soft_at: str = "head",
    newer: int = 0,
) -> list[int]:
    """Token ids of one prompt; `item_sid_ids` is the (n_items, L) SID token table.

    At `soft_at="now"` the soft token follows the history except its `newer` most recent
    items (those logged after the embedding was computed). `less` (words the user wants
    less of) is written only when the vocabulary has `<less>`: bundles trained before it
    existed simply never see it.
    """
    soft = [vocab.id(USER)] * n_soft
    ids = [vocab.id(BOS)] + (soft if checked_soft_at(soft_at) == "head" else [])
    if context:
        ids += [vocab.id(CTX), *vocab.ids(context)]
    words = words_of(ask) if isinstance(ask, str) else list(ask)
    if words:
        ids += [vocab.id(ASK), *vocab.ids(words)]
    if less and vocab.known(LESS):
        ids += [vocab.id(LESS), *vocab.ids(less)]
    ids.append(vocab.id(HIST))
    written = item_sid_ids[np.asarray(history, dtype=np.int64)].reshape(-1).tolist()
    if soft_at == "head":
        return ids + written
    cut = len(written) - min(max(newer, 0), len(history)) * item_sid_ids.shape[1]
    return ids + written[:cut] + soft + written[cut:]
