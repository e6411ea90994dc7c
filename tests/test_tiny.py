"""The tiny-model writer: llama.cpp's DeepSeek-V4 GGUF format, determinism, options, vocabulary."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from dsv4_ggml.tiny import TinyConfig, write_tiny_model
from dsv4_ggml.tiny_vocab import BOS, CHAT_SPECIALS, EOS, build_vocab

TOKENIZER_CONTENT = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def table(path):
    r = GGUFReader(str(path))
    keys = {k: tuple(t.name for t in f.types) for k, f in r.fields.items()}
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in r.tensors}
    return r, keys, tensors


def test_default_model_has_llamacpps_format(golden, tiny_model):
    """Same keys (with the same GGUF value types), tensor names, ne and dtypes as the golden
    file written by another tool for llama.cpp; only the tokenizer contents differ."""
    rg, keys_g, tensors_g = table(golden / "ds4-tiny-f32.gguf")
    rt, keys_t, tensors_t = table(tiny_model)
    assert keys_t == keys_g
    assert tensors_t == tensors_g
    for k, f in rg.fields.items():
        if k.startswith("GGUF.") or k in TOKENIZER_CONTENT:
            continue
        assert rt.fields[k].contents() == pytest.approx(f.contents()), k
    assert [t.name for t in rt.tensors] == [t.name for t in rg.tensors]


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write_tiny_model(a, seed=3)
    write_tiny_model(b, seed=3)
    write_tiny_model(c, seed=4)
    assert a.read_bytes() == b.read_bytes()
    ra, rc = GGUFReader(str(a)), GGUFReader(str(c))
    wa = next(t.data for t in ra.tensors if t.name == "blk.0.attn_kv.weight")
    wc = next(t.data for t in rc.tensors if t.name == "blk.0.attn_kv.weight")
    assert not np.array_equal(wa, wc)


def test_overrides_change_the_file(tmp_path):
    cfg = write_tiny_model(tmp_path / "m.gguf", n_layer=3, compress_ratios=[128, 4, 0], n_hash_layers=0,
                           indexer_top_k=5)
    assert cfg["n_layer"] == 3
    _, keys, tensors = table(tmp_path / "m.gguf")
    r = GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["deepseek4.attention.compress_ratios"].contents() == [128, 4, 0, 0]
    assert r.fields["deepseek4.attention.indexer.top_k"].contents() == 5
    assert "blk.0.exp_probs_b.bias" in tensors and "blk.1.indexer.proj.weight" in tensors
    assert tensors["blk.0.attn_compressor_kv.weight"][0] == (256, 256)
    assert not any(n.endswith("tid2eid.weight") for n in tensors)


@pytest.mark.parametrize("opts,exc", [
    (dict(bogus=1), TypeError),
    (dict(compress_ratios=[0, 4, 8, 0, 4, 128]), ValueError),
    (dict(compress_ratios=[0, 4]), ValueError),
    (dict(n_head=3), ValueError),
    (dict(n_expert_used=9), ValueError),
    (dict(n_hash_layers=7), ValueError),
    (dict(weight_type="q9_z"), ValueError),
    (dict(n_vocab=100), ValueError),
])
def test_bad_overrides_raise(tmp_path, opts, exc):
    with pytest.raises(exc):
        write_tiny_model(tmp_path / "x.gguf", **opts)


def test_mtp_block_adds_the_nextn_tensors(tmp_path):
    write_tiny_model(tmp_path / "m.gguf", n_mtp_layers=1)
    r, keys, tensors = table(tmp_path / "m.gguf")
    assert r.fields["deepseek4.block_count"].contents() == 7
    assert r.fields["deepseek4.nextn_predict_layers"].contents() == 1
    assert r.fields["deepseek4.attention.compress_ratios"].contents() == [0, 4, 128, 0, 4, 128, 0]
    assert len(r.fields["deepseek4.swiglu_clamp_exp"].contents()) == 7
    mtp = {n for n in tensors if n.startswith("blk.6.")}
    assert tensors["blk.6.nextn.eh_proj.weight"][0] == (512, 256)
    assert {"blk.6.nextn.enorm.weight", "blk.6.nextn.hnorm.weight", "blk.6.nextn.shared_head_norm.weight",
            "blk.6.exp_probs_b.bias", "blk.6.attn_kv.weight"} <= mtp
    assert not any("compressor" in n or "tid2eid" in n for n in mtp)


def test_vocabulary_is_a_real_bpe_that_round_trips():
    tokenizers = pytest.importorskip("tokenizers")
    v = build_vocab(512)
    assert len(v.tokens) == 512 and v.tokens[0] == BOS and v.tokens[1] == EOS
    assert all(t in v.tokens for t in CHAT_SPECIALS)
    assert len(v.merges) > 50
    index = {t: i for i, t in enumerate(v.tokens)}
    for m in v.merges:   # every merge result is a token
        a, b = m.split(" ")
        assert a + b in index and a in index and b in index
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=index, merges=[tuple(m.split(" ")) for m in v.merges]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    for text in ("The quick brown fox jumps over the lazy dog.", "inference engine: ggml, 4096 tokens",
                 "Ünïcödé, 中文 and 🙂 survive"):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode("the inference engine").ids) < len("the inference engine")  # merges apply


def test_activations_stay_well_conditioned(tiny_model):
    from dsv4_ggml.reference import Reference

    toks = np.random.default_rng(0).integers(2, 512, 700)
    ref = Reference(tiny_model, record_margins=True)
    logits = ref.eval(toks)
    assert np.isfinite(logits).all()
    assert 0.1 < logits.std() < 100
    margins = ref.min_margins()
    print(f"selection margins: {margins}")
    assert margins["indexer"] > 0 and margins["router"] > 0   # no exact ties (spec §8)


def test_defaults_cross_several_compression_boundaries_at_700_tokens():
    cfg = TinyConfig()
    assert 700 // 128 >= 5                        # HCA blocks at t = 127, 255, ...
    assert cfg.indexer_top_k < 700 // 4           # the indexer keeps a strict subset
    assert set(cfg.compress_ratios) == {0, 4, 128}
