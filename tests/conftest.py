"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store.data import fetch_ml100k


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """Real ML-100K files, fetched once into the default cache that runs share."""
    return fetch_ml100k()
