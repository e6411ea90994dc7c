"""The native loader: a valid DeepSeek-V4 GGUF opens; every malformed variant raises the
matching Dsv4Error subclass with a message naming the problem (and never crashes)."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGUFValueType as VT

import dsv4_ggml
from dsv4_ggml import errors
from gguf_edit import header_layout, patch_bytes, rewrite, set_counts, truncate

U32, I32, F32, STR, ARR, BOOL = VT.UINT32, VT.INT32, VT.FLOAT32, VT.STRING, VT.ARRAY, VT.BOOL


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model


def open_model(path, **kw):
    return dsv4_ggml.Model(path, n_ctx=kw.pop("n_ctx", 512), **kw)


def expect(path, exc, *fragments):
    with pytest.raises(exc) as info:
        open_model(path)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    print(f"{exc.__name__}: {msg}")
    return info.value


# --- what loads ---------------------------------------------------------------------------------

def test_tiny_model_loads_with_its_hparams_and_tensor_table(base):
    m = open_model(base)
    hp = m.hparams
    assert hp["n_layer"] == 6 and hp["n_embd"] == 256 and m.n_vocab == 512
    assert hp["compress_ratios"] == [0, 4, 128, 0, 4, 128]
    assert hp["hc_dim"] == 4 * 256 and hp["hc_mix"] == 24 and hp["n_nope"] == 192
    names = {t.name for t in m.tensors}
    assert "blk.1.indexer.attn_q_b.weight" in names and "blk.0.ffn_gate_tid2eid.weight" in names
    wo_a = next(t for t in m.tensors if t.name == "blk.0.attn_output_a.weight")
    assert wo_a.shape == (512, 64) and wo_a.type == "f32" and wo_a.nbytes == 512 * 64 * 4
    m.close()
    m.close()  # idempotent


def test_tensor_table_matches_the_dsl_declarations(base):
    """The generated binder and the DSL agree: the file's tensors are exactly the declared ones."""
    from codegen.v4 import MODEL

    m = open_model(base)
    expected = MODEL.expected_tensors(m.hparams)
    got = {t.name: t.shape for t in m.tensors}
    required = {n for n, (_, _, req) in expected.items() if req}
    assert required <= set(got) <= set(expected)
    for name, shape in got.items():
        want = expected[name][0]
        assert shape == want[:len(shape)] and all(x == 1 for x in want[len(shape):]), name


def test_golden_files_load_unchanged(golden):
    for name in ("ds4-tiny-f32.gguf", "ds4-tiny-q8_0.gguf"):
        m = open_model(golden / name)
        assert m.hparams["n_layer"] == 6 and m.n_vocab == 512
        types = {t.type for t in m.tensors}
        assert types <= {"f32", "q8_0", "i32"}
        m.close()


def test_model_with_mtp_block_loads(tmp_path):
    from dsv4_ggml.tiny import write_tiny_model

    p = tmp_path / "mtp.gguf"
    write_tiny_model(p, n_mtp_layers=1)
    m = open_model(p)
    assert m.hparams["n_layer_all"] == 7 and m.hparams["n_layer"] == 6 and m.hparams["n_nextn"] == 1
    assert "blk.6.nextn.eh_proj.weight" in {t.name for t in m.tensors}


def test_bundled_draft_head_and_longer_compress_ratios_load(tmp_path):
    """Files people have carry what the engine does not use: llama.cpp's DSpark draft head
    (markov_w1/w2, conf_proj, fc, enc.output_norm; llama.cpp's deepseek4 loader refuses such a file)
    and, in the -0731 release, a compress_ratios array longer than block_count (46 entries for 44
    blocks). Both load; the draft tensors are listed as "ignored" and change no logit."""
    from dsv4_ggml.tiny import write_tiny_model

    kw = dict(seed=0, n_layer=3, n_mtp_layers=1, n_vocab=300, n_embd=64, head_dim=64, n_head=2, n_rot=32,
              q_lora_rank=32, indexer_n_head=4, indexer_head_dim=64, n_expert=4, expert_ff=64)
    plain, bundled = tmp_path / "plain.gguf", tmp_path / "bundled.gguf"
    write_tiny_model(plain, **kw)
    write_tiny_model(bundled, dspark_rank=16, ratio_tail=[4, 128], **kw)
    tokens = [(7 * i) % 300 for i in range(40)]
    with open_model(plain) as a, open_model(bundled) as b:
        assert b.metadata_array_length("deepseek4.attention.compress_ratios") == 4 + 2
        ignored = {t.name for t in b.tensors if t.placement == "ignored"}
        assert ignored == {"fc.weight", "enc.output_norm.weight", "markov_w1.weight", "markov_w2.weight",
                           "markov_w2.scale", "conf_proj.weight", "conf_proj.bias"}
        assert not any(t.placement == "ignored" for t in a.tensors)
        assert a.hparams == b.hparams
        np.testing.assert_array_equal(a.eval(tokens), b.eval(tokens))


@pytest.mark.parametrize("name", ["markov_w3.weight", "blk.x.attn_conv_base.weight", "blk.0.attn_conv_base",
                                  "xfc.weight", "blk..ffn_conv_proj.weight"])
def test_names_near_the_draft_head_still_raise_unexpected_tensor(base, tmp_path, name):
    p = rewrite(base, tmp_path / "x.gguf", add_tensors={name: np.zeros(4, np.float32)})
    expect(p, errors.UnexpectedTensorError, name)
    ok = rewrite(base, tmp_path / "ok.gguf", add_tensors={"blk.12.attn_conv_base.weight": np.zeros(4, np.float32)})
    open_model(ok).close()


# --- caller errors ---------------------------------------------------------------------------------

def test_bad_arguments_raise_invalid_argument(base):
    with pytest.raises(errors.InvalidArgumentError, match="n_ctx"):
        dsv4_ggml.Model(base, n_ctx=0)
    with pytest.raises(errors.InvalidArgumentError, match="backend"):
        dsv4_ggml.Model(base, backend="tpu")
    with pytest.raises(errors.InvalidArgumentError, match="n_threads"):
        dsv4_ggml.Model(base, n_threads=0)
    with pytest.raises(errors.InvalidArgumentError, match="context length 32768"):
        dsv4_ggml.Model(base, n_ctx=32769)


def test_cuda_backend_without_cuda_build_raises_backend_error(base):
    from dsv4_ggml import _native

    ffi, lib = _native.load()
    if lib.dsv4_backend_available(1):
        pytest.skip("this build has CUDA")
    with pytest.raises(errors.BackendError, match="CUDA"):
        dsv4_ggml.Model(base, backend="cuda")


def test_missing_file_and_directory_raise_file_error(tmp_path):
    expect(tmp_path / "nope.gguf", errors.FileError, "No such file")
    expect(tmp_path, errors.FileError, "directory")
    assert issubclass(errors.FileError, OSError)


# --- not a GGUF / truncated / corrupt ---------------------------------------------------------------

def test_not_a_gguf_raises_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    expect(p, errors.NotGGUFError, "not a GGUF", "magic")
    p.write_bytes(b"GG")
    expect(p, errors.NotGGUFError, "only 2 bytes")
    p.write_bytes(b"")
    expect(p, errors.NotGGUFError, "only 0 bytes")


def test_truncated_file_raises_truncated_at_every_section(base, tmp_path):
    lay = header_layout(base)
    cuts = {
        "in the header counts": 12,
        "in the metadata": lay["kv_start"] + 100,
        "in the tensor table": lay["tensor_info_start"] + 40,
        "in the tensor data": lay["data_start"] + 1000,
        "one byte short": lay["size"] - 1,
    }
    for what, size in cuts.items():
        p = truncate(base, tmp_path / f"cut{size}.gguf", size)
        e = expect(p, errors.TruncatedFileError, "truncated")
        assert e.status == 4, what


def test_bad_version_and_absurd_counts_raise_corrupt(base, tmp_path):
    expect(patch_bytes(base, tmp_path / "v.gguf", 4, struct.pack("<I", 7)),
           errors.CorruptFileError, "version 7")
    expect(set_counts(base, tmp_path / "n.gguf", n_kv=2**62), errors.CorruptFileError, "metadata keys")
    expect(set_counts(base, tmp_path / "t.gguf", n_tensors=2**61), errors.CorruptFileError,
           "tensor descriptions")


def test_malformed_tensor_descriptions_raise_corrupt(base, tmp_path):
    lay = header_layout(base)
    ti = lay["tensor_info_start"]
    name_len = struct.unpack("<Q", base.read_bytes()[ti:ti + 8])[0]
    dims_at = ti + 8 + name_len
    # 5 dimensions
    expect(patch_bytes(base, tmp_path / "d.gguf", dims_at, struct.pack("<I", 5)),
           errors.CorruptFileError, "5 dimensions")
    # negative dimension
    expect(patch_bytes(base, tmp_path / "neg.gguf", dims_at + 4, struct.pack("<q", -1)),
           errors.CorruptFileError, "negative or too large")
    # dimensions whose product overflows
    expect(patch_bytes(base, tmp_path / "ovf.gguf", dims_at + 4, struct.pack("<QQ", 2**40, 2**40)),
           errors.CorruptFileError, "overflow")
    # unknown ggml type (first tensor is 2-D: type follows the two dims)
    expect(patch_bytes(base, tmp_path / "ty.gguf", dims_at + 4 + 16, struct.pack("<I", 99)),
           errors.CorruptFileError, "ggml type 99")
    # misaligned data offset
    expect(patch_bytes(base, tmp_path / "al.gguf", dims_at + 4 + 16 + 4, struct.pack("<Q", 3)),
           errors.CorruptFileError, "alignment")


# --- wrong architecture / keys -------------------------------------------------------------------

def test_wrong_architecture_raises(base, tmp_path):
    p = rewrite(base, tmp_path / "arch.gguf", set_keys={"general.architecture": ("llama", STR)})
    expect(p, errors.WrongArchitectureError, "'llama'", "deepseek4")
    p = rewrite(base, tmp_path / "noarch.gguf", drop_keys=["general.architecture"])
    expect(p, errors.MissingKeyError, "general.architecture")


@pytest.mark.parametrize("key", [
    "deepseek4.block_count",
    "deepseek4.attention.head_count_kv",
    "deepseek4.attention.value_length",
    "deepseek4.expert_count",
    "deepseek4.expert_used_count",
    "deepseek4.rope.dimension_count",
    "deepseek4.rope.scaling.type",
    "deepseek4.rope.scaling.factor",
    "deepseek4.rope.scaling.original_context_length",
    "deepseek4.attention.compress_ratios",
    "deepseek4.swiglu_clamp_exp",
    "deepseek4.hyper_connection.count",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
])
def test_missing_key_raises_missing_key_naming_it(base, tmp_path, key):
    """Spec §1.5: llama.cpp aborts or silently computes wrong logits without these keys."""
    p = rewrite(base, tmp_path / "k.gguf", drop_keys=[key])
    expect(p, errors.MissingKeyError, key)


def test_optional_keys_fall_back(base, tmp_path):
    p = rewrite(base, tmp_path / "k.gguf",
                drop_keys=["deepseek4.swiglu_clamp_shexp", "tokenizer.ggml.add_bos_token"])
    m = open_model(p)
    assert m.hparams["swiglu_clamp_shexp"] == m.hparams["swiglu_clamp_exp"]
    assert m.hparams["add_bos"] is True


@pytest.mark.parametrize("key,spec,fragment", [
    ("deepseek4.attention.head_count_kv", (2, U32), "must be 1"),
    ("deepseek4.attention.value_length", (128, U32), "key_length"),
    ("deepseek4.hyper_connection.count", (2, U32), "must be 4"),
    ("deepseek4.expert_gating_func", (1, U32), "supported: 4"),
    ("deepseek4.rope.scaling.type", ("linear", STR), "'linear'"),
    ("tokenizer.ggml.pre", ("llama-bpe", STR), "'llama-bpe'"),
    ("deepseek4.block_count", ("six", STR), "expected an unsigned integer"),
    ("deepseek4.block_count", (-1, I32), "outside the range"),
    ("deepseek4.rope.freq_base", (10000, U32), "expected a float"),
    ("deepseek4.attention.compress_ratios", ([0, 4, 128], ARR, I32), "at least 6"),
    ("deepseek4.attention.compress_ratios", ([0, 4, 128, 0, 8, 128, 0], ARR, I32), "entry 4 is 8"),
    ("deepseek4.attention.compress_ratios", ([0, 4, 128, 0, 4, 128, 0], ARR, F32), "array of integers"),
    ("deepseek4.swiglu_clamp_exp", ([1.0] * 5, ARR, F32), "has 5 entries"),
    ("deepseek4.attention.output_group_count", (3, U32), "divide"),
    ("deepseek4.expert_used_count", (9, U32), "expert_count"),
    ("deepseek4.hash_layer_count", (7, U32), "trunk layer count"),
    ("deepseek4.rope.dimension_count", (63, U32), "even"),
    ("deepseek4.attention.indexer.top_k", (0, U32), "at least 1"),
    ("deepseek4.expert_weights_norm", (False, BOOL), "must be true"),
    ("tokenizer.ggml.bos_token_id", (512, U32), "not a valid token id"),
    ("deepseek4.nextn_predict_layers", (6, U32), "smaller than block_count"),
    ("deepseek4.block_count", (100000, U32), "512 blocks"),
])
def test_bad_key_value_raises_bad_key(base, tmp_path, key, spec, fragment):
    p = rewrite(base, tmp_path / "k.gguf", set_keys={key: spec})
    expect(p, errors.BadKeyError, key, fragment)


def test_mtp_only_file_is_rejected_with_a_hint(base, tmp_path):
    kv_only = {"deepseek4.nextn_predict_layers": (1, U32), "deepseek4.block_count": (7, U32),
               "deepseek4.swiglu_clamp_exp": ([1.0] * 7, ARR, F32),
               "deepseek4.swiglu_clamp_shexp": ([1.0] * 7, ARR, F32)}
    from gguf_edit import read_model
    _, tensors = read_model(base)
    trunk = [n for n, _, _ in tensors if n.startswith("blk.")]
    p = rewrite(base, tmp_path / "mtp.gguf", set_keys=kv_only, drop_tensors=trunk)
    expect(p, errors.MissingTensorError, "MTP block")


# --- tensors ------------------------------------------------------------------------------------

def test_missing_tensor_raises_missing_tensor_naming_it(base, tmp_path):
    for name in ("output.weight", "blk.3.attn_kv.weight", "blk.1.indexer.proj.weight",
                 "blk.2.attn_compressor_ape.weight", "blk.0.ffn_gate_tid2eid.weight",
                 "blk.5.exp_probs_b.bias"):
        p = rewrite(base, tmp_path / "t.gguf", drop_tensors=[name])
        expect(p, errors.MissingTensorError, f"'{name}'", "shape")


def test_nextn_without_mtp_tensors_raises_missing_tensor(base, tmp_path):
    p = rewrite(base, tmp_path / "t.gguf", set_keys={
        "deepseek4.block_count": (7, U32), "deepseek4.nextn_predict_layers": (1, U32),
        "deepseek4.swiglu_clamp_exp": ([1.0] * 7, ARR, F32),
        "deepseek4.swiglu_clamp_shexp": ([1.0] * 7, ARR, F32)})
    expect(p, errors.MissingTensorError, "blk.6.")


def test_shape_mismatch_raises_tensor_shape_with_the_formula(base, tmp_path):
    bad = np.zeros((32, 256), np.float32)  # ne {256, 32}; q_lora_rank is 64
    p = rewrite(base, tmp_path / "s.gguf", replace_tensors={"blk.0.attn_q_a.weight": bad})
    expect(p, errors.TensorShapeError, "blk.0.attn_q_a.weight", "{256, 32}", "{256, 64}",
           "n_embd, q_lora_rank")


def test_hparams_that_contradict_shapes_raise_tensor_shape(base, tmp_path):
    p = rewrite(base, tmp_path / "s.gguf", set_keys={"deepseek4.attention.q_lora_rank": (32, U32)})
    expect(p, errors.TensorShapeError, "q_lora_rank")
    p = rewrite(base, tmp_path / "r.gguf", set_keys={
        "deepseek4.attention.compress_ratios": ([0, 4, 4, 0, 4, 128, 0], ARR, I32)})
    expect(p, errors.ModelFormatError, "blk.2.")


def test_wrong_dtype_raises_tensor_type(base, tmp_path):
    norm = np.ones(256, np.float16)
    p = rewrite(base, tmp_path / "d.gguf", replace_tensors={"blk.0.attn_norm.weight": norm})
    expect(p, errors.TensorTypeError, "blk.0.attn_norm.weight", "f16", "must be f32")
    tid = np.zeros((512, 2), np.float32)
    p = rewrite(base, tmp_path / "i.gguf", replace_tensors={"blk.0.ffn_gate_tid2eid.weight": tid})
    expect(p, errors.TensorTypeError, "tid2eid", "must be i32")


def test_f16_weights_are_accepted(base, tmp_path):
    from gguf_edit import read_model
    _, tensors = read_model(base)
    w = next(d for n, d, _ in tensors if n == "blk.0.attn_q_b.weight")
    p = rewrite(base, tmp_path / "h.gguf", replace_tensors={"blk.0.attn_q_b.weight": w.astype(np.float16)})
    m = open_model(p)
    assert next(t.type for t in m.tensors if t.name == "blk.0.attn_q_b.weight") == "f16"


def test_extra_tensor_raises_unexpected_tensor(base, tmp_path):
    p = rewrite(base, tmp_path / "x.gguf", add_tensors={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    expect(p, errors.UnexpectedTensorError, "blk.0.mystery.weight")


def test_duplicate_tensor_name_raises_corrupt(base, tmp_path):
    """Renames one tensor to the name of another of the same length, in the file's bytes."""
    from gguf import GGUFReader
    r = GGUFReader(str(base))
    by_len: dict[int, list] = {}
    for t in r.tensors:
        by_len.setdefault(len(t.name), []).append(t)
    first, second = next(ts for ts in by_len.values() if len(ts) >= 2)[:2]
    name_at = int(second.field.offset) + 8          # after the u64 name length
    p = patch_bytes(base, tmp_path / "dup.gguf", name_at, first.name.encode())
    expect(p, errors.CorruptFileError, f"'{first.name}' appears twice")


def test_errors_are_dsv4_errors_with_status_codes(base, tmp_path):
    p = rewrite(base, tmp_path / "k.gguf", drop_keys=["deepseek4.expert_count"])
    e = expect(p, errors.Dsv4Error, "deepseek4.expert_count")
    assert isinstance(e, errors.MissingKeyError) and e.status == 7
    assert isinstance(e, KeyError)
