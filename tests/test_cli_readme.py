"""The README's Python snippets run as written; the CLI commands work end to end."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dsv4_ggml

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "dsv4_ggml.cli"]


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _absolute_pythonpath(monkeypatch) -> None:
    """Child processes run in a temporary directory: a relative PYTHONPATH (a checkout run with
    PYTHONPATH=.) must not change meaning there."""
    if os.environ.get("PYTHONPATH"):
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(os.path.abspath(p) for p in
                                                         os.environ["PYTHONPATH"].split(os.pathsep) if p))


def test_readme_python_snippets_run(tmp_path, monkeypatch, capsys):
    blocks = readme_python_blocks()
    assert blocks, "README has no python snippet"
    _absolute_pythonpath(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "True" in out.splitlines(), out          # the reference check of the API snippet
    assert "The quick brown fox" in out.splitlines()


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)


def test_cli_run_generates_from_the_embedded_tiny_model():
    r = run("run", "-p", "Hello", "-n", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello")
    assert "tokens/s" in r.stderr and "embedded tiny" in r.stderr


def test_cli_run_is_deterministic_with_a_seed():
    a = run("run", "-p", "Hi", "-n", "8", "--temp", "0.9", "--seed", "5")
    b = run("run", "-p", "Hi", "-n", "8", "--temp", "0.9", "--seed", "5")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_cli_tiny_then_inspect(tmp_path):
    out = tmp_path / "m.gguf"
    r = run("tiny", str(out), "--seed", "3")
    assert r.returncode == 0 and out.exists(), r.stderr
    r = run("inspect", str(out), "--tensors")
    assert r.returncode == 0, r.stderr
    assert "6 layers" in r.stdout and "blk.1.indexer.attn_q_b.weight" in r.stdout
    assert "MTP block" not in r.stdout
    # a file with the MTP block: inspect says where it is and that only MTP use reads it
    mtp = tmp_path / "mtp.gguf"
    assert run("tiny", str(mtp), "--n-mtp-layers", "1").returncode == 0
    r = run("inspect", str(mtp))
    assert r.returncode == 0, r.stderr
    assert "6 layers + MTP" in r.stdout and "MTP block: blk.6, " in r.stdout and "--draft mtp" in r.stdout
    assert "opened in " in r.stdout and "weights mapped, not read" in r.stdout


def test_cli_bench_reports_load_time_and_rss(tmp_path):
    out = tmp_path / "m.gguf"
    assert run("tiny", str(out)).returncode == 0
    r = run("bench", "-m", str(out), "-p", "8", "-n", "4", "-r", "1", "-t", "1")
    assert r.returncode == 0, r.stderr
    load = next(line for line in r.stdout.splitlines() if line.startswith("load: "))
    seconds, rss = float(load.split()[1]), float(load.split("RSS after load ")[1].split()[0])
    assert 0 < seconds < 60 and rss > 0


def test_cli_bench_long_prompt_list_and_compute_roof(tmp_path):
    """-p takes a list (one pp test each, with its seconds); --compute-roof gives pp's fraction of
    it from the weight matrices' multiply-accumulates per prompt token."""
    import json

    from dsv4_ggml.bench import prefill_macs_per_token

    out = tmp_path / "m.gguf"
    assert run("tiny", str(out)).returncode == 0
    r = run("bench", "-m", str(out), "-p", "8,24", "-n", "0", "-r", "1", "-t", "1", "--compute-roof", "1000", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    pp = {x["test"]: x for x in res["results"]}
    assert set(pp) == {"pp8", "pp24"} and all(abs(x["seconds"] * x["mean"] - x["n_tokens"]) < 1e-6 * x["n_tokens"]
                                            for x in pp.values())
    with dsv4_ggml.Model(out, n_ctx=8) as m:
        hp, macs = m.hparams, prefill_macs_per_token(m)
    D, F, K = hp["n_embd"], hp["expert_ff"][0], hp["n_expert_used"]
    assert macs > 3 * D * F * (1 + K) * hp["n_layer"]     # at least the shared and K routed experts
    assert res["prefill_macs_per_token"] == macs
    for name, frac in res["compute_fraction"].items():
        assert frac == pytest.approx(pp[name]["mean"] * macs / 1e12)
    assert run("bench", "-m", str(out), "-p", "8,x").returncode != 0


def test_cli_reports_a_bad_file_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    r = run("inspect", str(bad))
    assert r.returncode == 1
    assert "NotGGUFError" in r.stderr and "Traceback" not in r.stderr


def test_readme_cli_tour_runs(tmp_path, monkeypatch):
    """The README's bash tour, line by line (`dsv4-ggml` run as `python -m dsv4_ggml.cli`)."""
    _absolute_pythonpath(monkeypatch)
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "dsv4-ggml tiny tiny.gguf" in b)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) >= 5
    exe = " ".join(CLI)
    for ln in lines:
        r = subprocess.run(ln.replace("dsv4-ggml", exe), shell=True, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{ln}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, ln


@pytest.mark.parametrize("cmd", ["run", "chat", "serve", "bench", "convert", "tiny", "inspect", "generate",
                                 "version"])
def test_every_subcommand_has_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout
