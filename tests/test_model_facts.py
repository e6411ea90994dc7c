"""One home per model fact: the GGUF files the tiny writer and the converter write, and the files
llama.cpp's tooling wrote (golden), hold exactly the tensors (names, shapes) and keys the DSL
declares (`codegen/v4.py`, seen through `codegen/tables.py`). A writer that drifts from the DSL
fails here, before the loader rejects its files."""
from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from codegen.tables import gguf_key, tensor_table, values_from_metadata
from codegen.v4 import MODEL


def disagreements(path: Path) -> list[str]:
    """How the file differs from the DSL's table for its own hyperparameters (empty: none)."""
    r = GGUFReader(str(path))
    meta = {f.name: f.contents() for f in r.fields.values() if f.types}
    problems = [f"missing key {h.key}" for h in MODEL.hparams if h.required and h.key not in meta]
    if problems:
        return problems
    rows = tensor_table(values_from_metadata(meta))
    declared = {row.name: row for row in rows}
    found = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    problems += [f"missing tensor {n}" for n, row in declared.items() if row.required and n not in found]
    problems += [f"undeclared tensor {n}" for n in found if n not in declared]
    problems += [f"{n}: shape {found[n]}, declared {declared[n].shape}" for n in found
                 if n in declared and found[n] != declared[n].shape]
    return problems


TINY_CONFIGS = {
    "default": {},
    "mtp": {"n_mtp_layers": 1},
    "no-hash": {"n_hash_layers": 0},
    "ratios": {"n_layer": 4, "compress_ratios": [4, 4, 128, 0], "n_hash_layers": 1},
    "quantized": {"weight_type": "q8_0", "expert_type": "q4_k"},
}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_writer_matches_the_dsl(tmp_path, name):
    from dsv4_ggml.tiny import write_tiny_model

    path = tmp_path / f"{name}.gguf"
    write_tiny_model(path, seed=3, **TINY_CONFIGS[name])
    assert disagreements(path) == []


def test_golden_files_match_the_dsl(golden):
    for name in ("ds4-tiny-f32.gguf", "ds4-tiny-q8_0.gguf"):
        if (golden / name).exists():
            assert disagreements(golden / name) == [], name


def test_converter_matches_the_dsl(tmp_path):
    from test_convert import _convert, tiny_checkpoint

    for extra in ({}, {"n_mtp_layers": 1}):
        ck = tmp_path / f"ckpt{len(extra)}"
        tiny_checkpoint(ck, seed=1, **extra)
        out = tmp_path / f"conv{len(extra)}.gguf"
        _convert(ck, out, outtype="q8_0", mtp=bool(extra))
        assert disagreements(out) == [], extra


def test_the_checker_catches_drift(tmp_path):
    """A file with a tensor dropped, one renamed and one reshaped: each is reported."""
    import numpy as np
    from gguf import GGUFWriter

    from dsv4_ggml.tiny import write_tiny_model

    src = tmp_path / "t.gguf"
    write_tiny_model(src, seed=0)
    r = GGUFReader(str(src))
    w = GGUFWriter(str(tmp_path / "bad.gguf"), "deepseek4")
    for f in r.fields.values():
        if f.types and not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        data = np.array(t.data)
        if t.name == "blk.0.attn_sinks.weight":
            continue                                              # dropped
        name = "blk.0.attn_sink.weight" if t.name == "blk.1.attn_sinks.weight" else t.name   # renamed
        if t.name == "output_norm.weight":
            data = np.concatenate([data, data])                   # reshaped
        w.add_tensor(name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    problems = disagreements(tmp_path / "bad.gguf")
    assert "missing tensor blk.0.attn_sinks.weight" in problems
    assert "undeclared tensor blk.0.attn_sink.weight" in problems
    assert any(p.startswith("output_norm.weight: shape") for p in problems), problems
    assert gguf_key("n_embd") == "deepseek4.embedding_length"
