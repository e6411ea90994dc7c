"""The float64 MTP head of the reference (spec §3.10, §2.1 "MTP block", §4.1, §7 #22/#30).

Tiny models with an MTP block (``write_tiny_model(..., n_mtp_layers=1)``, window 32): whole sequence
vs row by row and chunked, the zero state at position 0 and the (Xfin[q−1], tok[q]) pairing, the
MTP block's own sliding window, required/optional tensors, and a hand computation of step 2.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGUFValueType

from dsv4_ggml.errors import BadKeyError, MissingTensorError
from dsv4_ggml.reference import MtpState, Reference, load_mtp, mtp_input, mtp_logits, rope_freqs
from dsv4_ggml.reference.common import rms_norm
from dsv4_ggml.reference.hc import hc_head
from dsv4_ggml.tiny import write_tiny_model

N_TOKENS = 300
TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp") / "tiny-mtp-seed3.gguf"
    write_tiny_model(path, seed=3, n_mtp_layers=1)
    return path


@pytest.fixture(scope="module")
def trunk_run(mtp_model):
    """Tokens, trunk logits and final stream states of one 300-token prefill."""
    tokens = np.random.default_rng(11).integers(0, 512, N_TOKENS)
    logits, xfin = Reference(mtp_model).eval(tokens, return_xfin=True)
    return tokens, logits, xfin


@pytest.fixture(scope="module")
def mw(mtp_model):
    return load_mtp(mtp_model)


@pytest.fixture(scope="module")
def whole(mw, trunk_run):
    tokens, _, xfin = trunk_run
    return mtp_logits(mw, tokens, xfin)


def test_xfin_is_the_state_before_the_trunk_hc_head(mtp_model, mw, trunk_run):
    """``return_xfin`` gives the state after the last block: HC head -> output_norm -> output = logits (§3.9)."""
    _, logits, xfin = trunk_run
    g = mw
    hp = g.hp
    assert xfin.shape == (N_TOKENS, hp["hc_mult"], hp["n_embd"])
    y = hc_head(xfin, g.hc_head_fn, g.hc_head_scale, g.hc_head_base, hp["norm_eps"], hp["hc_eps"])
    # tiny merged file: the MTP head reads the root output_hc_* (§3.10 "Verified against", §7 #22)
    from dsv4_ggml.reference.weights import load_model
    _, glob, _ = load_model(mtp_model)
    again = rms_norm(y, glob["output_norm"], hp["norm_eps"]) @ glob["output"].T
    assert np.abs(again - logits).max() < 1e-12


def test_trunk_of_merged_file_equals_trunk_only_file(tmp_path, mtp_model):
    """§2.1: a single trunk + MTP file gives the trunk-only file's logits (same seed: same trunk weights)."""
    plain = tmp_path / "plain.gguf"
    write_tiny_model(plain, seed=3)
    tokens = np.arange(40) * 7 % 512
    assert np.array_equal(Reference(plain).eval(tokens), Reference(mtp_model).eval(tokens))


def test_mtp_block_is_a_ratio0_layer_at_index_n_layer(mw):
    hp = mw.hp
    assert mw.il == hp["n_layer"] == 6
    assert hp["compress_ratios"][mw.il] == 0
    assert mw.il >= hp["n_hash_layers"]  # never hash-routed
    assert "exp_probs_b" in mw.layer and "ffn_gate_tid2eid" not in mw.layer
    assert np.array_equal(mw.freqs, rope_freqs(hp["n_rot"], hp["rope_freq_base"]))  # base rope, no YaRN


# (a) ------------------------------------------------------------------------------------------

def test_incremental_equals_whole_sequence(mw, trunk_run, whole):
    """Row by row, and in irregular chunks, through the MTP block's window ring == one batch (W = 32)."""
    tokens, _, xfin = trunk_run
    assert mw.hp["n_swa"] == 32 and N_TOKENS > 9 * 32
    assert whole.shape == (N_TOKENS, mw.n_vocab)
    scale = np.abs(whole).max()

    state = MtpState(mw)
    rows = np.concatenate([state.eval(tokens[i:i + 1], xfin[i:i + 1]) for i in range(N_TOKENS)])
    assert state.n_past == N_TOKENS
    assert np.array_equal(state.pending, xfin[-1])
    print(f"\nrow by row vs whole: max |Δ| {np.abs(rows - whole).max():.1e} (max |logit| {scale:.2f})")
    assert np.abs(rows - whole).max() < TOLERANCE

    state.reset()
    out, i = [], 0
    for size in [7, 13, 50, 1, 31, 32, 33, 3, 64, 66]:
        out.append(state.eval(tokens[i:i + size], xfin[i:i + size]))
        i += size
    assert i == N_TOKENS
    assert np.abs(np.concatenate(out) - whole).max() < TOLERANCE


def test_explicit_rows_and_flat_h_nextn_layout(mw, trunk_run, whole):
    """``eval_rows`` with explicit (Xfin[q−1], tok[q]) rows, and the flat 16384-style layout (stream 0
    first), give the same logits; ``copy`` is an independent snapshot (rollback)."""
    tokens, _, xfin = trunk_run
    T = 80
    h_prev = np.concatenate([np.zeros((1,) + xfin.shape[1:]), xfin[:T - 1]])
    state = MtpState(mw)
    first = state.eval_rows(tokens[:40], h_prev[:40].reshape(40, -1))
    snap = state.copy()
    second, X = state.eval_rows(tokens[40:T], h_prev[40:T], return_state=True)
    assert X.shape == (T - 40, mw.hp["hc_mult"], mw.hp["n_embd"])
    assert np.abs(np.concatenate([first, second]) - whole[:T]).max() < TOLERANCE
    state.eval_rows(tokens[T:T + 5], h_prev[T - 5:T])  # a speculative detour ...
    again = snap.eval_rows(tokens[40:T], h_prev[40:T])  # ... does not reach the snapshot
    assert np.array_equal(again, second)


# (b) ------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    """Equal up to float64 rounding (batches of different sizes round differently in BLAS)."""
    return np.abs(np.asarray(a) - np.asarray(b)).max() < TOLERANCE


def _moved(a, b) -> bool:
    return np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_position_0_uses_the_zero_state_and_row_q_pairs_xfin_q_minus_1(mw, trunk_run, whole):
    tokens, _, xfin = trunk_run
    rng = np.random.default_rng(5)
    # row 0 depends on tok[0] only: every xfin row may change
    other = rng.standard_normal(xfin.shape) * 3.0
    assert _same(mtp_logits(mw, tokens, other)[0], whole[0])
    assert _same(mtp_logits(mw, tokens[:1], xfin[:1])[0], whole[0])
    zero_row = MtpState(mw).eval_rows(tokens[:1], np.zeros((1,) + xfin.shape[1:]))
    assert _same(zero_row[0], whole[0])
    # ... and it does depend on tok[0]
    assert _moved(mtp_logits(mw, [(tokens[0] + 1) % 512], xfin[:1])[0], whole[0])

    # row 1 = (xfin[0], tok[1]): changing xfin[0] moves row 1, changing xfin[1] moves row 2 only
    x = xfin[:3].copy()
    x[1] += rng.standard_normal(x[1].shape)
    out = mtp_logits(mw, tokens[:3], x)
    assert _same(out[:2], whole[:2]) and _moved(out[2], whole[2])
    x = xfin[:3].copy()
    x[0] += rng.standard_normal(x[0].shape)
    out = mtp_logits(mw, tokens[:3], x)
    assert _same(out[0], whole[0]) and _moved(out[1], whole[1])
    # the last xfin is never used (it waits, as ``pending``, for the next token)
    x = xfin[:3].copy()
    x[2] = 0.0
    assert _same(mtp_logits(mw, tokens[:3], x), whole[:3])


# (c) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["token", "state"])
def test_rows_older_than_the_window_do_not_matter(mw, trunk_run, whole, what):
    """A row's kv is visible to the W = 32 rows q = p … p+31 (window incl. the query, §7 #20), not later."""
    tokens, _, xfin = trunk_run
    W, p, T = mw.hp["n_swa"], 100, 200
    tokens, xfin = tokens[:T].copy(), xfin[:T].copy()
    base = mtp_logits(mw, tokens, xfin)
    assert _same(base, whole[:T])
    if what == "token":
        tokens[p] = (tokens[p] + 17) % 512
    else:
        xfin[p - 1] += np.random.default_rng(2).standard_normal(xfin[p - 1].shape)
    out = mtp_logits(mw, tokens, xfin)
    diff = np.abs(out - base).max(axis=1)
    print(f"\nperturbed row {p}: max |Δ| before {diff[:p].max():.1e}, rows {p}..{p + W - 1} min "
          f"{diff[p:p + W].min():.1e}, from row {p + W} max {diff[p + W:].max():.1e}")
    assert (diff[:p] < 1e-13).all()
    assert (diff[p:p + W] > 1e-6).all(), diff[p:p + W]
    assert (diff[p + W:] < 1e-13).all(), diff[p + W:].max()


# (d) ------------------------------------------------------------------------------------------

def test_model_without_mtp_block_gives_a_clear_error(tmp_path, trunk_run):
    plain = tmp_path / "plain.gguf"
    write_tiny_model(plain, seed=0)
    tokens, _, xfin = trunk_run
    for call in (lambda: load_mtp(plain), lambda: MtpState(plain), lambda: mtp_logits(plain, tokens, xfin)):
        with pytest.raises(MissingTensorError, match="no MTP block.*nextn_predict_layers"):
            call()


def test_required_mtp_tensors(tmp_path, mtp_model):
    from gguf_edit import rewrite
    for name in ("blk.6.nextn.eh_proj.weight", "blk.6.nextn.enorm.weight", "blk.6.nextn.hnorm.weight",
                 "blk.6.attn_kv.weight", "blk.6.exp_probs_b.bias", "output_hc_fn.weight"):
        bad = rewrite(mtp_model, tmp_path / "bad.gguf", drop_tensors=[name])
        with pytest.raises(MissingTensorError, match=name.rsplit(".", 1)[0].replace("blk.6.", "")):
            load_mtp(bad)
    bad = rewrite(mtp_model, tmp_path / "bad.gguf", set_keys={
        "deepseek4.attention.compress_ratios": ([0, 4, 128, 0, 4, 128, 4], GGUFValueType.ARRAY, GGUFValueType.INT32)})
    with pytest.raises(BadKeyError, match="MTP block"):
        load_mtp(bad)


def test_optional_shared_head_norm_falls_back_to_output_norm(tmp_path, mtp_model, mw, trunk_run):
    from gguf_edit import rewrite
    tokens, _, xfin = trunk_run
    path = rewrite(mtp_model, tmp_path / "no-shnorm.gguf", drop_tensors=["blk.6.nextn.shared_head_norm.weight"])
    fallback = load_mtp(path)
    from dsv4_ggml.reference.weights import load_model
    _, glob, _ = load_model(mtp_model)
    assert np.array_equal(fallback.head_norm, glob["output_norm"])
    assert not np.array_equal(mw.head_norm, glob["output_norm"])  # the file's own norm is used when present
    expect = mtp_logits(dataclasses.replace(mw, head_norm=glob["output_norm"]), tokens[:20], xfin[:20])
    assert np.array_equal(mtp_logits(fallback, tokens[:20], xfin[:20]), expect)


def test_mtp_only_file_gives_the_same_mtp_logits(tmp_path, mtp_model, trunk_run, whole):
    """llama.cpp's separate MTP GGUF: block_count = n_layer + 1, only blk.{n_layer}.* and the globals (§2.1)."""
    from gguf_edit import read_model, write_model
    tokens, _, xfin = trunk_run
    kv, tensors = read_model(mtp_model)
    path = tmp_path / "mtp-only.gguf"
    write_model(path, kv, [t for t in tensors if not t[0].startswith("blk.") or t[0].startswith("blk.6.")])
    assert np.abs(mtp_logits(path, tokens[:50], xfin[:50]) - whole[:50]).max() < TOLERANCE


# (e) ------------------------------------------------------------------------------------------

def test_step2_by_hand(mw, trunk_run):
    """``X[k] = eh_proj · concat(e, ĥ[k])``, e first, per stream, no residual (§3.10 steps 1–2)."""
    tokens, _, xfin = trunk_run
    q = 37
    u, h_prev = int(tokens[q]), xfin[q - 1]
    D, eps = mw.hp["n_embd"], mw.hp["norm_eps"]
    w = mw.layer

    def rmsnorm(v, weight):
        return weight * v / np.sqrt(np.sum(v * v) / len(v) + eps)

    e = rmsnorm(mw.embed[u], w["nextn.enorm"])
    expect = np.empty((mw.hp["hc_mult"], D))
    for k in range(mw.hp["hc_mult"]):
        h_k = rmsnorm(h_prev[k], w["nextn.hnorm"])
        expect[k] = w["nextn.eh_proj"] @ np.concatenate([e, h_k])  # [D, 2D] · [2D]
    got = mtp_input(mw, np.array([u]), h_prev[None])[0]
    assert np.abs(got - expect).max() < 1e-12 * np.abs(expect).max()
    # e first: the halves of eh_proj are not interchangeable
    swapped = w["nextn.eh_proj"] @ np.concatenate([rmsnorm(h_prev[0], w["nextn.hnorm"]), e])
    assert np.abs(got[0] - swapped).max() > 1e-3
    # zero state: ĥ = 0 and every stream is E_proj·e
    zero = mtp_input(mw, np.array([u]), np.zeros((1,) + h_prev.shape))[0]
    assert np.abs(zero - (w["nextn.eh_proj"][:, :D] @ e)[None]).max() < 1e-12 * np.abs(expect).max()
