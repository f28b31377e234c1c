"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from model_store.data import fetch_ml100k
from tests.build_threads import build_threads

# No per-example deadline anywhere: one example held up on a busy 2-core machine (a GC
# pause, a descheduled thread) would fail a property that holds.
settings.register_profile("genrec", deadline=None)
settings.load_profile("genrec")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """Real ML-100K files, fetched once into the default cache that runs share."""
    return fetch_ml100k()


@pytest.fixture(scope="session")
def tiny_bundle(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle built from real ML-100K with the tiny preset (first 120 users)."""
    from model_store.build import build
    from model_store.config import PRESETS
    from model_store.data import default_cache_dir, load_dataset

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    ds = load_dataset(ml100k_dir, "ml-100k")
    with build_threads():
        build(ds, out, PRESETS["tiny"], show_progress=False, cache_dir=default_cache_dir())
    return out
