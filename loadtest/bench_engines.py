"""Times one SID-constrained beam search on each engine, next to vLLM's own beam search.

The figure that matters for serving is milliseconds per search for one prompt (a request)
and for a small batch (a burst); vLLM's unconstrained ``LLM.beam_search`` over the same
width and depth is the yardstick for what the engine costs without our constraint.

    python -m loadtest.bench_engines                 # on a random model built on the fly
    python -m loadtest.bench_engines --model-dir DIR # on a trained model directory
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def save_random_qwen2(
    directory: Path,
    *,
    vocab_size: int = 300,
    hidden: int = 128,
    heads: int = 4,
    layers: int = 2,
    intermediate: int = 256,
    init_std: float = 0.1,
    seed: int = 0,
) -> Path:
    """A randomly initialised Qwen2 with a word-level tokenizer, saved like a trained one.

    `init_std` above Qwen2's 0.02 makes next-token distributions peaked, so that engines
    disagreeing would show up as different beam orders rather than hide in near-ties.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=init_std,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 1024,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return directory


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="save_pretrained directory (default: a random Qwen2)",
    )
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codes", type=int, default=32, help="codes per level")
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--prompt-len", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run vLLM's engine core in this process",
    )
    args = parser.parse_args()
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import torch

    from model_store.engines import TorchEngine, VLLMEngine
    from model_store.generation import Prompt, TokenLayout, beam_search
    from model_store.trie import SIDTrie

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or save_random_qwen2(Path(tmp) / "model")
        torch_engine = TorchEngine.from_dir(model_dir)
        vocab, hidden = torch_engine.table.shape
        first_sid = int(vocab) - args.levels * args.codes
        if first_sid < 8:
            raise SystemExit("vocabulary too small for the requested SID levels")
        layout = TokenLayout(tuple(first_sid + lv * args.codes for lv in range(args.levels)))
        rng = np.random.default_rng(0)
        codes = np.unique(rng.integers(0, args.codes, (args.items, args.levels)), axis=0)
        trie = SIDTrie.build(codes)
        user_id = 4

        def prompt() -> Prompt:
            words = rng.integers(5, first_sid, args.prompt_len - 1)
            soft = rng.normal(0, 0.1, (1, int(hidden))).astype(np.float32)
            return Prompt((user_id, *(int(w) for w in words)), soft, user_id)

        one = [prompt()]
        batch = [prompt() for _ in range(args.batch)]
        figures: dict[str, float] = {}
        threads_before = torch.get_num_threads()
        for name, prompts in (("1", one), (str(args.batch), batch)):
            figures[f"torch_{name}"] = _timed(
                lambda p=prompts: beam_search(torch_engine, p, trie, layout, args.beam),
                args.repeats,
            )

        start = time.perf_counter()
        # LLM.beam_search asks for 2 * width log-probs per step, above the default cap of 20.
        vllm_engine = VLLMEngine(model_dir, max_logprobs=2 * args.beam)
        figures["vllm_startup_s"] = time.perf_counter() - start
        # vLLM drops this process to one torch thread for serving: time torch again under it.
        threads_after = torch.get_num_threads()
        for name, prompts in (("1", one), (str(args.batch), batch)):
            figures[f"torch1t_{name}"] = _timed(
                lambda p=prompts: beam_search(torch_engine, p, trie, layout, args.beam),
                args.repeats,
            )
        with vllm_engine:
            for name, prompts in (("1", one), (str(args.batch), batch)):
                figures[f"vllm_{name}"] = _timed(
                    lambda p=prompts: beam_search(vllm_engine, p, trie, layout, args.beam),
                    args.repeats,
                )
            from vllm import TokensPrompt
            from vllm.sampling_params import BeamSearchParams

            llm = vllm_engine.llm
            assert llm is not None
            params = BeamSearchParams(beam_width=args.beam, max_tokens=args.levels, ignore_eos=True)
            for name, prompts in (("1", one), (str(args.batch), batch)):
                tokens = [
                    TokensPrompt(prompt_token_ids=[max(t, 5) for t in p.token_ids]) for p in prompts
                ]
                figures[f"vllm_native_{name}"] = _timed(
                    lambda t=tokens: llm.beam_search(t, params), args.repeats
                )

    print(
        f"beam {args.beam}, {args.levels} levels, prompt {args.prompt_len} tokens with a soft "
        f"token, trie {trie.n_items} items; median ms per search call ({args.repeats} runs):"
    )
    for name in ("1", str(args.batch)):
        t, t1, v, n = (figures[f"{e}_{name}"] for e in ("torch", "torch1t", "vllm", "vllm_native"))
        print(
            f"  {name:>2} prompt(s): torch {t:7.1f} ({threads_before} thr)  torch {t1:7.1f} "
            f"({threads_after} thr)  vllm {v:7.1f}  vllm.beam_search {n:7.1f}  | "
            f"vllm/torch {v / t1:5.2f}  vllm/vllm.beam_search {v / n:5.2f}"
        )
    print(f"  vLLM engine start-up: {figures['vllm_startup_s']:.1f} s (incl. warm-up request)")


if __name__ == "__main__":
    main()
