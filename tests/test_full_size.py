"""The real model's size without its weights: a header-only copy of the official checkpoint and
the full-size GGUF converted from it, both sparse files whose data are holes.

The checkpoint is DeepSeek-V4-Flash's layout (spec §1.1 config, §2 names, §6.1 dtypes: FP8 e4m3 with
UE8M0 128x128 block scales, FP4 experts two per byte with a scale per 32 inputs, BF16/F32 for the
rest), shapes written here from the spec's formulas, data never written (~150 GB apparent, almost no
disk). `convert --dry-run` must plan exactly the tensor table the engine's loader (the DSL, which
mirrors llama.cpp's deepseek4 loader) expects for the real hyperparameters; the GGUF written with its
data as a hole (~170 GB with Q4_K experts) must open quickly, in little memory, with the real
hyperparameters, `inspect` must print weights per type and session memory at 4k/128k/1M tokens, and
the weights the CPU loader copies at load (repack) must stay within the copy limit, the rest
mapped and said so.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dsv4_ggml
from dsv4_ggml.memory import rss_bytes

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from test_convert import GLOBAL_SRC, LAYER_SRC, hf_config, tokenizer_json  # noqa: E402

# spec §1.1, with write_tiny_model's field names (test_convert.hf_config maps them to config.json)
REAL = dict(n_vocab=129280, n_embd=4096, n_layer=43, n_head=64, head_dim=512, n_rot=64, q_lora_rank=1024,
            o_groups=8, o_lora_rank=1024, n_swa=128, compress_ratios=[0, 0] + [4, 128] * 20 + [4],
            rope_freq_base=10000.0, compress_rope_freq_base=160000.0, rope_scaling_factor=16.0,
            rope_orig_ctx=65536, context_length=1048576, n_expert=256, n_expert_shared=1, n_expert_used=6,
            expert_ff=2048, expert_weights_scale=1.5, n_hash_layers=3, swiglu_limit=10.0, indexer_n_head=64,
            indexer_head_dim=128, indexer_top_k=512, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
SIZE = {"F32": 4, "BF16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8}


def gguf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor of the trunk (NumPy shapes: ggml ne reversed), from spec §2's formulas."""
    D, H, Dh, QL, G, R = c["n_embd"], c["n_head"], c["head_dim"], c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]
    V, E, F, HC, K = c["n_vocab"], c["n_expert"], c["expert_ff"], c["hc_mult"], c["n_expert_used"]
    HI, Di, mix = c["indexer_n_head"], c["indexer_head_dim"], (2 + c["hc_mult"]) * c["hc_mult"]
    out = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D),
           "output_hc_fn.weight": (HC, HC * D), "output_hc_base.weight": (HC,), "output_hc_scale.weight": (1,)}
    for il, ratio in enumerate(c["compress_ratios"]):
        b = f"blk.{il}."
        out.update({b + "attn_norm.weight": (D,), b + "attn_sinks.weight": (H,), b + "attn_q_a.weight": (QL, D),
                    b + "attn_q_a_norm.weight": (QL,), b + "attn_q_b.weight": (H * Dh, QL), b + "attn_kv.weight": (Dh, D),
                    b + "attn_kv_a_norm.weight": (Dh,), b + "attn_output_a.weight": (G * R, H * Dh // G),
                    b + "attn_output_b.weight": (D, G * R), b + "ffn_norm.weight": (D,), b + "ffn_gate_inp.weight": (E, D),
                    b + "ffn_gate_exps.weight": (E, F, D), b + "ffn_up_exps.weight": (E, F, D),
                    b + "ffn_down_exps.weight": (E, D, F), b + "ffn_gate_shexp.weight": (F, D),
                    b + "ffn_up_shexp.weight": (F, D), b + "ffn_down_shexp.weight": (D, F)})
        for site in ("attn", "ffn"):
            out.update({b + f"hc_{site}_fn.weight": (mix, HC * D), b + f"hc_{site}_base.weight": (mix,),
                        b + f"hc_{site}_scale.weight": (3,)})
        if il < c["n_hash_layers"]:
            out[b + "ffn_gate_tid2eid.weight"] = (V, K)
        else:
            out[b + "exp_probs_b.bias"] = (E,)
        if ratio:
            w = 2 * Dh if ratio == 4 else Dh
            out.update({b + "attn_compressor_kv.weight": (w, D), b + "attn_compressor_gate.weight": (w, D),
                        b + "attn_compressor_ape.weight": (ratio, w), b + "attn_compressor_norm.weight": (Dh,)})
        if ratio == 4:
            out.update({b + "indexer.proj.weight": (HI, D), b + "indexer.attn_q_b.weight": (HI * Di, QL),
                        b + "indexer_compressor_kv.weight": (2 * Di, D), b + "indexer_compressor_gate.weight": (2 * Di, D),
                        b + "indexer_compressor_ape.weight": (4, 2 * Di), b + "indexer_compressor_norm.weight": (Di,)})
    return out


def official_tensors(c: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of the official checkpoint (test_convert's name map, §6.1 dtypes)."""
    st = []
    for gname, shape in gguf_shapes(c).items():
        if gname.startswith("blk."):
            _, il, local = gname.split(".", 2)
            prefix, (src, kind) = f"layers.{il}.", LAYER_SRC[local]
        else:
            prefix, (src, kind) = "", GLOBAL_SRC[gname]
        if kind == "fp8":
            base = prefix + src[: -len(".weight")]
            st += [(base + ".weight", "F8_E4M3", shape),
                   (base + ".scale", "F8_E8M0", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))]
        elif kind == "fp4":
            for e in range(shape[0]):
                base = f"{prefix}ffn.experts.{e}.{src}"
                st += [(base + ".weight", "I8", (shape[1], shape[2] // 2)),
                       (base + ".scale", "F8_E8M0", (shape[1], shape[2] // 32))]
        else:
            st.append((prefix + src, {"f32": "F32", "bf16": "BF16", "i64": "I64"}[kind], shape))
    return st


def write_sparse_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]]) -> int:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        f.truncate(8 + len(h) + off)    # the data: a hole
    return off


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("v4flash-headers")
    probe = d / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 30)
    if allocated(probe) > (1 << 20):
        pytest.skip(f"{d} has no sparse files (a 1 GiB hole took {allocated(probe)} bytes)")
    probe.unlink()
    tensors = official_tensors(REAL)
    shards = 46   # the official checkpoint's count; layers spread over them in order
    per = -(-len(tensors) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = tensors[i * per:(i + 1) * per]
        total += write_sparse_safetensors(d / name, chunk)
        weight_map.update({t[0]: name for t in chunk})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                               "weight_map": weight_map}))
    cfg = hf_config({**REAL, "yarn_beta_fast": 32.0}, 0)
    cfg["compress_ratios"] = REAL["compress_ratios"] + [0]           # 44 entries (the MTP block's last)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(REAL["n_vocab"]), ensure_ascii=False))
    assert total > 140e9 and sum(allocated(p) for p in d.iterdir()) < 64 << 20
    return d


@pytest.fixture(scope="module")
def full_gguf(checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("v4flash-gguf") / "v4flash-q8_0-q4_k.gguf"
    st = dsv4_ggml.convert.convert(checkpoint, out, outtype="q8_0", experts="q4_k", holes=True)
    return out, st


def test_convert_dry_run_plans_the_table_the_loader_expects(checkpoint, full_gguf):
    """The planned table (read from the checkpoint's headers only) is the written file's, and
    its names and shapes are exactly what the DSL (= llama.cpp's deepseek4 loader) expects for the
    real hyperparameters; the routed experts take --experts, the compressors their BF16."""
    from codegen.v4 import MODEL

    path, written = full_gguf
    t0 = time.perf_counter()
    st = dsv4_ggml.convert.convert(checkpoint, None, outtype="q8_0", experts="q4_k", dry_run=True)
    assert time.perf_counter() - t0 < 60 and st["path"] is None and not st["files"]
    assert st["table"] == written["table"]
    with dsv4_ggml.Model(path, n_ctx=1, repack=False) as m:
        expected = MODEL.expected_tensors(m.hparams)
        got = {t.name: (t.shape, t.type.lower()) for t in m.tensors}
    planned = {name: (ne, gtype.lower()) for name, ne, gtype, _ in st["table"]}
    assert planned == got
    assert set(planned) == {n for n, (_, _, required) in expected.items() if required}
    for name, (ne, _) in planned.items():
        want = expected[name][0]
        assert ne == want[:len(ne)] and all(x == 1 for x in want[len(ne):]), name
    types = {name: gtype for name, _, gtype, _ in st["table"]}
    assert {types[n] for n in types if "_exps." in n} == {"Q4_K"}
    assert types["blk.2.attn_compressor_kv.weight"] == "BF16" and types["token_embd.weight"] == "Q8_0"
    print(f"dry run: {st['tensors']} tensors, {st['data_bytes'] / 1e9:.1f} GB, {time.perf_counter() - t0:.1f} s")


def test_full_size_gguf_opens_fast_in_little_memory(full_gguf):
    path, st = full_gguf
    assert path.stat().st_size > 150e9 and allocated(path) < 64 << 20
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    with dsv4_ggml.Model(path, n_ctx=4096, repack=False) as m:
        opened = time.perf_counter() - t0
        grew = rss_bytes() - rss0
        hp = m.hparams
        assert (hp["n_layer"], hp["n_embd"], hp["n_head"], hp["head_dim"], hp["n_vocab"]) == (43, 4096, 64, 512, 129280)
        assert (hp["n_expert"], hp["n_expert_used"], hp["n_hash_layers"], hp["n_ctx_train"]) == (256, 6, 3, 1048576)
        assert list(hp["compress_ratios"][:43]) == REAL["compress_ratios"]
        assert all(t.placement == "mapped" for t in m.tensors) and not m.load_note
    print(f"{path.stat().st_size / 1e9:.1f} GB file ({allocated(path) / 2**20:.1f} MiB on disk): opened with a "
          f"4096-token session in {opened:.2f} s, RSS +{grew / 2**20:.0f} MiB")
    assert opened < 20 and grew < 1 << 30


def test_full_size_copies_stay_within_the_copy_limit(full_gguf):
    """repack (AMX or interleaved copies, routed experts included) would copy ~150 GB of this file;
    the copies stop at copy_limit (non-expert weights first), the rest stays mapped, and the
    model says so."""
    path, _ = full_gguf
    limit = 512 << 20
    rss0 = rss_bytes()
    with dsv4_ggml.Model(path, n_ctx=1, copy_limit=limit) as m:
        grew = rss_bytes() - rss0
        copied = [t for t in m.tensors if t.placement not in ("mapped", "ignored")]
        note = m.load_note
    assert copied and sum(t.nbytes for t in copied) <= limit
    assert "copy limit" in note and "read in place" in note
    assert grew < limit + (512 << 20)
    print(f"copy_limit {limit >> 20} MiB: {len(copied)} weights copied ({sum(t.nbytes for t in copied) / 2**20:.0f} "
          f"MiB), RSS +{grew / 2**20:.0f} MiB; note: {note}")


def test_inspect_prints_types_and_memory_up_to_1m_tokens(full_gguf):
    path, _ = full_gguf
    out = subprocess.run([sys.executable, "-m", "dsv4_ggml.cli", "inspect", str(path), "--ctx", "4096", "131072",
                          "1048576"], capture_output=True, text=True, timeout=300, check=True).stdout
    print(out)
    assert "43 layers" in out and "q4_k" in out and "q8_0" in out and "bf16" in out
    for n_ctx in ("4096", "131072", "1048576"):
        assert f"memory at n_ctx {n_ctx}: weights" in out
