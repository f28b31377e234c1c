"""`--base-model`: a pretrained HF causal LM is extended with our words and SID tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, T5Config
from typer.testing import CliRunner

from model_store.build import build
from model_store.bundle import load_bundle
from model_store.config import PRESETS
from model_store.data import default_cache_dir, load_dataset
from model_store.engines.torch_engine import TorchEngine
from model_store.llm import BaseModelError, check_base_model
from model_store.prompts import MODES
from model_store.recommend import Recommender
from service.cli import app

pytestmark = pytest.mark.slow


def _pretrained(directory: Path) -> int:
    """A small 'pretrained' Qwen2 with its own tokenizer, as a stand-in for an open model."""
    words = ["<unk>", "<s>", "</s>", "the", "action", "comedy", "movie", "good"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(directory))
    return len(words)


def test_build_extends_a_pretrained_model(ml100k_dir: Path, tmp_path: Path) -> None:
    base_size = _pretrained(tmp_path / "base")
    cfg = PRESETS["tiny"]
    out = tmp_path / "bundle"
    build(
        load_dataset(ml100k_dir, "ml-100k"),
        out,
        cfg,
        base_model=tmp_path / "base",
        run_eval=False,
        show_progress=False,
        cache_dir=default_cache_dir(),
    )
    bundle = load_bundle(out)
    vocab = bundle.vocab
    assert vocab.tokens[:base_size] == (
        "<unk>",
        "<s>",
        "</s>",
        "the",
        "action",
        "comedy",
        "movie",
        "good",
    )
    assert vocab.id("action") == 4  # the base model's own token is reused
    assert vocab.sid_start > base_size
    saved = PreTrainedTokenizerFast.from_pretrained(str(bundle.llm_dir))
    assert len(saved) == len(vocab)
    assert saved.convert_tokens_to_ids("<s0_3>") == vocab.id("<s0_3>")
    rec = Recommender(bundle)
    prompts = [
        rec.prompt(
            MODES["soft+prompt"],
            bundle.histories[0].tolist(),
            bundle.user_embeddings[0],
            list(bundle.users["context"][0]),
        )
    ]
    beams = rec.generate(TorchEngine.from_dir(bundle.llm_dir), prompts, beam_width=10)[0]
    assert len({b.item for b in beams}) == 10
    assert all(bundle.trie.is_valid(b.sid) for b in beams)


def test_a_base_model_that_cannot_be_extended_is_refused_before_the_build(
    tmp_path: Path,
) -> None:
    """Read from its config alone: a wrong `--base-model` costs no build stage."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    T5Config().save_pretrained(str(tmp_path / "seq2seq"))
    Qwen2Config(hidden_size=60, num_attention_heads=2).save_pretrained(str(tmp_path / "heads"))
    cases = {
        "missing": "no config.json",
        "broken": "not a valid JSON",
        "seq2seq": "no causal LM",
        "heads": "head_dim 30",
    }
    for name, reason in cases.items():
        with pytest.raises(BaseModelError, match=reason):
            check_base_model(tmp_path / name)
    args = ["build", "--out", str(tmp_path / "out"), "--base-model", str(tmp_path / "heads")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "head_dim 30" in result.output
    assert not (tmp_path / "out").exists()
