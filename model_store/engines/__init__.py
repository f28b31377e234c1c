"""Next-token scoring engines for the SID-constrained beam search, behind one factory.

Three implementations of :class:`~model_store.generation.Engine`, numerically
interchangeable (they share :func:`~model_store.engines.base.prompt_embeddings`):

* ``torch``: plain PyTorch over the Hugging Face model and its KV cache; exact, no start-up
  cost; the offline evaluation and the parity tests use it.
* ``vllm``: a ``vllm.LLM`` inside this process; the embedded serving path.
* ``remote``: vLLM OpenAI servers over HTTP (``--enable-prompt-embeds``): one, or several
  replicas with every level of a search on the same one (prefix-cache affinity) and failover.

Each implementation is imported only when asked for, so a gateway with a remote engine
loads neither vLLM nor transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from model_store.generation import Engine

EngineKind = Literal["torch", "vllm", "remote"]
KINDS: tuple[str, ...] = get_args(EngineKind)


def open_engine(kind: EngineKind | str, model_dir: str | Path, **options: Any) -> Engine:
    """The engine of `kind` over the model in `model_dir`; close it (or use it as a context
    manager) when done.

    `options` go to the implementation: `attn_implementation` (torch); `kv_cache_gib`,
    `block_size`, `warmup` and ``vllm.LLM`` arguments (vllm); `base_url` (one URL, or a
    list of replicas' URLs), `timeout_s`, `model_name` and `health_interval_s` (remote).
    With vLLM the engine core runs in a spawned process unless the environment sets
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; a script that keeps the default must guard its
    entry point with ``if __name__ == "__main__":``.
    """
    if kind == "torch":
        from model_store.engines.torch_engine import TorchEngine

        return TorchEngine.from_dir(model_dir, **options)
    if kind == "vllm":
        from model_store.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **options)
    if kind == "remote":
        from model_store.engines.remote import RemoteEngine

        return RemoteEngine(model_dir=Path(model_dir), **options)
    raise ValueError(f"unknown engine {kind!r}: expected one of {', '.join(KINDS)}")
