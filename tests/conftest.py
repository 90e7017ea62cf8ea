"""Shared test fixtures: the real pretrained files in ../shared/weights (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights"


def weights_file(*parts: str) -> Path:
    """A file under ../shared/weights, or a skip naming what is missing."""
    path = WEIGHTS.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"needs the real pretrained file {path} (../shared/weights beside the checkout)")
    return path


@pytest.fixture(scope="session")
def lpips_dir() -> Path:
    weights_file("lpips", "alexnet_features.pth")
    return WEIGHTS / "lpips"


@pytest.fixture(scope="session")
def taesd_dir() -> Path:
    weights_file("taesd", "taesd_decoder.safetensors")
    return WEIGHTS / "taesd"
