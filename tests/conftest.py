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
