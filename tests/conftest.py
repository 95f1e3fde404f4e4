"""Shared fixtures: where the reference data lives, and small specs for fast tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference beside the checkout (there in CI too); the goldens are not copied here."""
    if not REFERENCE.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE}: the checkout must sit beside shared/")
    return REFERENCE
