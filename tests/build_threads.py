"""The thread count of every test build."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

BUILD_THREADS = 1
"""Threads of every test build: float sums depend on how threads split them, so a build is
reproducible only at the same thread count (and `genrec ... --threads` changes it)."""


@contextmanager
def build_threads() -> Iterator[None]:
    """Torch and faiss at `BUILD_THREADS` for one build, then as they were."""
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(BUILD_THREADS)
    faiss.omp_set_num_threads(BUILD_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
