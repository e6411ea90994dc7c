"""Shared fixtures: the golden files beside the clone, and tiny models written per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# DSV4_TEST_BACKEND=cuda runs every engine test on that backend (benchmarks/gpu_check.sh): Model's
# default backend becomes it for this test session; tests that name a backend keep theirs.
TEST_BACKEND = os.environ.get("DSV4_TEST_BACKEND", "cpu")
if TEST_BACKEND != "cpu":
    import inspect

    import dsv4_ggml

    _init = dsv4_ggml.Model.__init__
    _names = [p for p in inspect.signature(_init).parameters if p != "self"]
    _defaults = list(_init.__defaults__)
    _defaults[_names.index("backend") - (len(_names) - len(_defaults))] = TEST_BACKEND
    _init.__defaults__ = tuple(_defaults)


def golden_dir() -> Path:
    return Path(os.environ.get("DSV4_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def _golden_with(name: str) -> Path:
    d = golden_dir()
    if not (d / name).exists() or not (d / "tokens-700.json").exists():
        pytest.skip(f"golden file {name} not found in {d} (set DSV4_GOLDEN_DIR)")
    return d


@pytest.fixture(scope="session")
def golden() -> Path:
    """The golden directory (skips without its F32 file)."""
    return _golden_with("ds4-tiny-f32.gguf")


@pytest.fixture(scope="session")
def golden_q8_0() -> Path:
    """The golden directory, for tests of its Q8_0 file alone (a GPU run carries only that one)."""
    return _golden_with("ds4-tiny-q8_0.gguf")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default tiny model (seed 0), written once per test session."""
    from dsv4_ggml.tiny import write_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-seed0.gguf"
    write_tiny_model(path, seed=0)
    return path
