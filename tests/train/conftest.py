"""Fixtures for the training-engine tests (builders in train_builders.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_builders import build_cache


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 train / 14 val / 4 test images of 64 x 64 with a learnable pattern (see train_builders)."""
    return build_cache(tmp_path_factory.mktemp("train-cache") / "cache")
