"""The ggml pin: the fetch script verifies the checksum and fails with a clear message."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "vendor" / "ggml" / "fetch_ggml.py"


def pin() -> dict[str, str]:
    out = {}
    for line in (REPO / "vendor" / "ggml" / "PIN").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_pin_names_the_sdist_and_its_checksum():
    p = pin()
    assert p["package"] == "llama-cpp-python" and p["version"] == "0.3.36"
    assert p["sha256"] == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
    assert p["subtree"] == "vendor/llama.cpp/ggml"


def test_fetch_refuses_an_sdist_with_the_wrong_checksum(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the real sdist")
    r = subprocess.run([sys.executable, str(SCRIPT), "--force", "--sdist", str(fake)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "does not match the pin" in r.stderr and "cannot fetch the pinned ggml" in r.stderr


def test_fetch_reports_a_missing_local_sdist(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--force", "--sdist", str(tmp_path / "none.tar.gz")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no such file" in r.stderr


def test_extracted_ggml_carries_the_deepseek_v4_ops():
    header = REPO / "vendor" / "ggml" / "ggml" / "include" / "ggml.h"
    if not header.exists():  # the build fetches it; a checkout that never built has none
        import pytest
        pytest.skip("vendor/ggml/ggml not extracted yet")
    text = header.read_text()
    for op in ("ggml_dsv4_hc_pre", "ggml_dsv4_hc_post", "ggml_dsv4_hc_comb", "ggml_lightning_indexer",
               "ggml_rope_set_offset", "ggml_swiglu_clamp", "ggml_soft_max_add_sinks"):
        assert op in text, op
