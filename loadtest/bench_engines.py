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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
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
    """Median milliseconds of `repeats` calls after two warm-up calls.

    The first calls at a new batch shape are slow on both engines (oneDNN builds its
    kernels per shape), which is start-up cost, not search cost.
    """
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _measure(args: argparse.Namespace) -> dict[str, float]:
    """Figures for one engine, measured in this process only."""
    import torch

    from model_store.engines.base import load_input_embeddings
    from model_store.engines.torch_engine import TorchEngine
    from model_store.engines.vllm_engine import VLLMEngine
    from model_store.generation import Prompt, beam_search
    from model_store.trie import SIDTrie
    from model_store.vocab import TokenLayout

    if args.threads:
        torch.set_num_threads(args.threads)
    table = load_input_embeddings(args.model_dir)
    vocab, hidden = (int(n) for n in table.shape)
    first_sid = vocab - args.levels * args.codes
    if first_sid < 8:
        raise SystemExit("vocabulary too small for the requested SID levels")
    layout = TokenLayout(tuple(first_sid + lv * args.codes for lv in range(args.levels)))
    rng = np.random.default_rng(0)
    trie = SIDTrie.build(np.unique(rng.integers(0, args.codes, (args.items, args.levels)), axis=0))
    user_id = 4

    def prompt() -> Prompt:
        words = rng.integers(5, first_sid, args.prompt_len - 1)
        soft = rng.normal(0, 0.1, (1, hidden)).astype(np.float32)
        return Prompt((user_id, *(int(w) for w in words)), soft, user_id)

    cases = {"1": [prompt()], "batch": [prompt() for _ in range(args.batch)]}
    figures: dict[str, float] = {"trie_items": trie.n_items}
    if args.only == "torch":
        engine = TorchEngine.from_dir(args.model_dir)
        figures["threads"] = torch.get_num_threads()
        for name, prompts in cases.items():
            figures[name] = _timed(
                partial(beam_search, engine, prompts, trie, layout, args.beam), args.repeats
            )
        return figures

    from vllm import TextPrompt, TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    start = time.perf_counter()
    # LLM.beam_search asks for 2 * width log-probs per step, above the default cap of 20.
    # vLLM's beam search needs the tokenizer the gateway's engine does without
    with VLLMEngine(
        args.model_dir, max_logprobs=2 * args.beam, skip_tokenizer_init=False
    ) as vllm_engine:
        figures["startup_s"] = time.perf_counter() - start
        figures["threads"] = torch.get_num_threads()
        for name, prompts in cases.items():
            figures[name] = _timed(
                partial(beam_search, vllm_engine, prompts, trie, layout, args.beam), args.repeats
            )
        llm = vllm_engine.llm
        assert llm is not None
        params = BeamSearchParams(beam_width=args.beam, max_tokens=args.levels, ignore_eos=True)
        for name, prompts in cases.items():
            tokens: list[TokensPrompt | TextPrompt] = [
                TokensPrompt(prompt_token_ids=[max(t, 5) for t in p.token_ids]) for p in prompts
            ]
            native = partial(llm.beam_search, tokens, params)
            figures[f"native_{name}"] = _timed(native, args.repeats)
    return figures


def _child(args: argparse.Namespace, engine: str, model_dir: Path) -> dict[str, float]:
    """Runs one engine's measurement in a fresh interpreter and reads its JSON line.

    One process per engine: an in-process vLLM binds the process's OpenMP threads and
    replaces `torch.set_num_threads`, which slows any other torch work done beside it.
    """
    cmd = [
        sys.executable,
        "-m",
        "loadtest.bench_engines",
        "--only",
        engine,
        "--model-dir",
        str(model_dir),
    ]
    for key in ("beam", "levels", "codes", "items", "prompt_len", "batch", "repeats", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ)
    if args.in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT):
            result: dict[str, float] = json.loads(line[len(_RESULT) :])
            return result
    raise SystemExit(f"{engine} benchmark failed:\n{done.stderr[-4000:]}")


_RESULT = "RESULT "


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the torch engine (0: torch's default)",
    )
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run vLLM's engine core in the benchmarking process",
    )
    parser.add_argument("--only", choices=("torch", "vllm"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(_RESULT + json.dumps(_measure(args)), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or save_random_qwen2(Path(tmp) / "model")
        t = _child(args, "torch", model_dir)
        v = _child(args, "vllm", model_dir)
    b = str(args.batch)
    print(
        f"beam {args.beam}, {args.levels} levels x {args.codes} codes, "
        f"{int(t['trie_items'])} items, prompt {args.prompt_len} tokens with a soft token; "
        f"median ms per search call over {args.repeats} runs"
    )
    print(
        f"{'prompts':>8} {'torch':>9} {'vllm':>9} {'vllm.beam_search':>17} "
        f"{'vllm/torch':>11} {'vllm/native':>12}"
    )
    for name, label in (("1", "1"), ("batch", b)):
        print(
            f"{label:>8} {t[name]:9.1f} {v[name]:9.1f} {v['native_' + name]:17.1f} "
            f"{v[name] / t[name]:11.2f} {v[name] / v['native_' + name]:12.2f}"
        )
    print(
        f"torch threads {int(t['threads'])}, vLLM torch threads {int(v['threads'])}; "
        f"vLLM engine start-up {v['startup_s']:.1f} s (incl. one warm-up request)"
    )


if __name__ == "__main__":
    main()
