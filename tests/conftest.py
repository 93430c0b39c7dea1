"""Shared fixtures. Real CT sample data is read from ../shared and skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO.parent / "shared" / "data" / "totalsegmentator-example"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real CT sample folder absent: {SAMPLE_DIR}")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_model(request, tmp_path_factory) -> Path:
    """A small real nnU-Net v2 2d model folder (tests/nnunet_fixtures.py), built once."""
    from nnunet_fixtures import cached_tiny_model

    cache = getattr(request.config, "cache", None)
    root = (cache.mkdir("l3muscleseg-tiny-nnunet") if cache is not None
            else tmp_path_factory.mktemp("tiny-nnunet"))
    return cached_tiny_model(Path(root))
