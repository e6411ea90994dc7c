"""The checkpoint converter (dsv4_ggml.convert) on synthetic checkpoints in the official layout.

The checkpoints are written here, independently of the converter: safetensors files by hand (8-byte
header length, JSON header, raw bytes), FP8 e4m3 weights with UE8M0 128x128 block scales (ragged edge
blocks), FP4 e2m1 experts packed two per byte with UE8M0 scales per 32 inputs, BF16/F32 for the rest,
an I64 hash table, three shards and an index. Their float weights come from `write_tiny_model`
(the same dimensions, so key sets and tensor shapes can be compared), rounded onto the checkpoint's
formats; the values those formats represent ("truth", decoded here with lookup tables built from the
bit layouts) are also written straight into a GGUF ("direct") to compare logits with.

Measured logit errors per output type: OUTTYPE_BOUNDS. Peak memory: test_streaming_peak_rss_far_below_output_size.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

import dsv4_ggml
from dsv4_ggml import convert as conv
from dsv4_ggml.errors import (BadKeyError, CancelledError, FileError, InvalidArgumentError, MissingKeyError,
                              MissingTensorError, TensorShapeError, TensorTypeError, UnexpectedTensorError)
from dsv4_ggml.reference import Reference
from dsv4_ggml.tiny import write_tiny_model
from dsv4_ggml.tiny_vocab import BOS, EOS, CHAT_SPECIALS, build_vocab

REPO = Path(__file__).resolve().parent.parent
# no discrete selection (indexer keeps every block, every expert used): logit differences then
# measure weight precision, not near-tie flips (see tests/test_quant.py)
SMOOTH = dict(indexer_top_k=512, n_expert_used=8, expert_ff=256)
N_TOKENS = 200

# (outtype, experts) -> (bound, measured worst): engine logits on that conversion vs the engine on the
# f32 conversion, max|Δ|/max|logit| per position. The bf16 and f16 files hold the checkpoint's values
# exactly (bf16: bit for bit, see the lossless test; f16: to 4e-8 relative logits, BF16 sources with
# tiny magnitudes lose bits as F16 subnormals): their error is ggml rounding the activations to the
# weight type's dot-product type (F16/BF16; Q8_0 for MXFP4 experts, which adds ~5e-3 here). q8_0 adds
# the Q8_0 rounding of the FP8 weights (float64 reference on the q8_0 file vs the direct file: 3.0e-2).
OUTTYPE_BOUNDS = {
    ("bf16", "auto"): (1.3e-2, 9.6e-3),
    ("f16", "auto"): (8e-3, 5.8e-3),
    ("f16", "f16"): (1.2e-3, 7.8e-4),
    ("q8_0", "auto"): (4.5e-2, 3.5e-2),
    ("q8_0", "q8_0"): (4.5e-2, 3.7e-2),
    # K-quants of the Gaussian tiny weights (every projection, not only experts as real q2/q4 files
    # do): the weights' own rounding dominates. Their engine-vs-reference agreement on the same file
    # is asserted separately (K_QUANT_REF_BOUND).
    ("q4_k", "auto"): (0.45, 0.33),
    ("q2_k", "auto"): (1.5, 1.13),
}
K_QUANT_REF_BOUND = 5e-2   # engine vs the float64 reference on the same K-quant file (tests/test_quant.py)


def rel_err(a, ref):
    return np.abs(a - ref).max(axis=-1) / np.abs(ref).max(axis=-1)


# ------------------------------------------------------------------------------------------------
# independent decoders (tables built from the bit layouts, not from value lists)


def _e4m3_table() -> np.ndarray:
    out = np.empty(256, dtype=np.float32)
    for c in range(256):
        s, e, m = c >> 7, (c >> 3) & 0xF, c & 0x7
        if e == 15 and m == 7:
            out[c] = np.nan
        elif e == 0:   # subnormal: m/8 * 2^-6 = m * 2^-9, exact as a Python float
            out[c] = (-1.0 if s else 1.0) * m / 512.0
        else:          # normal: move exponent and mantissa into float32's fields
            out[c] = np.array([(s << 31) | ((e - 7 + 127) << 23) | (m << 20)], dtype=np.uint32).view(np.float32)[0]
    return out


def _e2m1_table() -> np.ndarray:
    out = np.empty(16, dtype=np.float32)
    for c in range(16):
        s, e, m = c >> 3, (c >> 1) & 0x3, c & 0x1
        mag = m * 0.5 if e == 0 else (1.0 + m / 2.0) * 2.0 ** (e - 1)
        out[c] = -mag if s else mag
    return out


E4M3 = _e4m3_table()
E2M1 = _e2m1_table()


def e8m0(s: np.ndarray) -> np.ndarray:
    """2^(s-127) through float32 bit patterns (s = 0 is the denormal 2^-127)."""
    s = np.asarray(s, dtype=np.uint32)
    return np.where(s == 0, np.uint32(1 << 22), s << np.uint32(23)).astype(np.uint32).view(np.float32)


def decode_fp8(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    out = E4M3[q].copy()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= e8m0(s[i, j])
    return out


def decode_fp4(packed: np.ndarray, s: np.ndarray) -> np.ndarray:
    n, half = packed.shape
    vals = np.empty((n, 2 * half), dtype=np.float32)
    vals[:, 0::2] = E2M1[packed & 0xF]
    vals[:, 1::2] = E2M1[packed >> 4]
    return vals * np.repeat(e8m0(s), 32, axis=1)


def decode_bf16(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------------------------------------
# encoders (only used to build checkpoints: the truth is what they decode to)


def _nearest(table_pos: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of an increasing table."""
    i = np.clip(np.searchsorted(table_pos, a), 1, len(table_pos) - 1)
    return np.where(np.abs(table_pos[i - 1] - a) <= np.abs(table_pos[i] - a), i - 1, i)


def encode_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out, n_in = w.shape
    gr, gc = -(-out // 128), -(-n_in // 128)
    s = np.empty((gr, gc), dtype=np.uint8)
    q = np.empty(w.shape, dtype=np.uint8)
    pos = E4M3[:127]   # codes 0x00..0x7E: increasing non-negative finite values
    for i in range(gr):
        for j in range(gc):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].astype(np.float64)
            amax = np.abs(blk).max()
            e = int(np.clip(math.ceil(math.log2(amax / 448.0)) + 127, 0, 254)) if amax > 0 else 127
            s[i, j] = e
            x = blk / 2.0 ** (e - 127)
            code = _nearest(pos.astype(np.float64), np.abs(x)).astype(np.uint8)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = code | np.where(x < 0, 0x80, 0).astype(np.uint8)
    return q, s


def encode_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out, n_in = w.shape
    blocks = w.reshape(out, n_in // 32, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1) / 6.0)) + 127, 127)
    s = np.clip(e, 0, 254).astype(np.uint8)
    x = blocks / np.exp2(s.astype(np.float64) - 127)[..., None]
    code = _nearest(E2M1[:8].astype(np.float64), np.abs(x)).astype(np.uint8) | np.where(x < 0, 8, 0).astype(np.uint8)
    code = code.reshape(out, n_in)
    return (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8), s


def encode_bf16(w: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


# ------------------------------------------------------------------------------------------------
# safetensors writing


def write_safetensors(path: Path, tensors: list[tuple[str, str, tuple, bytes]]) -> None:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header, ensure_ascii=False).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for _, _, _, data in tensors:
            f.write(data)


def patch_header(path: Path, fn) -> None:
    """Rewrites a safetensors header in place (same length, padded with spaces)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        fn(header)
        h = json.dumps(header, ensure_ascii=False).encode("utf-8")
        assert len(h) <= n
        f.seek(8)
        f.write(h + b" " * (n - len(h)))


# ------------------------------------------------------------------------------------------------
# the official layout (spec §2 "Source" columns, §6.1 dtypes), written out independently

GLOBAL_SRC = {
    "token_embd.weight": ("embed.weight", "bf16"),
    "output_norm.weight": ("norm.weight", "bf16"),
    "output.weight": ("head.weight", "bf16"),
    "output_hc_fn.weight": ("hc_head_fn", "f32"),
    "output_hc_base.weight": ("hc_head_base", "f32"),
    "output_hc_scale.weight": ("hc_head_scale", "f32"),
}
LAYER_SRC = {
    "attn_norm.weight": ("attn_norm.weight", "bf16"),
    "attn_sinks.weight": ("attn.attn_sink", "f32"),
    "attn_q_a.weight": ("attn.wq_a.weight", "fp8"),
    "attn_q_a_norm.weight": ("attn.q_norm.weight", "bf16"),
    "attn_q_b.weight": ("attn.wq_b.weight", "fp8"),
    "attn_kv.weight": ("attn.wkv.weight", "fp8"),
    "attn_kv_a_norm.weight": ("attn.kv_norm.weight", "bf16"),
    "attn_output_a.weight": ("attn.wo_a.weight", "fp8"),
    "attn_output_b.weight": ("attn.wo_b.weight", "fp8"),
    "hc_attn_fn.weight": ("hc_attn_fn", "f32"),
    "hc_attn_base.weight": ("hc_attn_base", "f32"),
    "hc_attn_scale.weight": ("hc_attn_scale", "f32"),
    "hc_ffn_fn.weight": ("hc_ffn_fn", "f32"),
    "hc_ffn_base.weight": ("hc_ffn_base", "f32"),
    "hc_ffn_scale.weight": ("hc_ffn_scale", "f32"),
    "attn_compressor_kv.weight": ("attn.compressor.wkv.weight", "bf16"),
    "attn_compressor_gate.weight": ("attn.compressor.wgate.weight", "bf16"),
    "attn_compressor_ape.weight": ("attn.compressor.ape", "f32"),
    "attn_compressor_norm.weight": ("attn.compressor.norm.weight", "bf16"),
    "indexer.proj.weight": ("attn.indexer.weights_proj.weight", "bf16"),
    "indexer.attn_q_b.weight": ("attn.indexer.wq_b.weight", "fp8"),
    "indexer_compressor_kv.weight": ("attn.indexer.compressor.wkv.weight", "bf16"),
    "indexer_compressor_gate.weight": ("attn.indexer.compressor.wgate.weight", "bf16"),
    "indexer_compressor_ape.weight": ("attn.indexer.compressor.ape", "f32"),
    "indexer_compressor_norm.weight": ("attn.indexer.compressor.norm.weight", "bf16"),
    "ffn_gate_inp.weight": ("ffn.gate.weight", "bf16"),
    "ffn_gate_tid2eid.weight": ("ffn.gate.tid2eid", "i64"),
    "exp_probs_b.bias": ("ffn.gate.bias", "f32"),
    "ffn_norm.weight": ("ffn_norm.weight", "bf16"),
    "ffn_gate_exps.weight": ("w1", "fp4"),
    "ffn_up_exps.weight": ("w3", "fp4"),
    "ffn_down_exps.weight": ("w2", "fp4"),
    "ffn_gate_shexp.weight": ("ffn.shared_experts.w1.weight", "fp8"),
    "ffn_up_shexp.weight": ("ffn.shared_experts.w3.weight", "fp8"),
    "ffn_down_shexp.weight": ("ffn.shared_experts.w2.weight", "fp8"),
    "nextn.enorm.weight": ("enorm.weight", "bf16"),
    "nextn.hnorm.weight": ("hnorm.weight", "bf16"),
    "nextn.shared_head_norm.weight": ("norm.weight", "bf16"),
    "nextn.eh_proj.weight": (None, "fp8"),   # split into e_proj / h_proj
}


def hf_config(cfg: dict, n_mtp: int) -> dict:
    """config.json with the HF key names of spec §1.1 for a write_tiny_model configuration."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg["n_vocab"], "hidden_size": cfg["n_embd"], "num_hidden_layers": cfg["n_layer"],
        "num_nextn_predict_layers": n_mtp, "num_attention_heads": cfg["n_head"], "num_key_value_heads": 1,
        "head_dim": cfg["head_dim"], "qk_rope_head_dim": cfg["n_rot"], "q_lora_rank": cfg["q_lora_rank"],
        "o_groups": cfg["o_groups"], "o_lora_rank": cfg["o_lora_rank"], "sliding_window": cfg["n_swa"],
        "compress_ratios": list(cfg["compress_ratios"]) + [0, 0, 0],   # longer than needed, like -0731
        "rope_theta": cfg["rope_freq_base"], "compress_rope_theta": cfg["compress_rope_freq_base"],
        "rope_scaling": {"type": "yarn", "factor": cfg["rope_scaling_factor"],
                         "original_max_position_embeddings": cfg["rope_orig_ctx"], "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": cfg["context_length"], "n_routed_experts": cfg["n_expert"],
        "n_shared_experts": cfg["n_expert_shared"], "num_experts_per_tok": cfg["n_expert_used"],
        "moe_intermediate_size": cfg["expert_ff"], "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
        "norm_topk_prob": True, "routed_scaling_factor": cfg["expert_weights_scale"],
        "num_hash_layers": cfg["n_hash_layers"], "swiglu_limit": cfg["swiglu_limit"],
        "index_n_heads": cfg["indexer_n_head"], "index_head_dim": cfg["indexer_head_dim"],
        "index_topk": cfg["indexer_top_k"], "hc_mult": cfg["hc_mult"], "hc_sinkhorn_iters": cfg["hc_sinkhorn_iters"],
        "hc_eps": cfg["hc_eps"], "rms_norm_eps": cfg["norm_eps"], "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16", "expert_dtype": "fp4",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }


def tokenizer_json(n_vocab: int) -> dict:
    v = build_vocab(n_vocab)
    added_set = {BOS, EOS, *CHAT_SPECIALS}
    added, vocab = [], {}
    for i, (t, ty) in enumerate(zip(v.tokens, v.token_types)):
        if t in added_set or t.startswith("<｜pad"):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": t in added_set})
        vocab[t] = i
    return {"version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": []},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "vocab": vocab,
                      "merges": [m.split(" ") for m in v.merges]}}


def _gguf_arrays(path) -> dict[str, np.ndarray]:
    r = GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in r.tensors}


def build_checkpoint(d: Path, cfg: dict, arrays: dict[str, np.ndarray], n_shards: int = 3,
                     extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Writes the official-layout checkpoint of `arrays` (GGUF names, NumPy shapes) into `d` and
    returns the truth: every GGUF tensor as the checkpoint represents it (float32 / int32)."""
    d.mkdir(parents=True, exist_ok=True)
    n_layer = cfg["n_layer"]
    n_mtp = sum(1 for k in arrays if k.startswith(f"blk.{n_layer}.nextn.eh_proj"))
    st: list[tuple[str, str, tuple, bytes]] = []
    truth: dict[str, np.ndarray] = {}

    def fp8(name, w):
        q, s = encode_fp8(w)
        st.append((name + ".weight", "F8_E4M3", q.shape, q.tobytes()))
        st.append((name + ".scale", "F8_E8M0", s.shape, s.tobytes()))
        return decode_fp8(q, s)

    for gname, w in arrays.items():
        if gname.startswith("blk."):
            _, il, local = gname.split(".", 2)
            prefix = "mtp.0." if int(il) >= n_layer else f"layers.{il}."
            src, kind = LAYER_SRC[local]
        else:
            prefix = ""
            src, kind = GLOBAL_SRC[gname]
        if kind == "f32":
            st.append((prefix + src, "F32", w.shape, w.astype(np.float32).tobytes()))
            truth[gname] = w.astype(np.float32)
        elif kind == "bf16":
            b = encode_bf16(w)
            st.append((prefix + src, "BF16", w.shape, b.tobytes()))
            truth[gname] = decode_bf16(b)
        elif kind == "i64":
            st.append((prefix + src, "I64", w.shape, w.astype(np.int64).tobytes()))
            truth[gname] = w.astype(np.int32)
        elif kind == "fp8" and src is None:   # MTP eh_proj = [e_proj | h_proj] along the input axis
            D = w.shape[0]
            truth[gname] = np.concatenate([fp8(prefix + "e_proj", w[:, :D]), fp8(prefix + "h_proj", w[:, D:])], axis=1)
        elif kind == "fp8":
            truth[gname] = fp8(prefix + src[: -len(".weight")], w)
        elif kind == "fp4":
            dec = []
            for e in range(w.shape[0]):
                p, s = encode_fp4(w[e])
                base = f"{prefix}ffn.experts.{e}.{src}"
                st.append((base + ".weight", "I8", p.shape, p.tobytes()))
                st.append((base + ".scale", "F8_E8M0", s.shape, s.tobytes()))
                dec.append(decode_fp4(p, s))
            truth[gname] = np.stack(dec)
        else:
            raise AssertionError(kind)
    for name, w in (extra or {}).items():
        st.append((name, "F32", w.shape, w.astype(np.float32).tobytes()))

    # shards: spread by a hash of the name, so a weight and its .scale are often in different files
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    per = [[] for _ in range(n_shards)]
    for t in st:
        per[sum(t[0].encode()) % n_shards].append(t)
    weight_map = {}
    for f, ts in zip(files, per):
        write_safetensors(d / f, ts)
        weight_map.update({t[0]: f for t in ts})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(len(t[3]) for t in st)}, "weight_map": weight_map}, indent=1))
    (d / "config.json").write_text(json.dumps(hf_config(cfg, n_mtp), indent=1))
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(cfg["n_vocab"]), ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": BOS, "eos_token": EOS}))
    return truth


def write_direct(path: Path, like: Path, truth: dict[str, np.ndarray]) -> None:
    """A GGUF with `like`'s metadata and the truth tensors (all F32, tid2eid I32)."""
    r = GGUFReader(str(like))
    w = GGUFWriter(str(path), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1] if vt == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(truth[t.name]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_checkpoint(d: Path, seed: int = 0, extra=None, **overrides):
    """(config dict, tiny GGUF path, truth) for a write_tiny_model configuration."""
    d.mkdir(parents=True, exist_ok=True)
    tiny = d.parent / f"{d.name}-tiny.gguf"
    cfg = write_tiny_model(tiny, seed=seed, **overrides)
    truth = build_checkpoint(d, cfg, _gguf_arrays(tiny), extra=extra)
    return cfg, tiny, truth


def _convert(src, out, **kw):
    st = conv.convert(src, out, **kw)
    print(f"convert {kw}: {st['tensors']} tensors, {st['bytes'] / 1024:.0f} KiB, {st['seconds']:.2f} s, "
          f"types {st['types']}, peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB")
    return st


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    """The smooth tiny model as a checkpoint, its direct GGUF and its f32 conversion."""
    root = tmp_path_factory.mktemp("convert")
    ck = root / "ckpt"
    cfg, tiny, truth = tiny_checkpoint(ck, seed=0, **SMOOTH)
    direct = root / "direct.gguf"
    write_direct(direct, tiny, truth)
    f32 = root / "f32.gguf"
    st = _convert(ck, f32, outtype="f32")
    toks = np.random.default_rng(5).integers(2, cfg["n_vocab"], N_TOKENS)
    return dict(root=root, ckpt=ck, cfg=cfg, tiny=tiny, truth=truth, direct=direct, f32=f32, stats=st, toks=toks,
                ref=Reference(direct).eval(toks))


@pytest.fixture(scope="module")
def f32_engine_logits(smooth):
    return dsv4_ggml.Model(smooth["f32"], n_ctx=512, cache_type="f32").eval(smooth["toks"])


# ------------------------------------------------------------------------------------------------
# (a) decoders: bit-exact against the independent tables


def test_fp8_e4m3_table_bit_exact():
    finite = ~np.isnan(E4M3)
    assert finite.sum() == 254
    assert np.array_equal(conv.FP8_E4M3_VALUES[finite].view(np.uint32), E4M3[finite].view(np.uint32))
    assert np.isnan(conv.FP8_E4M3_VALUES[~finite]).all()
    assert E4M3[0x7E] == 448 and E4M3[0x01] == 2.0 ** -9 and E4M3[0x38] == 1.0


def test_fp8_block_dequant_bit_exact_with_ragged_blocks():
    rng = np.random.default_rng(1)
    codes = np.setdiff1d(np.arange(256), [0x7F, 0xFF]).astype(np.uint8)
    q = rng.choice(codes, size=(300, 200))          # 3 x 2 scale blocks, both edges ragged
    q.flat[:254] = codes                            # every finite code, subnormals and -0 included
    s = rng.integers(0, 247, size=(3, 2)).astype(np.uint8)   # 448 * 2^(246-127) still fits float32
    s[0, 0], s[2, 1] = 0, 246
    want = decode_fp8(q, s)
    got = conv.dequant_fp8(q, conv.e8m0_to_f32(s))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # row blocks starting inside a scale block (how the converter streams rows)
    parts = [conv.dequant_fp8(q[a:b], conv.e8m0_to_f32(s), a) for a, b in ((0, 77), (77, 130), (130, 300))]
    assert np.array_equal(np.concatenate(parts).view(np.uint32), want.view(np.uint32))


def test_fp4_dequant_and_mxfp4_repack_bit_exact():
    rng = np.random.default_rng(2)
    packed = rng.integers(0, 256, size=(64, 128)).astype(np.uint8)   # 64 rows of 256 values
    packed[0, :128] = np.arange(256).reshape(128, 2)[:, 0] | (np.arange(256).reshape(128, 2)[:, 1] & 0xF0)
    s = rng.integers(0, 253, size=(64, 8)).astype(np.uint8)   # 6 * 2^(252-127) fits float32
    s[0, 0], s[1, 0] = 0, 252
    want = decode_fp4(packed, s)
    got = conv.dequant_fp4(packed, s)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # MXFP4: gguf's own dequantizer (ggml's kvalues_mxfp4 and E8M0 half scale) gives the same values;
    # bit patterns agree except e2m1 code 8 (-0), which ggml's int8 table stores as +0
    mx = conv.fp4_to_mxfp4(packed, s)
    assert mx.shape == (64, 8 * 17)
    back = gguf_quants.dequantize(mx, GGMLQuantizationType.MXFP4)
    assert np.array_equal(back, want)
    assert np.array_equal(back.view(np.uint32), (want + np.float32(0)).view(np.uint32))


def test_converted_tensors_equal_the_checkpoint_values(smooth):
    """The f32 conversion holds exactly what the checkpoint encodes (FP8 blocks with ragged edges,
    FP4 experts, BF16, F32, the I64 hash table), tensor by tensor, bit for bit."""
    got = {t.name: t for t in GGUFReader(str(smooth["f32"])).tensors}
    truth = smooth["truth"]
    assert set(got) == set(truth)
    for name, want in truth.items():
        t = got[name]
        assert t.tensor_type == (GGMLQuantizationType.I32 if want.dtype == np.int32 else GGMLQuantizationType.F32), name
        data = np.array(t.data)
        assert data.shape == want.shape, name
        assert np.array_equal(data.view(np.uint32), want.view(np.uint32)), name


def _all_tensors(path):
    return {t.name: (t.tensor_type, np.array(t.data)) for t in GGUFReader(str(path)).tensors}


def _same_tensors(a, b):
    ta, tb = _all_tensors(a), _all_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k][0] == tb[k][0] and np.array_equal(ta[k][1].view(np.uint8), tb[k][1].view(np.uint8)), k


def test_single_file_checkpoint_and_f4_dtype(smooth, tmp_path):
    """One model.safetensors without an index, with an expert stored as safetensors dtype F4 (shape in
    4-bit elements) instead of I8 bytes: same GGUF as from the sharded I8 checkpoint."""
    ck = tmp_path / "single"
    shutil.copytree(smooth["ckpt"], ck)
    tensors = []
    for shard in sorted(ck.glob("model-*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = f.read()
        for name, d in header.items():
            if name == "__metadata__":
                continue
            b, e = d["data_offsets"]
            dtype, shape = d["dtype"], tuple(d["shape"])
            if name == "layers.3.ffn.experts.6.w2.weight":
                dtype, shape = "F4", (shape[0], shape[1] * 2)
            tensors.append((name, dtype, shape, data[b:e]))
        shard.unlink()
    (ck / "model.safetensors.index.json").unlink()
    write_safetensors(ck / "model.safetensors", tensors)
    out = tmp_path / "single.gguf"
    _convert(ck, out, outtype="f32")
    _same_tensors(out, smooth["f32"])


# ------------------------------------------------------------------------------------------------
# (b) logits


def test_f32_conversion_logits_equal_direct_weights(smooth, f32_engine_logits):
    ref_conv = Reference(smooth["f32"]).eval(smooth["toks"])
    assert np.array_equal(ref_conv, smooth["ref"])     # same weights, same float64 reference: identical
    err = rel_err(f32_engine_logits, smooth["ref"])
    print(f"engine on the f32 conversion vs reference on the direct file: worst {err.max():.2e}")
    assert err.max() < 1e-4
    assert (f32_engine_logits.argmax(1) == smooth["ref"].argmax(1)).all()


@pytest.mark.parametrize("outtype,experts", [("bf16", "auto"), ("f32", "mxfp4")])
def test_lossless_conversions_give_identical_reference_logits(smooth, outtype, experts):
    """BF16 holds FP8 values (3-bit mantissa) and BF16 sources exactly, and MXFP4 is a bit move:
    the float64 reference on these files computes exactly what it computes on the direct file."""
    path = smooth["root"] / f"lossless-{outtype}-{experts}.gguf"
    st = _convert(smooth["ckpt"], path, outtype=outtype, experts=experts)
    assert "MXFP4" in st["types"] and st["experts"] == "MXFP4"
    assert np.array_equal(Reference(path).eval(smooth["toks"]), smooth["ref"])


@pytest.mark.parametrize("outtype,experts", list(OUTTYPE_BOUNDS))
def test_outtype_logit_error_vs_f32_conversion(smooth, f32_engine_logits, outtype, experts):
    path = smooth["root"] / f"{outtype}-{experts}.gguf"
    st = _convert(smooth["ckpt"], path, outtype=outtype, experts=experts)
    tensors = GGUFReader(str(path)).tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    row = {t.name: int(t.shape[0]) for t in tensors}
    # experts="auto" with FP4 experts: the lossless MXFP4 repack
    assert types["blk.1.ffn_gate_exps.weight"] == ("MXFP4" if experts == "auto" else experts.upper())
    # K-quant blocks hold 256 values: shorter rows fall back to Q8_0 (as llama-quantize does)
    k_fallback = outtype in ("q4_k", "q2_k") and row["blk.1.attn_q_b.weight"] % 256
    assert types["blk.1.attn_q_b.weight"] == ("Q8_0" if k_fallback else outtype.upper())
    assert types["token_embd.weight"] == outtype.upper()
    assert types["blk.1.hc_attn_fn.weight"] == types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert types["blk.1.attn_compressor_ape.weight"] == types["blk.2.exp_probs_b.bias"] == "F32"
    assert types["blk.1.attn_compressor_kv.weight"] == ("F16" if outtype == "f16" else "BF16")
    assert types["blk.0.ffn_gate_tid2eid.weight"] == "I32"
    got = dsv4_ggml.Model(path, n_ctx=512, cache_type="f32").eval(smooth["toks"])
    err = rel_err(got, f32_engine_logits)
    bound, measured = OUTTYPE_BOUNDS[outtype, experts]
    agree = (got.argmax(1) == f32_engine_logits.argmax(1)).mean()
    f32_size = smooth["stats"]["bytes"]
    print(f"{outtype} experts={experts}: {st['bytes'] / 1024:.0f} KiB ({st['bytes'] / f32_size:.2f} of f32), "
          f"vs the f32 conversion "
          f"over {N_TOKENS} tokens: worst {err.max():.2e} (measured {measured:.1e}), median {np.median(err):.2e}, "
          f"argmax {agree:.1%}")
    assert err.max() < bound
    if outtype in ("q4_k", "q2_k"):
        ref_err = rel_err(got, Reference(path).eval(smooth["toks"]))
        print(f"  {outtype}: engine vs the float64 reference on this file: worst {ref_err.max():.2e}")
        assert ref_err.max() < K_QUANT_REF_BOUND
    else:
        assert agree > 0.9


# ------------------------------------------------------------------------------------------------
# (c) metadata and tensor layout equal write_tiny_model's


def _fields(path):
    r = GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}


@pytest.mark.parametrize("variant", ["default", "mtp"])
def test_layout_matches_write_tiny_model(tmp_path, variant):
    over = {"n_mtp_layers": 1} if variant == "mtp" else {}
    # extra checkpoint tensors the GGUF has no slot for: the MTP block's own HC head, and a router
    # bias on a hash-routed layer (unused there; llama.cpp drops it too)
    hc_head = {f"mtp.0.hc_head_{k}": np.ones(s, np.float32) for k, s in (("fn", (4, 1024)), ("base", (4,)),
                                                                        ("scale", (1,)))} if over else {}
    extra = {**hc_head, "layers.0.ffn.gate.bias": np.zeros(8, np.float32)}
    cfg, tiny, _ = tiny_checkpoint(tmp_path / "ckpt", seed=3, extra=extra, **over)
    out = tmp_path / "out.gguf"
    st = _convert(tmp_path / "ckpt", out, outtype="q8_0", mtp=bool(over))
    want_f, want_t = _fields(tiny)
    got_f, got_t = _fields(out)
    assert set(got_f) == set(want_f)
    for k in want_f:
        assert got_f[k].types == want_f[k].types, k
        if k == "tokenizer.ggml.token_type":
            continue
        a, b = got_f[k].contents(), want_f[k].contents()
        assert a == b or (isinstance(a, float) and np.float32(a) == np.float32(b)), k
    # token types: llama.cpp's rules (added special or <｜…｜>-looking: CONTROL 3) vs the tiny writer's
    # 5 for its <｜padN｜> fillers; all other ids agree
    a, b = got_f["tokenizer.ggml.token_type"].contents(), want_f["tokenizer.ggml.token_type"].contents()
    tokens = want_f["tokenizer.ggml.tokens"].contents()
    diff = [tokens[i] for i in range(len(a)) if a[i] != b[i]]
    assert all(t.startswith("<｜pad") for t in diff)
    assert got_t == want_t
    assert sorted(st["skipped"]) == sorted(extra)
    if over:   # the same checkpoint without --mtp: the trunk file, every mtp.* tensor skipped
        trunk = tmp_path / "trunk.gguf"
        st2 = _convert(tmp_path / "ckpt", trunk, outtype="q8_0")
        f2, t2 = _fields(trunk)
        assert t2 == {n: s for n, s in want_t.items() if not n.startswith(f"blk.{cfg['n_layer']}.")}
        assert f2["deepseek4.block_count"].contents() == cfg["n_layer"] and "deepseek4.nextn_predict_layers" not in f2
        assert any(n.startswith("mtp.0.") for n in st2["skipped"])
        assert all(n.startswith("mtp.") or n in extra for n in st2["skipped"])
    m = dsv4_ggml.Model(out, n_ctx=64)
    assert m.hparams["n_nextn"] == (1 if over else 0)
    logits = m.eval([0, 5, 9, 300])
    assert np.isfinite(logits).all()


def test_chat_template_is_written_when_present(smooth, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(smooth["ckpt"], ck)
    (ck / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    out = tmp_path / "t.gguf"
    _convert(ck, out, outtype="q8_0")
    f, _ = _fields(out)
    assert f["tokenizer.chat_template"].contents().startswith("{{ bos_token }}")
    assert "tokenizer.chat_template" not in _fields(smooth["f32"])[0]


# ------------------------------------------------------------------------------------------------
# (d) streaming: peak memory stays far below the converted size

BIG = dict(n_vocab=512, n_embd=512, n_layer=2, compress_ratios=[0, 128], n_hash_layers=1, n_head=4,
           head_dim=128, n_rot=64, q_lora_rank=64, o_groups=2, o_lora_rank=32, n_swa=32, indexer_n_head=16,
           indexer_head_dim=128, indexer_top_k=8, n_expert=32, n_expert_used=2, n_expert_shared=1,
           expert_ff=1024, expert_weights_scale=1.5, swiglu_limit=1.0, hc_mult=4, hc_sinkhorn_iters=20,
           hc_eps=1e-6, norm_eps=1e-6, rope_freq_base=1e4, compress_rope_freq_base=1.6e5, rope_scaling_factor=16.0,
           rope_orig_ctx=65536, context_length=4096)


def _big_checkpoint(d: Path) -> int:
    """A checkpoint with 100 MiB of routed experts (2 layers x 3 x 32 experts x 1024 x 512 FP4 values,
    written as random codes), built without ever materialising them as floats. Returns the number
    of expert values."""
    rng = np.random.default_rng(7)
    c = BIG
    D, E, F = c["n_embd"], c["n_expert"], c["expert_ff"]
    small = {}
    mix, HC = 24, 4

    def mat(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    small.update({"token_embd.weight": mat(512, D), "output_norm.weight": np.ones(D, np.float32),
                  "output.weight": mat(512, D), "output_hc_fn.weight": mat(HC, HC * D),
                  "output_hc_base.weight": np.zeros(HC, np.float32), "output_hc_scale.weight": np.ones(1, np.float32)})
    for il in range(2):
        b = f"blk.{il}."
        small.update({b + "attn_norm.weight": np.ones(D, np.float32), b + "attn_sinks.weight": np.zeros(4, np.float32),
                      b + "attn_q_a.weight": mat(64, D), b + "attn_q_a_norm.weight": np.ones(64, np.float32),
                      b + "attn_q_b.weight": mat(512, 64), b + "attn_kv.weight": mat(128, D),
                      b + "attn_kv_a_norm.weight": np.ones(128, np.float32), b + "attn_output_a.weight": mat(64, 256),
                      b + "attn_output_b.weight": mat(D, 64), b + "ffn_norm.weight": np.ones(D, np.float32),
                      b + "ffn_gate_inp.weight": mat(E, D), b + "ffn_gate_shexp.weight": mat(F, D),
                      b + "ffn_up_shexp.weight": mat(F, D), b + "ffn_down_shexp.weight": mat(D, F)})
        for site in ("attn", "ffn"):
            small.update({b + f"hc_{site}_fn.weight": mat(mix, HC * D),
                          b + f"hc_{site}_base.weight": np.zeros(mix, np.float32),
                          b + f"hc_{site}_scale.weight": np.ones(3, np.float32)})
        if il == 0:
            small[b + "ffn_gate_tid2eid.weight"] = rng.integers(0, E, (512, 2))
        else:
            small[b + "exp_probs_b.bias"] = np.zeros(E, np.float32)
            small.update({b + "attn_compressor_kv.weight": mat(128, D), b + "attn_compressor_gate.weight": mat(128, D),
                          b + "attn_compressor_ape.weight": mat(128, 128),
                          b + "attn_compressor_norm.weight": np.ones(128, np.float32)})
    d.mkdir(parents=True)
    build_checkpoint(d, {**c, "n_layer": 2}, small, n_shards=1)
    # the experts: one extra shard of random FP4 codes and scales, added to the index
    index = json.loads((d / "model.safetensors.index.json").read_text())
    st = []
    for il in range(2):
        for proj, (out, n_in) in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):
            for e in range(E):
                base = f"layers.{il}.ffn.experts.{e}.{proj}"
                st.append((base + ".weight", "I8", (out, n_in // 2),
                           rng.integers(0, 256, out * n_in // 2, dtype=np.uint8).tobytes()))
                st.append((base + ".scale", "F8_E8M0", (out, n_in // 32),
                           rng.integers(118, 124, out * n_in // 32, dtype=np.uint8).tobytes()))
    write_safetensors(d / "experts.safetensors", st)
    index["weight_map"].update({t[0]: "experts.safetensors" for t in st})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return 2 * 3 * E * F * D


def test_streaming_peak_rss_far_below_output_size(tmp_path):
    ck = tmp_path / "big"
    n_values = _big_checkpoint(ck)
    out = tmp_path / "big-f32.gguf"
    code = ("import json, sys; from dsv4_ggml.convert import convert, rss_bytes; "
            "st = convert(sys.argv[1], sys.argv[2], outtype='f32', experts='f32'); "
            "st.pop('skipped'); print(json.dumps(st))")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, str(ck), str(out)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout.strip().splitlines()[-1])
    size = out.stat().st_size
    assert size > n_values * 4      # the experts alone are 4 bytes per value in the f32 file
    grown = st["peak_rss_bytes"] - st["rss_start_bytes"]
    print(f"big checkpoint: {n_values * 0.5 / 2**20:.0f} MiB of FP4 experts -> {size / 2**20:.0f} MiB f32 GGUF in "
          f"{st['seconds']:.1f} s; RSS at start {st['rss_start_bytes'] / 2**20:.0f} MiB, peak "
          f"{st['peak_rss_bytes'] / 2**20:.0f} MiB (+{grown / 2**20:.0f} MiB, {grown / size:.1%} of the output)")
    assert grown < 0.15 * size
    assert st["peak_rss_bytes"] < 400 << 20
    # the expert stacking order and the values: one expert checked against the independent decoder
    r = GGUFReader(str(out))
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down_exps.weight")
    assert tuple(int(x) for x in t.shape) == (BIG["expert_ff"], BIG["n_embd"], BIG["n_expert"])
    from dsv4_ggml.convert import Checkpoint
    c = Checkpoint(ck)
    try:
        want = decode_fp4(c.read("layers.1.ffn.experts.17.w2.weight").view(np.uint8),
                          c.read("layers.1.ffn.experts.17.w2.scale"))
    finally:
        c.close()
    assert np.array_equal(np.array(t.data[17]), want)


# ------------------------------------------------------------------------------------------------
# (e) broken checkpoints


@pytest.fixture
def broken(smooth, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(smooth["ckpt"], ck)
    return ck


def _index(ck):
    return json.loads((ck / "model.safetensors.index.json").read_text())


def _edit_index(ck, edit) -> None:
    """Rewrites the checkpoint's index with `edit` applied to its weight_map."""
    idx = _index(ck)
    edit(idx["weight_map"])
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))


def _expect(ck, tmp_path, exc, match, **kw):
    out = tmp_path / "out.gguf"
    with pytest.raises(exc, match=match):
        conv.convert(ck, out, **kw)
    assert not out.exists() and not (tmp_path / "out.gguf.part").exists()


def test_missing_shard(broken, tmp_path):
    (broken / "model-00002-of-00003.safetensors").unlink()
    _expect(broken, tmp_path, FileError, "model-00002-of-00003.safetensors")


def test_missing_tensor(broken, tmp_path):
    _edit_index(broken, lambda m: m.pop("layers.3.attn.wkv.weight"))
    _expect(broken, tmp_path, MissingTensorError, r"layers\.3\.attn\.wkv\.weight")


def test_missing_fp8_scale(broken, tmp_path):
    _edit_index(broken, lambda m: m.pop("layers.2.ffn.shared_experts.w2.scale"))
    _expect(broken, tmp_path, MissingTensorError, r"layers\.2\.ffn\.shared_experts\.w2\.scale")


def test_missing_expert(broken, tmp_path):
    _edit_index(broken, lambda m: m.pop("layers.4.ffn.experts.5.w3.weight"))
    _expect(broken, tmp_path, MissingTensorError, r"layers\.4\.ffn\.experts\.5\.w3\.weight")


def test_index_names_tensor_absent_from_shard(broken, tmp_path):
    _edit_index(broken, lambda m: m.__setitem__("layers.0.attn.extra.weight", "model-00001-of-00003.safetensors"))
    _expect(broken, tmp_path, MissingTensorError, r"layers\.0\.attn\.extra\.weight")


def test_missing_index_and_shards(tmp_path):
    ck = tmp_path / "empty"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    _expect(ck, tmp_path, MissingKeyError, "vocab_size")
    shutil.rmtree(ck)
    _expect(ck, tmp_path, FileError, "no config.json")


def test_no_safetensors_at_all(broken, tmp_path):
    for f in broken.glob("*.safetensors"):
        f.unlink()
    (broken / "model.safetensors.index.json").unlink()
    _expect(broken, tmp_path, FileError, "neither model.safetensors.index.json nor any .safetensors")


def test_shape_mismatch_against_config(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["q_lora_rank"] = 32
    (broken / "config.json").write_text(json.dumps(cfg))
    _expect(broken, tmp_path, TensorShapeError, r"layers\.0\.attn\.wq_a\.weight.*\[32, 256\]")


def test_unknown_dtype(broken, tmp_path):
    name = "layers.1.attn.wq_b.weight"
    shard = broken / _index(broken)["weight_map"][name]
    patch_header(shard, lambda h: h[name].update(dtype="F8_E5M2"))
    _expect(broken, tmp_path, TensorTypeError, "F8_E5M2")


def test_renamed_tensor_in_shard_header(broken, tmp_path):
    """A shard whose header names a tensor differently from the converter's table: the expected
    name is reported missing, the stray one never silently used."""
    old, new = "layers.3.attn.attn_sink", "layers.3.attn.surprise"
    patch_header(broken / _index(broken)["weight_map"][old], lambda h: h.__setitem__(new, h.pop(old)))
    _edit_index(broken, lambda m: m.__setitem__(new, m.pop(old)))
    _expect(broken, tmp_path, MissingTensorError, r"layers\.3\.attn\.attn_sink")


def test_unmapped_tensor_is_rejected(broken, tmp_path):
    # an extra tensor the converter does not know (a new checkpoint variant) is an error, not dropped
    w = broken / "extra.safetensors"
    write_safetensors(w, [("layers.2.attn.new_thing", "F32", (4,), np.zeros(4, np.float32).tobytes())])
    _edit_index(broken, lambda m: m.__setitem__("layers.2.attn.new_thing", "extra.safetensors"))
    _expect(broken, tmp_path, UnexpectedTensorError, r"layers\.2\.attn\.new_thing")


def test_truncated_shard(broken, tmp_path):
    shard = broken / "model-00003-of-00003.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    _expect(broken, tmp_path, dsv4_ggml.CorruptFileError, "outside the file")


def test_bad_options_and_config(broken, tmp_path):
    _expect(broken, tmp_path, InvalidArgumentError, "outtype", outtype="q4_0")
    _expect(broken, tmp_path, InvalidArgumentError, "experts", experts="iq2_xxs")
    _expect(broken, tmp_path, InvalidArgumentError, "num_nextn_predict_layers", mtp=True)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["scoring_func"] = "softmax"
    (broken / "config.json").write_text(json.dumps(cfg))
    _expect(broken, tmp_path, BadKeyError, "scoring_func")


def test_progress_and_cancel(smooth, tmp_path):
    seen = []
    st = conv.convert(smooth["ckpt"], tmp_path / "a.gguf", outtype="q8_0", progress=lambda f: seen.append(f))
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    assert st["tensors"] == len(GGUFReader(str(tmp_path / "a.gguf")).tensors)
    _expect(smooth["ckpt"], tmp_path, CancelledError, "cancel", progress=lambda f: f < 0.5)


def test_split_conversion_equals_the_single_file(smooth, f32_engine_logits, tmp_path, capsys):
    """--split-max-tensors / --split-max-size: parts named and keyed as llama.cpp's gguf-split writes
    them (tests/test_split.py), holding the single file's tensors, with its logits."""
    n = smooth["stats"]["tensors"]
    st = _convert(smooth["ckpt"], tmp_path / "t.gguf", outtype="f32", split_max_tensors=-(-n // 3))
    assert st["files"] == [str(tmp_path / f"t-{i:05d}-of-00003.gguf") for i in (1, 2, 3)] and st["path"] == st["files"][0]
    assert st["bytes"] == sum(Path(f).stat().st_size for f in st["files"])
    assert not list(tmp_path.glob("*part*"))
    merged = {}
    for i, f in enumerate(st["files"]):
        r = GGUFReader(f)
        assert [r.fields[k].contents() for k in ("split.no", "split.count", "split.tensors.count")] == [i, 3, n]
        merged.update((t.name, (t.tensor_type, np.array(t.data))) for t in r.tensors)
    single = _all_tensors(smooth["f32"])
    assert merged.keys() == single.keys()
    assert all(merged[k][0] == single[k][0] and np.array_equal(merged[k][1], single[k][1]) for k in single)
    m = dsv4_ggml.Model(st["files"][2], n_ctx=512, cache_type="f32")
    assert m.files == st["files"]
    assert np.array_equal(m.eval(smooth["toks"]), f32_engine_logits)
    m.close()
    # by size, through the command line; a limit the model fits under writes one plain file
    data = smooth["stats"]["data_bytes"]
    from dsv4_ggml.cli import main as cli_main
    assert cli_main(["convert", str(smooth["ckpt"]), str(tmp_path / "s.gguf"), "--outtype", "f32",
                     "--split-max-size", str(data // 2 + 1)]) == 0
    names = sorted(p.name for p in tmp_path.glob("s*"))
    k = len(names)
    assert k >= 2 and names == [f"s-{i:05d}-of-{k:05d}.gguf" for i in range(1, k + 1)]
    assert f"in {k} parts" in capsys.readouterr().out
    one = _convert(smooth["ckpt"], tmp_path / "one.gguf", outtype="f32", split_max_size=2 * data)
    assert one["files"] == [str(tmp_path / "one.gguf")]
    assert (tmp_path / "one.gguf").read_bytes() == Path(smooth["f32"]).read_bytes()


def test_inference_config_fallback_and_cli(smooth, tmp_path, capsys):
    """config.json with keys missing is completed from inference/config.json (ModelArgs names)."""
    ck = tmp_path / "ck"
    shutil.copytree(smooth["ckpt"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    moved = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "sliding_window": "window_size",
             "moe_intermediate_size": "moe_inter_dim", "rms_norm_eps": "norm_eps"}
    inf = {new: cfg.pop(old) for old, new in moved.items()}
    rs = cfg.pop("rope_scaling")
    inf.update(rope_factor=rs["factor"], original_seq_len=rs["original_max_position_embeddings"])
    (ck / "config.json").write_text(json.dumps(cfg))
    (ck / "inference").mkdir()
    (ck / "inference" / "config.json").write_text(json.dumps(inf))
    out = tmp_path / "cli.gguf"
    assert conv.main([str(ck), str(out), "--outtype", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    from dsv4_ggml.cli import main as cli_main          # `dsv4-ggml convert`: the same arguments, the same file
    assert cli_main(["convert", str(ck), str(tmp_path / "cli2.gguf"), "--outtype", "f32"]) == 0
    assert (tmp_path / "cli2.gguf").read_bytes() == out.read_bytes()
    assert "wrote" in capsys.readouterr().out
    a = {t.name: np.array(t.data) for t in GGUFReader(str(out)).tensors}
    b = {t.name: np.array(t.data) for t in GGUFReader(str(smooth["f32"])).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    fa, _ = _fields(out)
    fb, _ = _fields(smooth["f32"])
    assert {k: f.contents() for k, f in fa.items()} == {k: f.contents() for k, f in fb.items()}
