"""Shared fixtures: the golden files beside the clone, and tiny models written per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def golden_dir() -> Path:
    return Path(os.environ.get("DSV4_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden() -> Path:
    d = golden_dir()
    if not (d / "ds4-tiny-f32.gguf").exists():
        pytest.skip(f"golden files not found in {d} (set DSV4_GOLDEN_DIR)")
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default tiny model (seed 0), written once per test session."""
    from dsv4_ggml.tiny import write_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-seed0.gguf"
    write_tiny_model(path, seed=0)
    return path
