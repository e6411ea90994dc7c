"""CUDA without a GPU: our own .cu files compile for sm_90 with nvcc, and our C++ compiles with
DSV4_WITH_CUDA against ggml-cuda's header (the full ggml-cuda build is the documented
`DSV4_CUDA=ON pip install .`, too long for every CI run). Skipped where nvcc is not installed."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GGML_INCLUDE = REPO / "vendor" / "ggml" / "ggml" / "include"


def _cu_files() -> list[Path]:
    return sorted(p for d in ("native", "benchmarks") for p in (REPO / d).rglob("*.cu"))


def test_there_are_cuda_sources():
    assert _cu_files(), "no .cu file found under native/ or benchmarks/"


@pytest.mark.parametrize("src", _cu_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_cu_file_compiles_for_sm90(src, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    if src.is_relative_to(REPO / "native"):   # a kernel of our library: compile only, against ggml's headers
        if not (GGML_INCLUDE / "ggml-cuda.h").exists():
            pytest.skip(f"the pinned ggml source is not extracted in {GGML_INCLUDE.parent}")
        args = ["-c", "-std=c++17", "-DDSV4_WITH_CUDA", f"-I{src.parent}", f"-I{GGML_INCLUDE}",
                "-o", str(tmp_path / "a.o")]
    else:                                      # a stand-alone benchmark program
        args = ["-o", str(tmp_path / "a.out")]
    r = subprocess.run([nvcc, "-O3", "-arch=sm_90", "-Werror", "all-warnings", *args, str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def test_runtime_compiles_with_the_cuda_backend_enabled():
    if shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolkit")
    if not (GGML_INCLUDE / "ggml-cuda.h").exists():
        pytest.skip(f"the pinned ggml source is not extracted in {GGML_INCLUDE.parent}")
    cxx = shutil.which("c++") or shutil.which("g++")
    srcs = [str(f) for f in sorted((REPO / "native" / "src").glob("*.cpp"))]
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DDSV4_WITH_CUDA",
                        '-DDSV4_VERSION="0"', '-DDSV4_GGML_VERSION="0"',
                        f"-I{REPO / 'native' / 'include'}", f"-I{REPO / 'native' / 'src'}",
                        f"-I{REPO / 'native' / 'generated'}", f"-I{REPO / 'native' / 'ops'}", f"-I{GGML_INCLUDE}",
                        *srcs],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
