"""The LLM's vocabulary: specials, a small word-level text vocabulary, and one token per
(level, code) of the Semantic IDs.

The same `Vocab` drives training, evaluation and serving, and it is saved next to the
model as a `tokenizers` word-level `tokenizer.json`, so Hugging Face and vLLM read it too.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TokenLayout:
    """Where the (level, code) tokens of the Semantic IDs sit in the LLM vocabulary."""

    level_offsets: tuple[int, ...]

    def token(self, level: int, code: np.ndarray | int) -> np.ndarray:
        return np.asarray(code, dtype=np.int64) + self.level_offsets[level]

    def code(self, level: int, token: np.ndarray | int) -> np.ndarray:
        return np.asarray(token, dtype=np.int64) - self.level_offsets[level]


PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
USER, CTX, ASK, HIST = "<user>", "<ctx>", "<ask>", "<hist>"
LESS = "<less>"  # words the user wants less of (taste-profile edits)
SPECIALS = (PAD, UNK, BOS, EOS, USER, CTX, ASK, HIST, LESS)

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def words_of(text: str) -> list[str]:
    """Lower-case word split used for item text and for users' own words alike."""
    return _WORD.findall(text.lower())


def sid_token(level: int, code: int) -> str:
    return f"<s{level}_{code}>"


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    level_sizes: tuple[int, ...]
    sid_start: int

    @classmethod
    def build(cls, words: Iterable[str], level_sizes: Sequence[int]) -> Vocab:
        text = sorted(set(words) - set(SPECIALS))
        sids = [sid_token(lv, c) for lv, size in enumerate(level_sizes) for c in range(size)]
        tokens = (*SPECIALS, *text, *sids)
        return cls(tokens, tuple(int(s) for s in level_sizes), len(SPECIALS) + len(text))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return index.get(token, index[UNK])

    def ids(self, words: Iterable[str]) -> list[int]:
        return [self.id(w) for w in words]

    def known(self, word: str) -> bool:
        return word in self._index  # type: ignore[attr-defined]

    @property
    def layout(self) -> TokenLayout:
        offsets = np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]]) + self.sid_start
        return TokenLayout(tuple(int(o) for o in offsets))

    def sid_ids(self, codes: np.ndarray) -> np.ndarray:
        """(n, L) codes → (n, L) token ids."""
        return np.asarray(codes, dtype=np.int64) + np.asarray(self.layout.level_offsets)

    def save(self, directory: Path) -> list[str]:
        """Writes vocab.json and a word-level tokenizer.json (+ config) for HF and vLLM."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "tokens": list(self.tokens),
            "level_sizes": list(self.level_sizes),
            "sid_start": self.sid_start,
        }
        (directory / "vocab.json").write_text(json.dumps(meta))
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(self.tokens)}, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "model_max_length": 4096,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return ["vocab.json", "tokenizer.json", "tokenizer_config.json"]

    @classmethod
    def load(cls, directory: Path) -> Vocab:
        meta = json.loads((directory / "vocab.json").read_text())
        return cls(tuple(meta["tokens"]), tuple(meta["level_sizes"]), int(meta["sid_start"]))


def text_vocabulary(
    context_words: Iterable[str],
    genres: Iterable[str],
    kinds: Iterable[str],
    titles: Iterable[str],
    min_count: int = 3,
) -> list[str]:
    """Words the model may read: context values, genres, kinds, decades, common title words."""
    counts = Counter(w for t in titles for w in words_of(t) if not w.isdigit())
    decades = [f"{d}s" for d in range(1900, 2030, 10)]
    common = [w for w, n in counts.items() if n >= min_count]
    return sorted({*context_words, *genres, *kinds, *decades, *common})
